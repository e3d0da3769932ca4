"""Training checkpoints: trainable weights, optimizer, scheduler, RNG and data position, written atomically.

A checkpoint directory `checkpoints/step-NNNNNNNN/` appears only once complete (it is written under a temporary
name, fsynced and renamed), and its `manifest.json`, written last, holds each file's size and SHA-256: `--resume`
takes the newest checkpoint that still matches its manifest, so a truncated or damaged one (a power loss, a
full disk, a copy cut short) is passed over for the one before it. Nothing in a checkpoint is a pickle of code:
`state.pt` loads with `torch.load(weights_only=True)`, so a run folder from elsewhere cannot run anything.
"""

from __future__ import annotations

import json
import random
import re
import shutil
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from tunesmith.atomic import atomic_path
from tunesmith.digest import file_sha256
from tunesmith.errors import ConfigError, DiskFull, TunesmithError

MANIFEST = "manifest.json"
_NAME = re.compile(r"^step-(\d{8})$")


class Incompatible(ConfigError):
    """--resume with settings that change what the checkpoint's weights, optimizer or data order mean."""


class NotFinite(TunesmithError):
    """The loss or the weights became inf or NaN: training stops, and nothing from that point on is saved."""

    def __init__(self, what: str, learning_rate: float):
        super().__init__(f"{what} (not a finite number); no adapter was saved",
                         f"lower train.learning_rate (now {learning_rate:g}); the checkpoints before this step "
                         "are kept")


@dataclass
class TrainState:
    step: int = 0
    """Optimizer steps done."""
    tokens: int = 0
    """Trained (label) tokens seen so far."""
    train_seconds: float = 0.0
    eval_seconds: float = 0.0
    """Seconds spent training and in eval passes before this process: the time budget goes on from them."""
    progress: float = 0.0
    """Share of the run done (budget.py): a resumed run's learning rate goes on from here."""
    recent_steps: list[float] = field(default_factory=list)
    """The last step times the budget estimates from, so a resumed run plans its next step as the run it
    continues would have."""
    eval_pass: float | None = None
    eval_interval: int | None = None
    stopped_early: str | None = None
    """Why `train.stop_when` ended the run at this step: a resumed run does not train past it."""
    window_loss: float = 0.0
    window_steps: int = 0
    """The losses summed since the last logged step: a run resumed between two log steps then logs the same
    mean over the same steps as an uninterrupted run (otherwise the first line after a resume would average
    only the steps after the checkpoint)."""

    def keep(self, budget: Any) -> None:
        """Copy the budget's position into the state, before a checkpoint saves it."""
        self.train_seconds, self.eval_seconds, self.progress = budget.train_seconds, budget.eval_seconds, budget.progress
        self.recent_steps, self.eval_pass, self.eval_interval = list(budget.recent), budget.eval_pass, budget.eval_interval

    def restore(self, budget: Any) -> None:
        """Put a checkpoint's position back into the budget of the resumed run."""
        budget.train_seconds, budget.eval_seconds, budget.progress = self.train_seconds, self.eval_seconds, self.progress
        budget.recent, budget.eval_pass, budget.eval_interval = list(self.recent_steps), self.eval_pass, self.eval_interval

    @classmethod
    def from_json(cls, text: str) -> TrainState:
        """A checkpoint's state; keys of older tunesmith versions (elapsed, total_steps) are read or dropped."""
        saved = json.loads(text)
        if "elapsed" in saved and "train_seconds" not in saved:
            saved["train_seconds"] = saved["elapsed"]
        names = {item.name for item in fields(cls)}
        return cls(**{key: value for key, value in saved.items() if key in names})


def save(directory: Path, trainable: dict[str, Any], optimizer_state: dict[str, Any], scheduler: Any,
         state: TrainState, settings: dict[str, Any], *, keep: int | None) -> Path:
    """`trainable`: the weights that train (name -> tensor), whatever holds them; `optimizer_state`: the
    optimizer's `state_dict()` (under FSDP2 gathered whole first); `settings`: what a resume must match
    (`resume_settings`); `keep`: how many of the newest checkpoints stay (None: all). On several ranks, rank 0
    alone calls this: the weights and optimizer are the same on every rank, and so the RNG state saved is rank
    0's."""
    target = directory / f"step-{state.step:08d}"
    try:
        _write(target, trainable, optimizer_state, scheduler, state, settings)
    except DiskFull as exc:
        kept = newest(directory)
        raise DiskFull(target, "free some space, then `tunesmith train --resume` continues from "
                               f"{kept.name if kept else 'the start'}: the checkpoints before this one are intact"
                       ) from exc
    for old in complete(directory)[:-keep] if keep else []:
        shutil.rmtree(old, ignore_errors=True)
    return target


