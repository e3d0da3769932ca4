"""Helpers for the training tests (no tests here): the small config they train with, and the adapter they compare."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml


def write_train_config(tmp: Path, model: Path, data: Path, name: str = "run", *, serve: dict[str, Any] | None = None,
                       **train: Any) -> Path:
    """`<tmp>/<name>.yaml`: 12 steps of batch 4 on `data`, a checkpoint every 3 steps, eval every 6. fp32 and one
    thread: the tests compare adapters at fp32 rounding (bf16, the default on AMX CPUs, is tested apart), and a
    thread count that followed the machine's load would change the rounding between runs."""
    config = {
        "name": name,
        "runs_dir": str(tmp / "runs"),
        "model": {"base": str(model)},
        "data": {"train_file": str(data), "eval_fraction": 0.125},
        "train": {"max_steps": 12, "batch_size": 4, "save_steps": 3, "log_steps": 1, "eval_steps": 6,
                  "learning_rate": 5e-3, "bf16": False, "threads": 1, **train},
    }
    if serve is not None:
        config["serve"] = serve
    path = tmp / f"{name}.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def adapter_weights(run: Path) -> dict:
    """The trained adapter's tensors, by name."""
    from safetensors.torch import load_file

    from tunesmith.run import Run

    return load_file(Run(run).adapter / "adapter_model.safetensors")


def train_in_process(config: Path, clock, *sets: str, resume: bool = False, threads: Any = None) -> str:
    """`tunesmith train` in this process with an injected clock; returns what it printed."""
    import io

    from rich.console import Console

    from tunesmith.config import load_config
    from tunesmith.train.loop import train

    console = Console(file=io.StringIO(), width=200)
    train(load_config(config, list(sets)), console, resume=resume, clock=clock, threads=threads)
    return console.file.getvalue()
