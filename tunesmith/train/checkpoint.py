"""Training checkpoints: trainable weights, optimizer, scheduler, RNG and data position, written atomically.

A checkpoint directory `checkpoints/step-NNNNNNNN/` exists only once complete (it is written under a
temporary name and renamed), so `--resume` can trust whatever it finds, even after SIGKILL.
"""

from __future__ import annotations

import json
import random
import re
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from tunesmith.atomic import atomic_path

KEEP = 2
_NAME = re.compile(r"^step-(\d{8})$")


@dataclass
class TrainState:
    step: int = 0
    """Optimizer steps done."""
    tokens: int = 0
    """Trained (label) tokens seen so far."""
    elapsed: float = 0.0
    """Seconds of training before this process (for tokens/s and the final report across resumes)."""
    window_loss: float = 0.0
    window_steps: int = 0
    """The losses summed since the last logged step: a run resumed between two log steps then logs the same
    mean over the same steps as an uninterrupted run (otherwise the first line after a resume would average
    only the steps after the checkpoint)."""
    total_steps: int | None = None
    """The run's length once a time budget (train.max_minutes) has fixed it; None until then, or without one."""


def save(directory: Path, trainable: dict[str, Any], optimizer_state: dict[str, Any], scheduler: Any,
         state: TrainState) -> Path:
    """`trainable`: the weights that train (name -> tensor), whatever holds them; `optimizer_state`: the
    optimizer's `state_dict()` (under FSDP2 gathered whole first). On several ranks, rank 0 alone calls this:
    the weights and optimizer are the same on every rank, and so the RNG state saved is rank 0's."""
    import numpy as np
    import torch
    from safetensors.torch import save_file

    target = directory / f"step-{state.step:08d}"
    with atomic_path(target, directory=True) as tmp:
        save_file({name: value.detach().contiguous() for name, value in trainable.items()},
                  tmp / "trainable.safetensors")
        torch.save(
            {
                "optimizer": optimizer_state,
                "scheduler": scheduler.state_dict(),
                "rng": {"python": random.getstate(), "numpy": np.random.get_state(),
                        "torch": torch.get_rng_state()},
            },
            tmp / "state.pt",
        )
        (tmp / "trainer_state.json").write_text(json.dumps(asdict(state)) + "\n")
    for old in complete(directory)[:-KEEP]:
        shutil.rmtree(old, ignore_errors=True)
    return target


def complete(directory: Path) -> list[Path]:
    """Complete checkpoints, oldest first."""
    if not directory.is_dir():
        return []
    found = [path for path in directory.iterdir() if path.is_dir() and _NAME.match(path.name)]
    return sorted(found, key=lambda path: path.name)


def newest(directory: Path) -> Path | None:
    found = complete(directory)
    return found[-1] if found else None


def trainable_of(model: Any) -> dict[str, Any]:
    return {name: p for name, p in model.named_parameters() if p.requires_grad}


def copy_into(model: Any, trainable: dict[str, Any]) -> None:
    import torch

    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, value in trainable.items():
            param = params[name]
            if hasattr(param, "device_mesh"):  # an FSDP2 shard (DTensor): keep this rank's part of the whole
                from torch.distributed.tensor import distribute_tensor

                value = distribute_tensor(value.to(param.device, param.dtype), param.device_mesh, param.placements)
            param.copy_(value)


def load(checkpoint: Path, scheduler: Any) -> tuple[dict[str, Any], dict[str, Any], TrainState]:
    """Restore scheduler and RNG; return the trainable weights and the optimizer state for the caller to put
    back. Every rank of a distributed run loads the same checkpoint."""
    import numpy as np
    import torch
    from safetensors.torch import load_file

    trainable = load_file(checkpoint / "trainable.safetensors")
    saved = torch.load(checkpoint / "state.pt", weights_only=False)
    scheduler.load_state_dict(saved["scheduler"])
    random.setstate(saved["rng"]["python"])
    np.random.set_state(saved["rng"]["numpy"])
    torch.set_rng_state(saved["rng"]["torch"])
    return trainable, saved["optimizer"], TrainState(**json.loads((checkpoint / "trainer_state.json").read_text()))
