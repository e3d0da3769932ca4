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


def summary_lines(stats: dict[str, Any]) -> list[str]:
    """A few lines for a console from `prepare`'s stats (what the pipeline's data stage prints)."""
    load, split, tokens, trained = stats["load"], stats["split"], stats["tokens"]["train"], stats["trained_tokens"]
    how = "data.eval_file" if split["from_eval_file"] else f"eval_fraction {split['eval_fraction']}, seed {split['seed']}"
    counts = f"{load['records']} records ({load['shape']}), {load['skipped_count']} skipped"
    lengths = f"min {tokens['min']}, median {tokens['median']}, p95 {tokens['p95']}, max {tokens['max']}"
    over = f"{stats['overlength_count']} over train.max_seq_length {stats['max_seq_length']}"
    lines = [
        f"{load['path']}: {counts}, {stats['duplicates_count']} duplicates removed",
        f"split: {split['train']} train / {split['eval']} eval ({how})",
        f"tokens per example: {lengths}; {over} ({stats['overlength_policy']})",
        f"trained tokens per example (loss_on {stats['loss_on']}): median {trained['median']}, max {trained['max']}",
    ]
    if stats["think_stripped"]:
        lines.append(f"<think> blocks stripped from {stats['think_stripped']} examples (data.think: strip)")
    if stats["eval_in_train_count"]:
        lines.append(f"{stats['eval_in_train_count']} eval examples also occur in training")
    return lines
