"""The time budget (train/budget.py) and the learning rate over progress (train/schedule.py): a run bounded by time
ends with its budget spent and its rate at the floor, whatever its step time does, and never overruns.

The loop is simulated with a clock that advances by what each step and eval pass "takes" (no wall clock); the
last tests drive the real training loop the same way."""

from __future__ import annotations

import json
import shutil

import pytest

from tests.test_train import _config
from tests.train_support import adapter_weights, train_in_process
from tunesmith.train.budget import TIMED_EVAL_PART, TIMED_EVAL_STEP, Budget
from tunesmith.train.schedule import rate_factor

WSD = ("warmup_stable_decay", 0.05, 0.2)


def simulate(budget: Budget, step_seconds, eval_seconds: float = 1.0):
    """Runs the loop's protocol against `budget`: returns the plans and the seconds spent."""
    plans, step = [], 0
    while (plan := budget.next_step(step)) is not None:
        plans.append(plan)
        step += 1
        if budget.eval_due(step, plan.last):
            if budget.wants_timing_eval(step) and not plan.last:  # the timing pass: a part of a pass (loop.py)
                budget.eval_done(eval_seconds / TIMED_EVAL_PART, step, whole=eval_seconds)
            else:
                budget.eval_done(eval_seconds, step)
        budget.step_done(step_seconds(step))
        if plan.last:
            break
    return plans, budget.spent


@pytest.mark.parametrize(("name", "step_seconds", "longest"), [
    ("steady", lambda step: 1.0, 1.0),
    ("slow, then fast", lambda step: 3.0 if step <= 30 else 1.0, 1.0),
    ("fast, then slow", lambda step: 1.0 if step <= 30 else 3.0, 3.0),
    ("slow in the middle", lambda step: 3.0 if 40 < step <= 70 else 1.0, 1.0),
])
def test_a_timed_run_ends_within_one_step_of_its_budget_with_the_rate_at_its_floor(name, step_seconds, longest):
    budget = Budget(total_steps=100_000, seconds=240.0, eval_steps=20)
    plans, spent = simulate(budget, step_seconds)
    assert spent <= 240.0, f"{name}: overran the budget"
    assert spent > 240.0 - longest - 1.0, f"{name}: {240 - spent:.1f} s of the budget left unused"  # a step or an eval
    assert plans[-1].last and plans[-1].progress == 1.0
    assert rate_factor(*WSD[:1], plans[-1].progress, *WSD[1:]) == 0.0
    progress = [plan.progress for plan in plans]
    assert progress == sorted(progress), "progress went backwards"
    # The rate decays over the last fifth of the training time, not of a step count fixed early: the decay
    # starts once 80% of the budget's training seconds are spent, whatever the steps cost until then.
    decaying = [plan.step for plan in plans if rate_factor(*WSD[:1], plan.progress, *WSD[1:]) < 1.0
                and plan.progress > 0.5]
    assert decaying and decaying[-1] == plans[-1].step


def test_a_slow_first_minute_does_not_shorten_the_run():
    """The failure of a length fixed after 15 timed steps: 2.5 s steps while another job ran, 0.86 s after."""
    budget = Budget(total_steps=100_000, seconds=14 * 60.0, eval_steps=300)
    plans, spent = simulate(budget, lambda step: 2.5 if step <= 40 else 0.86, eval_seconds=20.0)
    assert spent > 14 * 60 - 20.0 - 2.5
    # 40 slow steps take 100 s; the other ~700 s hold ~790 fast steps.
    assert 800 <= len(plans) <= 850


def test_the_step_bound_still_bounds_a_timed_run():
    budget = Budget(total_steps=50, seconds=1_000.0, eval_steps=0)
    plans, spent = simulate(budget, lambda step: 1.0)
    assert len(plans) == 50 and plans[-1].last and plans[-1].progress == 1.0
    assert spent == 50.0


def test_steps_alone_give_step_over_total():
    budget = Budget(total_steps=8)
    plans, _ = simulate(budget, lambda step: 1.0)
    assert [plan.progress for plan in plans] == [step / 8 for step in range(1, 9)]


def test_an_eval_pass_is_timed_early_and_counted_in_the_plan():
    budget = Budget(total_steps=100_000, seconds=100.0, eval_steps=10, eval_share=1.0)
    plans, spent = simulate(budget, lambda step: 1.0, eval_seconds=5.0)
    # The timing pass at 10 answers a quarter (1.25 s) and writes no record; whole passes at 20, 30, ... and at
    # the end: n = 68 takes 68 + 1.25 + 6 * 5 = 99.25 s (passes at 20-60 and 68), n = 69 would take 100.25 s.
    assert len(plans) == 68 and spent == 99.25
    assert budget.eval_seconds == 1.25 + 6 * 5.0
    assert TIMED_EVAL_STEP == 10 and TIMED_EVAL_PART == 4


@pytest.mark.parametrize(("name", "expected"), [
    ("linear", [0.0, 0.5, 1.0, 0.5, 0.0]), ("constant", [0.0, 0.5, 1.0, 1.0, 1.0]),
    ("cosine", [0.0, 0.5, 1.0, 0.5, 0.0]), ("warmup_stable_decay", [0.0, 0.5, 1.0, 1.0, 0.0])])
