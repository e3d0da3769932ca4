"""How long a run trains and how far along it is: by steps (`max_steps`, `epochs`), by time (`max_minutes`), or both.

Before every step the loop asks `Budget.next_step`: None when the run is over, else the step's progress (0-1, at
the end of that step) and whether it is the last. The learning rate is a function of that progress (schedule.py),
so a run bounded by time decays its rate over the time it really has, however the step time moves.

With a time budget the progress is re-estimated at every step from the step time measured most recently, never
fixed once: a run that was slow in its first minute (another job on the machine) speeds up when the job ends and
still ends with the budget spent and the rate at its floor (bench/RESULTS.md: a run whose length was fitted
after 15 slow steps stopped after 377 s of a 14-minute budget). Eval passes count against the budget but not
towards training progress; the passes still to come are estimated from the last one measured.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass, field

RECENT_STEPS = 5
"""Step times the estimate looks at: few enough to follow a machine whose speed changes within a minute, enough
to smooth batches of different widths."""
TIMED_EVAL_STEP = 10
"""With a time budget and an eval set, a part of an eval pass runs after this step to time it, so the budget counts
the passes to come from the start (the accuracy probe generates answers: far more than a training step)."""
TIMED_EVAL_PART = 4
"""The timing pass answers and scores a quarter of a pass, and a pass is planned at 4x what it took. A whole pass
there cost 61 s of a 15-minute budget (Gemma 3 270M, the address example, 2 cores) to report 0% after 10 steps;
a quarter's numbers are noise, so it writes no record."""
EVAL_SHARE = 0.1
"""Under a time budget, the eval passes between the timed one and the last are spaced so that all of them take
at most this share of the budget (never closer than train.eval_steps): on a 2-core CPU one pass of SmolLM2 over
the address example's validation split took 80 s of a 15-minute budget (bench/RESULTS.md)."""


@dataclass(frozen=True)
class StepPlan:
    step: int
    """The step about to run (1-based)."""
    progress: float
    """Share of the run done at the end of this step, 0-1: the learning rate's argument."""
    last: bool


@dataclass
class Budget:
    total_steps: int
    """The bound from max_steps or epochs."""
    seconds: float | None = None
    """The loop's time budget (training and eval passes), None without one."""
    eval_steps: int = 0
    """Eval passes come every eval_steps steps and at the end; 0: no eval passes."""
    train_seconds: float = 0.0
    eval_seconds: float = 0.0
    """Seconds spent training (everything in the loop but eval passes) and in eval passes; a resumed run
    restores both from its checkpoint."""
    eval_pass: float | None = None
    """What the last eval pass took; None until one ran."""
    progress: float = 0.0
    recent: list[float] = field(default_factory=list)
    eval_interval: int | None = None
    """Steps between eval passes: eval_steps, or under a time budget what EVAL_SHARE allows (decided once the
    timed pass is measured; 0: none between the timed one and the last)."""
    eval_share: float = EVAL_SHARE

    def step_done(self, seconds: float) -> None:
        self.train_seconds += seconds
        self.recent = (self.recent + [seconds])[-RECENT_STEPS:]

    def spend(self, seconds: float) -> None:
        """Training time outside a step (writing a checkpoint): counted, but not a step time to plan with."""
        self.train_seconds += seconds

    def eval_done(self, seconds: float, done: int, whole: float | None = None) -> None:
        """An eval pass after step `done` took `seconds` (`whole`: what a whole pass would take, when this one was
        the timing pass's part); the first one under a time budget sets the spacing."""
        self.eval_seconds += seconds
        self.eval_pass = seconds if whole is None else whole
        if self.seconds is not None and self.eval_interval is None:
            self.eval_interval = self._spacing(done)

    def _spacing(self, done: int) -> int:
        """Steps between the eval passes still to come, so that they take at most `eval_share` of the budget (the
        last one included); 0 when the budget allows only the last."""
        passes = math.floor(max(0.0, self.eval_share * self.seconds - self.eval_seconds) / max(self.eval_pass, 1e-9))
        if passes <= 1:
            return 0
        self.eval_interval = 0  # plan the steps as if only the last pass were left, then spread the others
        steps = self._steps_that_fit(done) or 0
        return max(self.eval_steps, math.ceil(steps / passes))

    def eval_due(self, step: int, last: bool) -> bool:
        """Whether an eval pass runs after `step`: at the last step, every eval_interval steps, and under a time
        budget once after TIMED_EVAL_STEP to time it."""
        if not self.eval_steps:
            return False
        if last or self.wants_timing_eval(step):
            return True
        interval = self.eval_steps if self.seconds is None else self.eval_interval
        return bool(interval) and step % interval == 0

    @property
    def spent(self) -> float:
        return self.train_seconds + self.eval_seconds

    def step_seconds(self) -> float | None:
        """The next step's expected time: the larger of the recent median and the last step, so a machine that
        just slowed down is believed at once and a run never plans a step it has no time for."""
        if not self.recent:
            return None
        return max(statistics.median(self.recent), self.recent[-1])

    def wants_timing_eval(self, step: int) -> bool:
        """Whether to run an eval pass after `step` only to time it (time budgets with eval passes)."""
        return self.seconds is not None and bool(self.eval_steps) and self.eval_pass is None \
            and step == TIMED_EVAL_STEP

    def next_step(self, done: int) -> StepPlan | None:
        """The plan for step `done + 1`, or None when the run is over: the step bound is reached, or the time
        budget holds no further step (with the eval pass at the end)."""
        step = done + 1
        if step > self.total_steps:
            return None
        progress, last = step / self.total_steps, step == self.total_steps
        if self.seconds is not None:
            fit = self._steps_that_fit(done)
            if fit == 0 and done > 0:
                return None
            if fit is not None:  # None: no step timed yet, nothing to go on but the step bound
                last = last or fit <= 1
                seconds = self.step_seconds()
                by_time = 1.0 if fit <= 1 else (self.train_seconds + seconds) / (self.train_seconds + fit * seconds)
                progress = max(progress, by_time)
        progress = 1.0 if last else min(max(progress, self.progress), 1.0)
        self.progress = progress
        return StepPlan(step, progress, last)

    def _steps_that_fit(self, done: int) -> int | None:
        """Steps the rest of the budget holds after `done`, with an eval pass every eval_steps steps and one at
        the end; None before any step is timed."""
        seconds = self.step_seconds()
        if seconds is None:
            return None
        left = self.seconds - self.spent
        eval_pass = self.eval_pass or 0.0
        steps = max(0, min(self.total_steps - done, math.floor(left / seconds)))
        interval = self.eval_interval if self.eval_interval is not None else self.eval_steps
        while steps > 0:
            evals = 0
            if self.eval_steps:  # the passes at multiples of the interval before the last step, and the one after it
                evals = 1 + ((done + steps - 1) // interval - done // interval if interval else 0)
            if steps * seconds + evals * eval_pass <= left:
                break
            steps -= 1
        return steps
