"""Scores of answers against their references, each a number in [0, 1] (None where a score does not apply).

Evaluation (`tunesmith eval`), training's accuracy probe and export's choice of the Modelfile's GGUF all score
with these, so their figures mean the same. Beside the headline scores (exact match, edit similarity, JSON
validity, a task scorer's), detail scores named `kind:name` say what is wrong:
- `field:NAME` when references are JSON objects: whether the answer has that field right;
- `precision:LABEL` and `recall:LABEL` when the references are a few short labels (classification).
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
import inspect
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from rapidfuzz.distance import Levenshtein

from tunesmith.errors import ConfigError

Scorer = Callable[..., dict[str, float | None]]
"""function(prediction, reference) -> scores; one that also takes `prompt` gets the question too (goDrive's
scorer counts the rules an input fires, so that exact match is also shown where four or more fire)."""


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


def json_object(text: str) -> dict[str, Any] | None:
    """`text` parsed, when it is a JSON object."""
    try:
        value = json.loads(text)
    except ValueError:
        return None
    return value if isinstance(value, dict) else None


def field_scores(prediction: str, reference: str) -> dict[str, float]:
    """`field:NAME` for each top-level field of a reference that is a JSON object: 1 when the answer is a JSON
    object whose NAME holds the same JSON value (so key order and spacing do not count), else 0. Empty when the
    reference is not a JSON object."""
    expected = json_object(reference)
    if expected is None:
        return {}
    answered = json_object(prediction) or {}
    return {f"field:{name}": float(name in answered and answered[name] == value) for name, value in expected.items()}


MAX_LABELS = 20
MAX_LABEL_CHARS = 40


def label_set(references: list[str]) -> list[str] | None:
    """The labels, when the references look like a classification: 2 to MAX_LABELS distinct answers, each at
    most MAX_LABEL_CHARS characters and given at least twice on average (a handful of short free answers is
    not a label set), none a JSON object (those get per-field scores). None otherwise."""
    labels = list(dict.fromkeys(normalize(reference) for reference in references))
    if not 2 <= len(labels) <= MAX_LABELS or len(references) < 2 * len(labels):
        return None
    if any(len(label) > MAX_LABEL_CHARS or json_object(label) is not None for label in labels):
        return None
    return labels


def label_scores(prediction: str, reference: str, labels: list[str]) -> dict[str, float | None]:
    """`recall:LABEL` (where the reference is LABEL: whether the answer is too) and `precision:LABEL` (where the
    answer is LABEL: whether the reference is too), None elsewhere: their means over a test set are each label's
    recall and precision."""
    answered, expected = normalize(prediction), normalize(reference)
    scores: dict[str, float | None] = {}
    for label in labels:
        scores[f"precision:{label}"] = float(expected == label) if answered == label else None
        scores[f"recall:{label}"] = float(answered == label) if expected == label else None
    return scores


def load_scorer(spec: str, search: list[Path] | None = None) -> Scorer:
    """`module:function` or `path/to/file.py:function`, called as function(prediction, reference) -> dict, or
    function(prediction, reference, prompt=...) where it has a `prompt` parameter.

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


@functools.lru_cache(maxsize=32)
def _takes_prompt(task: Scorer) -> bool:
    try:
        return "prompt" in inspect.signature(task).parameters
    except (TypeError, ValueError):  # a builtin or C function: called the plain way
        return False


def score_all(prediction: str, reference: str, expect: str, task: Scorer | None,
              labels: list[str] | None = None, prompt: str | None = None) -> dict[str, Any]:
    """Every score of one answer: the headline ones, then the task scorer's, the per-field and per-label ones.
    `prompt` (the question's last user message) goes to a task scorer that takes it."""
    scores: dict[str, Any] = {
        "exact_match": exact_match(prediction, reference),
        "edit_similarity": round(edit_similarity(prediction, reference), 4),
    }
    if expect == "json":
        scores["json_valid"] = json_valid(prediction, reference)
    if task is not None:
        found = task(prediction, reference, prompt=prompt) if prompt is not None and _takes_prompt(task) else \
            task(prediction, reference)
        for name, value in found.items():
            scores.setdefault(name, value)
    for name, value in field_scores(prediction, reference).items():
        scores.setdefault(name, value)
    for name, value in (label_scores(prediction, reference, labels) if labels else {}).items():
        scores.setdefault(name, value)
    return scores


def score_answers(answers: list[str], references: list[str], expect: str, task: Scorer | None,
                  labels: list[str] | None = None, prompts: list[str] | None = None) -> list[dict[str, Any]]:
    """`score_all` for each answer; the label set is the references' (`label_set`) unless given (evaluation
    gives the whole test set's, so a model scored on a sample of it is scored on the same labels)."""
    labels = labels if labels is not None else label_set(references)
    prompts = prompts if prompts is not None else [None] * len(answers)
    return [score_all(answer, reference, expect, task, labels, prompt)
            for answer, reference, prompt in zip(answers, references, prompts)]
