"""The learning rate as a function of the run's progress (0-1, budget.py): warm-up, then one of Hugging Face's
schedule shapes, `linear`, `cosine`, `constant` or `warmup_stable_decay`.

A function of progress rather than of a step count, so one schedule serves runs bounded by steps (progress is
step / total) and runs bounded by time (progress is the share of the budget's training time spent), and a run
whose speed changes still reaches the floor exactly when it ends. `warmup_stable_decay` (WSD: Hägele et al. 2024,
"Scaling Laws and Compute-Optimal Training Beyond Fixed Training Durations") holds the peak rate and decays
over the last `decay_ratio` of the run only, so it never needs to know early how long the run will be.
"""

from __future__ import annotations

import math
from typing import Any

SCHEDULES = ("linear", "cosine", "constant", "warmup_stable_decay")


def rate_factor(name: str, progress: float, warmup: float, decay: float) -> float:
    """The learning rate at `progress` as a share of the peak."""
    progress = min(max(progress, 0.0), 1.0)
    if warmup and progress < warmup:
        return progress / warmup
    if name == "constant":
        return 1.0
    if name == "warmup_stable_decay":
        return 1.0 if progress <= 1.0 - decay else (1.0 - progress) / decay
    after = (progress - warmup) / (1.0 - warmup)
    if name == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * after))
    return 1.0 - after  # linear


class LearningRate:
    """Sets the optimizer's rates for each step from its progress; each parameter group keeps its own peak (LoRA+
    gives the B matrices a larger one). Saved in checkpoints as a scheduler is."""

    def __init__(self, optimizer: Any, name: str, warmup: float, decay: float):
        self.optimizer, self.name, self.warmup, self.decay = optimizer, name, warmup, decay
        self.peaks = [float(group["lr"]) for group in optimizer.param_groups]
        self.progress = 0.0

    def set(self, progress: float) -> None:
        import torch

        self.progress = progress
        factor = rate_factor(self.name, progress, self.warmup, self.decay)
        for group, peak in zip(self.optimizer.param_groups, self.peaks, strict=True):
            if isinstance(group["lr"], torch.Tensor):  # the fast path's rate lives in a device tensor (CUDA graphs)
                group["lr"].fill_(peak * factor)
            else:
                group["lr"] = peak * factor

    def rate(self) -> float:
        """The rate of the first parameter group, as logged."""
        return float(self.optimizer.param_groups[0]["lr"])

    def state_dict(self) -> dict[str, Any]:
        return {"progress": self.progress}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.progress = float(state.get("progress", 0.0))
