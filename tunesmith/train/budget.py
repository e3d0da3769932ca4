"""`train.max_minutes`: fitting a run's number of steps to a time budget.

The loop times its steps after a few warm-up ones, then fixes the run's length to what the rest of the budget
holds; the learning rate schedule is refitted to that length (loop.py), and checkpoints keep it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from tunesmith.config import TrainConfig

WARM_STEPS = 5
"""Steps not timed: the first ones carry one-off costs (on CPU, oneDNN picks kernels for every new batch shape;
goDrive's first 10 steps averaged 3.7 s against 2.9 s afterwards, so timing them left 3 minutes unused)."""
TIMED_STEPS = 10
"""Steps timed after those: enough to average over batch widths, few enough that a long nominal run
(max_steps 100,000) is fitted while it still warms up."""


@dataclass
class TimeBudget:
    seconds: float
    train: TrainConfig
    eval_examples: int
    warm_spent: float | None = None

    eval_seconds: float | None = None
    """What one eval pass (eval loss and the accuracy probe) took, measured at the fit step; None: estimated."""

    @property
    def fit_step(self) -> int:
        return WARM_STEPS + TIMED_STEPS

    def fit(self, step: int, spent: float, eval_seconds: float | None = None) -> tuple[int, float] | None:
        """After step `step`, `spent` seconds into the run: the run's length and the step time it was fitted
        with, once enough steps are timed; None before. `eval_seconds`: an eval pass timed at this step (its
        time is part of `spent` and is not counted as training)."""
        if step == WARM_STEPS:
            self.warm_spent = spent
        if step < WARM_STEPS + TIMED_STEPS:
            return None
        if eval_seconds is not None:
            self.eval_seconds = eval_seconds
            spent_training = spent - eval_seconds
        else:
            spent_training = spent
        if self.warm_spent is None:  # resumed past the warm-up steps: their cost is in the average, a bit slower
            step_seconds = spent_training / step
        else:
            step_seconds = (spent_training - self.warm_spent) / (step - WARM_STEPS)
        # 3% kept back: step times drift by a few percent over a run, and a run that overruns is cut short
        # before its learning rate has decayed.
        return step + self._steps_in(0.97 * (self.seconds - spent), step_seconds, step), step_seconds

    def _steps_in(self, seconds: float, step_seconds: float, step: int) -> int:
        """Steps that fit in `seconds` after `step`, with an eval pass every eval_steps and at the end. An eval
        pass is timed at the fit step when the loop ran one there; otherwise estimated as the eval-loss pass alone,
        forward only over the eval split: about a third of a training step per batch (the backward costs about
        twice the forward)."""
        cfg = self.train
        eval_pass = self.eval_seconds if self.eval_seconds is not None else (
            math.ceil(self.eval_examples / cfg.batch_size) * step_seconds / (3 * cfg.grad_accum))
        steps = max(0, int(seconds / step_seconds))
        while steps > 0:
            evals = (step + steps) // cfg.eval_steps - step // cfg.eval_steps + 1 if self.eval_examples else 0
            if steps * step_seconds + evals * eval_pass <= seconds:
                break
            steps -= 1
        return steps
