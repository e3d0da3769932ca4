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


def save(directory: Path, trainable: dict[str, Any], optimizer: Any, scheduler: Any, state: TrainState) -> Path:
    """`trainable`: the weights that train (name -> tensor), whatever holds them."""
    import numpy as np
    import torch
    from safetensors.torch import save_file

    target = directory / f"step-{state.step:08d}"
    with atomic_path(target, directory=True) as tmp:
        save_file({name: value.detach().contiguous() for name, value in trainable.items()},
                  tmp / "trainable.safetensors")
        torch.save(
            {
                "optimizer": optimizer.state_dict(),
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
            params[name].copy_(value)


def load(checkpoint: Path, optimizer: Any, scheduler: Any) -> tuple[dict[str, Any], TrainState]:
    """Restore optimizer, scheduler and RNG; return the trainable weights for the caller to put back."""
    import numpy as np
    import torch
    from safetensors.torch import load_file

    trainable = load_file(checkpoint / "trainable.safetensors")
    saved = torch.load(checkpoint / "state.pt", weights_only=False)
    optimizer.load_state_dict(saved["optimizer"])
    scheduler.load_state_dict(saved["scheduler"])
    random.setstate(saved["rng"]["python"])
    np.random.set_state(saved["rng"]["numpy"])
    torch.set_rng_state(saved["rng"]["torch"])
    return trainable, TrainState(**json.loads((checkpoint / "trainer_state.json").read_text()))
