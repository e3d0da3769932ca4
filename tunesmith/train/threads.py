"""How many threads CPU training computes with, chosen from what the machine's other processes leave free and
re-chosen while the run trains.

torch splits each matrix product between its threads, which then wait for each other. When another process takes
a core, the thread sharing it runs at half speed and its partner waits: on the 2-core VMs, SmolLM2 steps beside
one single-threaded busy process ran at 204 tokens/s with 2 threads and 350 with 1 (quiet: 537 with 2, 351 with
1; DESIGN.md). So every few seconds the governor reads how many cores the other processes used (the machine's
busy time from /proc/stat, the hypervisor's steal included, minus this process's own CPU time) and gives torch
the cores left over: fewer threads while something else runs, all of them back when it stops.
"""

from __future__ import annotations

from collections.abc import Callable

from tunesmith.cpu import CpuReading, read_cpu

CHECK_EVERY = 5.0
"""Seconds between two readings: long enough to average over a few steps, short enough to follow a job that
starts or stops within a minute."""
DOWN_AT = 0.5
"""Drop a thread once the free cores are this far below the threads in use (a hog on one of 2 cores leaves 1.0-1.4
free: 2 threads get ~1.3 cores between them, their partner spinning)."""
UP_AT = 0.75
"""Take a thread back once the free cores exceed the threads in use by this much (hysteresis: no flapping when
another process comes and goes within a reading)."""


class ThreadGovernor:
    def __init__(self, most: int, set_threads: Callable[[int], None],
                 read: Callable[[], CpuReading | None] = read_cpu, every: float = CHECK_EVERY):
        """`most`: the threads torch was started with (OMP_NUM_THREADS, else the physical cores), never exceeded;
        `set_threads`: torch.set_num_threads; `read` and `every` are injected by tests."""
        self.most, self.threads, self._set, self._read, self.every = most, most, set_threads, read, every
        self._last = read()

    def __call__(self) -> int | None:
        """Called between steps: the new thread count when it changed, else None."""
        if self.most <= 1 or self._last is None:
            return None
        now = self._read()
        if now is None or now.wall - self._last.wall < self.every:
            return None
        wall = now.wall - self._last.wall
        others = max(0.0, (now.busy - self._last.busy) - (now.own - self._last.own)) / wall
        self._last = now
        free = self.most - others
        wanted = self.threads
        if free <= self.threads - DOWN_AT:
            wanted = max(1, round(free))
        elif free >= self.threads + UP_AT:
            wanted = min(self.most, round(free))
        if wanted == self.threads:
            return None
        self.threads = wanted
        self._set(wanted)
        return wanted
