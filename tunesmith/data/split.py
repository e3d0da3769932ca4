"""Exact-duplicate removal and the deterministic train/eval split.

Duplicates are whole conversations identical after normalization (same turns, same text); the first
is kept and every later one is reported as "<where> duplicates <where>". The split draws
`round(n * eval_fraction)` examples (at least one when the fraction is above zero) with a
`random.Random(seed)`, so the same file and seed always give the same split; both parts keep file order.
"""

from __future__ import annotations

import json
import random

from tunesmith.data.validate import Example


def conversation_key(example: Example) -> str:
    return json.dumps(example.messages, ensure_ascii=False, sort_keys=True)


def dedupe(examples: list[Example]) -> tuple[list[Example], list[str]]:
    """Drop exact repeats; return the kept examples and one line per dropped one."""
    first: dict[str, Example] = {}
    kept: list[Example] = []
    dropped: list[str] = []
    for example in examples:
        key = conversation_key(example)
        if key in first:
            dropped.append(f"{example.source} duplicates {first[key].source}")
        else:
            first[key] = example
            kept.append(example)
    return kept, dropped


def split(examples: list[Example], eval_fraction: float, seed: int) -> tuple[list[Example], list[Example]]:
    n = len(examples)
    if eval_fraction <= 0 or n < 2:
        return list(examples), []
    n_eval = min(n - 1, max(1, round(n * eval_fraction)))
    chosen = set(random.Random(seed).sample(range(n), n_eval))
    train = [e for i, e in enumerate(examples) if i not in chosen]
    evaluation = [e for i, e in enumerate(examples) if i in chosen]
    return train, evaluation


def overlap(train: list[Example], evaluation: list[Example]) -> list[str]:
    """Eval examples that also occur in training (a separate data.eval_file can repeat training data)."""
    seen = {conversation_key(e): e for e in train}
    return [f"{e.source} also in training at {seen[k].source}" for e in evaluation
            if (k := conversation_key(e)) in seen]
