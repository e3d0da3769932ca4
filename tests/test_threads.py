"""CPU training's thread governor (train/threads.py): fewer threads while other processes keep cores busy, all of
them back once they stop. CPU readings are made up (the machine's own load must not decide a test)."""

from __future__ import annotations

import json

from tests.test_train import _config
from tests.train_support import train_in_process
from tunesmith.cpu import CpuReading, free_cores, read_cpu
from tunesmith.train.threads import ThreadGovernor


class FakeMachine:
    """A 2-core machine where this process uses `own` cores' worth of CPU and others `others`, per second."""

    def __init__(self):
        self.wall = self.busy = self.own = 0.0
        self.others, self.ours = 0.0, 2.0

    def advance(self, seconds: float) -> None:
        self.wall += seconds
        self.busy += seconds * min(2.0, self.others + self.ours)
        self.own += seconds * self.ours

    def read(self) -> CpuReading:
        return CpuReading(self.wall, self.busy, self.own)


def test_a_busy_core_takes_a_thread_away_and_gives_it_back_when_it_stops():
    machine, set_to = FakeMachine(), []
    governor = ThreadGovernor(2, set_to.append, read=machine.read, every=10.0)
    machine.advance(11)
    assert governor() is None and governor.threads == 2  # quiet: both cores are ours
    machine.others, machine.ours = 1.0, 1.3  # a single-threaded busy process: we get ~1.3 cores of 2
    machine.advance(5)
    assert governor() is None  # not yet 10 s since the last reading
    machine.advance(6)
    assert governor() == 1 and set_to == [1]
    machine.ours = 1.0
    machine.advance(11)
    assert governor() is None  # still busy: stays at 1
    machine.others = 0.0  # it stopped
    machine.advance(11)
    assert governor() == 2 and set_to == [1, 2]


def test_a_heavy_load_keeps_one_thread_and_a_small_one_changes_nothing():
    machine, set_to = FakeMachine(), []
    governor = ThreadGovernor(2, set_to.append, read=machine.read, every=10.0)
    machine.others, machine.ours = 0.3, 1.9  # a process that wakes now and then
    machine.advance(11)
    assert governor() is None and governor.threads == 2
    machine.others, machine.ours = 3.0, 0.7  # a multi-process job
    machine.advance(11)
    assert governor() == 1
    machine.advance(11)
    assert governor() is None and set_to == [1]


def test_one_thread_is_left_alone():
    machine = FakeMachine()
    governor = ThreadGovernor(1, lambda n: None, read=machine.read)
    machine.others = 2.0
    machine.advance(60)
    assert governor() is None and governor.threads == 1


def test_readings_of_this_machine_are_cpu_seconds():
    first = read_cpu()
    assert first is not None and first.busy > 0 and first.own > 0
    sum(i * i for i in range(200_000))  # some CPU time of our own
    second = read_cpu()
    assert second.wall > first.wall and second.own > first.own and second.busy >= first.busy


def test_the_loop_follows_the_governor(tmp_path, tiny_qwen3, work_clock):
    """A run with train.threads: auto asks the governor between steps and says when the threads change."""
    import torch

    machine, set_to = FakeMachine(), []
    governor = ThreadGovernor(2, set_to.append, read=machine.read, every=1.0)
    clock = work_clock(lambda step: 1.0)
    real_step = clock.step_seconds

    def step_seconds(step: int) -> float:
        machine.others, machine.ours = (1.0, 1.3) if step > 4 else (0.0, 2.0)
        machine.advance(1.0)
        return real_step(step)

    clock.step_seconds = step_seconds
    config = _config(tmp_path, tiny_qwen3, "governed", max_steps=8, threads="auto")
    threads_before = torch.get_num_threads()
    torch.set_num_threads(2)  # the made-up machine's 2 cores: an earlier test's `train.threads: 1` stays in torch
    try:
        out = train_in_process(config, clock, threads=governor)
    finally:
        torch.set_num_threads(threads_before)
    assert set_to == [1]
    # The batch (4 examples) goes on in two parts at once, one thread each, while the cores are busy.
    assert "compute threads: 1 (other processes are using the rest of the 2 cores; each batch in 2 parts at " \
           "once, 1 thread each)" in out
    run = tmp_path / "runs" / "governed"
    assert json.loads((run / "run.json").read_text())["final"]["steps"] == 8


def test_free_cores_are_between_one_and_all():
    import os

    assert 1 <= free_cores(0.2) <= len(os.sched_getaffinity(0))
