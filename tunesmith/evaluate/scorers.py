"""Scores for one answer against its reference. Each returns a number in [0, 1]."""

from __future__ import annotations

import importlib
import importlib.util
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from rapidfuzz.distance import Levenshtein

from tunesmith.errors import ConfigError

Scorer = Callable[[str, str], dict[str, float]]


def normalize(text: str) -> str:
    return " ".join(text.split())


def exact_match(prediction: str, reference: str) -> float:
    return float(normalize(prediction) == normalize(reference))


def edit_similarity(prediction: str, reference: str) -> float:
    """1 - Levenshtein distance / length of the longer string (characters, so it suits Chinese too)."""
    # rapidfuzz normalizes unit-cost Levenshtein by the longer length, and two empty strings score 1.
    return Levenshtein.normalized_similarity(normalize(prediction), normalize(reference))


def json_valid(prediction: str, reference: str) -> float:
    try:
        json.loads(prediction)
    except ValueError:
        return 0.0
    return 1.0


def load_scorer(spec: str, search: list[Path] | None = None) -> Scorer:
    """`module:function` or `path/to/file.py:function`, called as function(prediction, reference) -> dict.

    Modules are looked up from the working directory and the `search` folders too (the config file's
    folder and its parents), since a task's scorer usually sits beside its data, not in an installed package.
    """
    module_name, _, function_name = spec.rpartition(":")
    if not module_name or not function_name:
        raise ConfigError(f"eval.scorer: {spec!r} should be module:function, e.g. examples.godrive.generate:score")
    try:
        if module_name.endswith(".py"):
            module = _load_file(Path(module_name), search or [])
        else:
            for folder in [Path.cwd(), *(search or [])]:
                if str(folder) not in sys.path:
                    sys.path.append(str(folder))
            module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ConfigError(f"eval.scorer: cannot import {module_name!r}: {exc}") from exc
    function = getattr(module, function_name, None)
    if not callable(function):
        raise ConfigError(f"eval.scorer: {module_name} has no function {function_name!r}")
    return function


def _load_file(path: Path, search: list[Path]) -> Any:
    candidates = [path] if path.is_absolute() else [Path.cwd() / path, *(folder / path for folder in search)]
    for candidate in candidates:
        if candidate.is_file():
            name = f"tunesmith_scorer_{candidate.stem}"
            spec = importlib.util.spec_from_file_location(name, candidate)
            module = importlib.util.module_from_spec(spec)
            sys.modules[name] = module  # dataclasses in the scorer's file look their module up here
            spec.loader.exec_module(module)
            return module
    raise ImportError(f"no file {path}")


def mean_scores(per_case: list[dict[str, Any]]) -> dict[str, float | None]:
    """The mean of each score over the answers that have it: a task scorer returns None where a score does not
    apply (goDrive's recall of a rule the reference does not give), and that answer then does not count."""
    keys = list(dict.fromkeys(key for scores in per_case for key in scores))
    means: dict[str, float | None] = {}
    for key in keys:
        values = [scores[key] for scores in per_case if scores.get(key) is not None]
        means[key] = sum(values) / len(values) if values else None
    return means


def score_all(prediction: str, reference: str, expect: str, task: Scorer | None) -> dict[str, Any]:
    scores: dict[str, Any] = {
        "exact_match": exact_match(prediction, reference),
        "edit_similarity": round(edit_similarity(prediction, reference), 4),
    }
    if expect == "json":
        scores["json_valid"] = json_valid(prediction, reference)
    if task is not None:
        for name, value in task(prediction, reference).items():
            scores.setdefault(name, value)
    return scores