def test_rate_factor_shapes(name, expected):
    # warm-up over the first 20%, WSD's decay over the last 40%
    points = [0.0, 0.1, 0.2, 0.6, 1.0]
    assert [round(rate_factor(name, p, 0.2, 0.4), 6) for p in points] == expected


@pytest.mark.slow
def test_the_loop_spends_its_budget_and_a_resume_in_the_decay_matches_an_uninterrupted_run(
        tmp_path, tiny_qwen3, work_clock):
    """The real loop under a clock 3x slower for the first 30 steps, then fast: the run ends within one step of
    its budget with the rate at zero; lose its last checkpoints, resume from one taken during the decay, and the
    adapter comes out as the uninterrupted run's."""
    import torch

    config = _config(tmp_path, tiny_qwen3, "timed", max_steps=100_000, max_minutes=3, save_steps=5,
                     log_steps=1, eval_steps=20, eval_accuracy=0, lr_scheduler="warmup_stable_decay",
                     decay_ratio=0.3)
    slow_then_fast = lambda step: 3.0 if step <= 30 else 1.0
    train_in_process(config, work_clock(slow_then_fast))
    run = tmp_path / "runs" / "timed"
    final = json.loads((run / "run.json").read_text())["final"]
    spent = final["train_seconds"] + final["eval_seconds"]
    assert 180 - 1.0 - 1.0 < spent <= 180, final  # the budget is 180 s; a fast step and an eval pass take 1 s each
    logged = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    steps = [record for record in logged if "loss" in record]
    assert steps[-1]["step"] == final["steps"] and steps[-1]["learning_rate"] == 0.0
    assert max(record["learning_rate"] for record in steps) == pytest.approx(5e-3)
    reference = adapter_weights(run)

    # The run keeps its newest two checkpoints: the last step's and the one before it, taken in the decay.
    kept = sorted(int(folder.name.split("-")[1]) for folder in (run / "checkpoints").iterdir())
    resume_at = kept[-2]
    assert next(record for record in steps if record["step"] == resume_at)["progress"] > 1 - 0.3
    shutil.rmtree(run / "checkpoints" / f"step-{kept[-1]:08d}")
    shutil.rmtree(run / "adapter")
    out = train_in_process(config, work_clock(lambda step: 1.0), resume=True)
    assert f"resuming from step-{resume_at:08d}" in out
    assert json.loads((run / "run.json").read_text())["final"]["steps"] == final["steps"]
    for key, value in adapter_weights(run).items():
        torch.testing.assert_close(value, reference[key], rtol=1e-5, atol=1e-6)


def test_without_steps_or_epochs_a_cpu_run_trains_for_the_default_budget(tmp_path, tiny_qwen3, work_clock):
    """Neither max_steps nor epochs: on CPU the run is bounded by DEFAULT_CPU_MINUTES (and 3 epochs)."""
    from tunesmith.config import DEFAULT_CPU_MINUTES

    config = _config(tmp_path, tiny_qwen3, "default", max_steps=None, eval_steps=5, eval_accuracy=0)
    out = train_in_process(config, work_clock(lambda step: 60.0, eval_seconds=2.0))
    assert f"training for {DEFAULT_CPU_MINUTES:g} minutes (the CPU default" in out
    final = json.loads((tmp_path / "runs" / "default" / "run.json").read_text())["final"]
    budget = DEFAULT_CPU_MINUTES * 60
    assert final["budget_seconds"] == budget
    assert budget - 60 - 2 < final["train_seconds"] + final["eval_seconds"] <= budget
    assert final["steps"] < 33  # 3 epochs of 42 examples in batches of 4 would be 33 steps


def test_eval_passes_take_at_most_their_share_of_a_time_budget():
    """A pass of 20 s in a 900 s budget: a tenth (90 s) holds the timing pass (a quarter of a pass, 5 s), three
    whole passes in between and the last, spaced evenly; eval_steps stays the closest spacing allowed."""
    budget = Budget(total_steps=100_000, seconds=900.0, eval_steps=50)
    plans, spent = simulate(budget, lambda step: 2.5, eval_seconds=20.0)
    passes = [plan.step for plan in plans if plan.last or (budget.eval_interval and plan.step % budget.eval_interval == 0)]
    assert budget.eval_seconds == 5.0 + 20.0 * len(passes) <= 0.1 * 900
    assert len(passes) == 4 and passes[-1] == plans[-1].step
    # 870 s left after step 10 (25 s of steps, the 5 s timing part), 20 s of it for the last pass: 340 steps of
    # 2.5 s; the share leaves (90 - 5) // 20 = 4 passes (the last included): one every ceil(340 / 4) = 86 steps
    assert budget.eval_interval == 86
    assert 900 - 2.5 - 20 < spent <= 900
    # A pass that costs more than the share: only the timing part and the last.
    budget = Budget(total_steps=100_000, seconds=900.0, eval_steps=50)
    simulate(budget, lambda step: 2.5, eval_seconds=80.0)
    assert budget.eval_interval == 0 and budget.eval_seconds == 20.0 + 80.0
    # Without a time budget the passes come every eval_steps, as set.
    budget = Budget(total_steps=120, eval_steps=50)
    simulate(budget, lambda step: 2.5, eval_seconds=80.0)
    assert budget.eval_seconds == 3 * 80.0