def _write(target: Path, trainable: dict[str, Any], optimizer_state: dict[str, Any], scheduler: Any,
           state: TrainState, settings: dict[str, Any]) -> None:
    import numpy as np
    import torch
    from safetensors.torch import save

    numpy_state = np.random.get_state()
    with atomic_path(target, directory=True) as tmp:
        # Written through Python file objects, so a full disk is an OSError that names itself (ENOSPC).
        (tmp / "trainable.safetensors").write_bytes(
            save({name: value.detach().contiguous() for name, value in trainable.items()}))
        with open(tmp / "state.pt", "wb") as handle:
            torch.save(
                {
                    "optimizer": optimizer_state,
                    "scheduler": scheduler.state_dict(),
                    # Plain lists and tensors: what weights_only=True loads (numpy's arrays would need a pickle).
                    "rng": {"python": list(random.getstate()[1]), "python_gauss": random.getstate()[2],
                            "numpy": [numpy_state[0], numpy_state[1].tolist(), *numpy_state[2:]],
                            "torch": torch.get_rng_state()},
                },
                handle,
            )
        (tmp / "trainer_state.json").write_text(json.dumps(asdict(state)) + "\n")
        files = {path.name: {"size": path.stat().st_size, "sha256": file_sha256(path)} for path in sorted(tmp.iterdir())}
        (tmp / MANIFEST).write_text(json.dumps({"files": files, "settings": settings}, indent=1) + "\n")


def check_finite(trainable: dict[str, Any], step: int, learning_rate: float) -> None:
    """NotFinite unless every weight is a finite number: a loss can stay finite for a step after the weights
    overflow, and such weights must never be checkpointed or saved as the adapter."""
    import torch

    bad = next((name for name, value in trainable.items() if not torch.isfinite(value).all()), None)
    if bad is not None:
        raise NotFinite(f"training stopped at step {step}: the weight {bad} is inf or nan", learning_rate)


def complete(directory: Path) -> list[Path]:
    """Checkpoint directories (each renamed into place whole), oldest first; `verify` says if one is intact."""
    if not directory.is_dir():
        return []
    found = [path for path in directory.iterdir() if path.is_dir() and _NAME.match(path.name)]
    return sorted(found, key=lambda path: path.name)


def newest(directory: Path) -> Path | None:
    found = complete(directory)
    return found[-1] if found else None


def verify(checkpoint: Path) -> str | None:
    """None when every file matches the manifest; else what is wrong, in a few words."""
    try:
        manifest = json.loads((checkpoint / MANIFEST).read_text(encoding="utf-8"))
        files = manifest["files"]
    except FileNotFoundError:
        return f"no {MANIFEST} (unfinished, or written by an older tunesmith)"
    except (ValueError, KeyError, TypeError, OSError) as exc:
        return f"unreadable {MANIFEST} ({exc})"
    for name, expected in files.items():
        path = checkpoint / name
        if not path.is_file():
            return f"{name} is missing"
        if path.stat().st_size != expected["size"]:
            return f"{name} has {path.stat().st_size} bytes, {expected['size']} were written"
        if file_sha256(path) != expected["sha256"]:
            return f"{name} does not match its SHA-256"
    return None


def resume_settings(config: Any, engine: str) -> dict[str, Any]:
    """The settings a checkpoint is only meaningful under: the adapter's shape, the base it sits on, what the
    optimizer and scheduler restore from the checkpoint (a changed learning rate would be silently replaced by
    the saved one), the data order, and which engine's parameter names the weights carry. Length settings
    (max_steps, epochs, max_minutes) and logging may change: that is what a resume is for."""
    dumped = config.model_dump(mode="json")
    settings = {f"{section}.{key}": dumped[section][key] for section, keys in _RESUME_KEYS.items() for key in keys}
    settings["engine"] = engine
    return settings


_RESUME_KEYS = {
    "model": ["base", "revision"],
    "lora": ["r", "alpha", "dropout", "bias", "target_modules", "use_rslora"],
    "train": ["method", "batch_size", "grad_accum", "seed", "learning_rate", "lr_scheduler", "warmup_ratio",
              "decay_ratio", "weight_decay", "optimizer", "max_seq_length", "loss_on"],
}


def resume_point(directory: Path, settings: dict[str, Any], say: Callable[[str], None]) -> Path | None:
    """The newest intact checkpoint, saying which ones are passed over and why; None when there is none.
    Incompatible (exit 2, the keys named) when it was written under other `resume_settings`."""
    for candidate in reversed(complete(directory)):
        problem = verify(candidate)
        if problem is not None:
            say(f"checkpoint {candidate.name} is damaged: {problem}; passing over it")
            continue
        saved = json.loads((candidate / MANIFEST).read_text(encoding="utf-8")).get("settings", {})
        changed = [key for key in sorted(settings.keys() | saved.keys()) if settings.get(key) != saved.get(key)]
        if changed:
            what = "; ".join(f"{key} was {saved.get(key)!r}, now {settings.get(key)!r}" for key in changed)
            raise Incompatible(f"{candidate}: cannot resume with changed settings: {what}",
                               "set them back to resume, or train under a new name, or --force to start over")
        return candidate
    return None


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
    try:
        saved = torch.load(checkpoint / "state.pt", weights_only=True)
    except Exception as exc:  # pickle.UnpicklingError naming the forbidden global, or a damaged archive
        raise ConfigError(f"{checkpoint / 'state.pt'}: not a tunesmith checkpoint state "
                          f"({str(exc).splitlines()[0][:200]})",
                          "it holds more than tensors and numbers (tunesmith never writes that): remove this "
                          "checkpoint, or --force to start over") from exc
    scheduler.load_state_dict(saved["scheduler"])
    rng = saved["rng"]
    random.setstate((3, tuple(rng["python"]), rng["python_gauss"]))
    np.random.set_state((rng["numpy"][0], np.array(rng["numpy"][1], dtype=np.uint32), *rng["numpy"][2:]))
    torch.set_rng_state(rng["torch"])
    return trainable, saved["optimizer"], TrainState.from_json((checkpoint / "trainer_state.json").read_text())

