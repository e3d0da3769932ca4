"""Shared fixtures. The built-in model is materialized once, in the real $TUNESMITH_HOME, and reused."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="session")
def builtin_checkpoint() -> Path:
    from tunesmith.models import resolve_base

    return resolve_base("builtin:smollm2-135m")


@pytest.fixture(scope="session")
def smollm2_gguf() -> Path:
    from tunesmith.models.builtin import smollm2_gguf

    return smollm2_gguf()


@pytest.fixture(scope="session")
def gemma_checkpoint() -> Path:
    """The built-in Gemma 3 270M (materialized once per machine, about a minute)."""
    from tunesmith.models import resolve_base

    return resolve_base("builtin:gemma3-270m")


@pytest.fixture(scope="session")
def tiny_qwen3(builtin_checkpoint, tmp_path_factory) -> Path:
    from tunesmith.testing import tiny_checkpoint

    return tiny_checkpoint(tmp_path_factory.mktemp("tiny") / "qwen3", "qwen3")


@pytest.fixture(scope="session")
def tiny_llama(builtin_checkpoint, tmp_path_factory) -> Path:
    from tunesmith.testing import tiny_checkpoint

    return tiny_checkpoint(tmp_path_factory.mktemp("tiny") / "llama", "llama")


def run_cli(*args: str, env: dict[str, str] | None = None, cwd: Path | None = None, timeout: float = 300):
    """Run the real `tunesmith` command in a subprocess, as a user would."""
    return subprocess.run(
        [sys.executable, "-m", "tunesmith.cli", *args], check=False,
        capture_output=True, text=True, cwd=cwd or ROOT, timeout=timeout,
        env={**os.environ, "COLUMNS": "200", **(env or {})},
    )


class WorkClock:
    """The loop's clock, with the time the work would have taken: each training step `step_seconds(step)` (the
    step it finishes), each eval pass `eval_seconds`; real time counts for nothing. So the time budget sees the
    same run on any machine (a loaded 2-core machine once spent a wall-clock budget before the fit)."""

    def __init__(self, step_seconds, eval_seconds: float):
        self.step_seconds, self.eval_seconds, self.now = step_seconds, eval_seconds, 0.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def work_clock(monkeypatch):
    """Makes a WorkClock that the real engine's steps and eval passes advance (the work itself is real)."""
    from tunesmith.train.engines import HFEngine

    def make(step_seconds, eval_seconds: float = 1.0) -> WorkClock:
        clock = WorkClock(step_seconds, eval_seconds)
        real_step, real_eval = HFEngine.step, HFEngine.eval_loss

        def step(self, n: int):
            done = real_step(self, n)
            clock.now += clock.step_seconds(n + 1)
            return done

        def eval_loss(self, part: int = 1):  # a part of a pass (the budget's timing pass) takes that part
            done = real_eval(self, part)
            clock.now += clock.eval_seconds / part
            return done

        monkeypatch.setattr(HFEngine, "step", step)
        monkeypatch.setattr(HFEngine, "eval_loss", eval_loss)
        return clock

    return make
