"""How busy this machine's cores are: the machine's and this process's CPU time (Linux /proc/stat), and the
cores other processes leave free. Used by CPU training's thread governor (train/threads.py) and by llama.cpp
work that runs alone (tunesmith/llama/load.py), since both lose most of their speed to a thread that shares a
core with another process.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass


@dataclass(frozen=True)
class CpuReading:
    wall: float
    """Seconds, monotonic."""
    busy: float
    """CPU seconds the whole machine was busy since boot (all cores, steal included)."""
    own: float
    """CPU seconds of this process (all its threads, spinning included)."""


def read_cpu() -> CpuReading | None:
    """The machine's and this process's CPU time; None where /proc/stat is missing (not Linux)."""
    try:
        with open("/proc/stat", encoding="ascii") as handle:
            fields = handle.readline().split()
    except OSError:
        return None
    if not fields or fields[0] != "cpu":
        return None
    ticks = [int(value) for value in fields[1:]]
    idle = ticks[3] + (ticks[4] if len(ticks) > 4 else 0)  # idle + iowait
    times = os.times()
    return CpuReading(time.monotonic(), (sum(ticks[:8]) - idle) / os.sysconf("SC_CLK_TCK"),
                      times.user + times.system)


def cores() -> int:
    """The cores this process may run on."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def free_cores(window: float = 0.5) -> int:
    """Cores other processes left idle over the last `window` seconds (this process sleeps meanwhile), at least one.
    Where /proc/stat is missing, every core."""
    first = read_cpu()
    time.sleep(window)
    second = read_cpu()
    if first is None or second is None:
        return cores()
    others = max(0.0, (second.busy - first.busy) - (second.own - first.own)) / (second.wall - first.wall)
    return max(1, min(cores(), round(cores() - others)))
