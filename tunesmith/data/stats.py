"""Token-length statistics: count, min, median, p95, max and how many exceed `train.max_seq_length`."""

from __future__ import annotations

import math
from typing import Any


def percentile(sorted_values: list[int], q: float) -> int:
    """Nearest-rank percentile of already sorted values (q in 0..100)."""
    if not sorted_values:
        return 0
    rank = max(1, math.ceil(q / 100 * len(sorted_values)))
    return sorted_values[rank - 1]


def length_stats(lengths: list[int], max_length: int | None = None) -> dict[str, Any]:
    values = sorted(lengths)
    stats: dict[str, Any] = {
        "count": len(values),
        "min": values[0] if values else 0,
        "median": percentile(values, 50),
        "p95": percentile(values, 95),
        "max": values[-1] if values else 0,
        "total": sum(values),
    }
    if max_length is not None:
        stats["over_max"] = sum(1 for v in values if v > max_length)
    return stats
