"""`tunesmith eval`: every model of a run answers the same held-out examples, scored side by side.

Models: `base` (the base checkpoint, no adapter: only the first `eval.base_examples`, since it shows the "before"),
`finetuned` (base + the run's adapter), and each GGUF in `runs/<name>/gguf/`. Their greedy answers come from
tunesmith/inference (Hugging Face models in batches; GGUFs through the server's batched decoder, or the answers
export already gave, kept in fidelity.json); prompts are rendered by the training chat template, so every model
sees the same prompts. Scores (tunesmith/scorers.py): exact match, edit similarity, JSON validity, per-field and
per-label detail, the task's own. Held-out examples that repeat training examples (data/near_duplicates.py) are
scored apart from the rest. Writes `runs/<name>/eval.jsonl` (one line per example and model) and returns the
summary.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from tunesmith.atomic import atomic_path
from tunesmith.config import Config
from tunesmith.data import near_duplicates
from tunesmith.data.prepare import read_split
from tunesmith.errors import ConfigError
from tunesmith.inference.answer import answers as model_answers
from tunesmith.inference.cases import Case, cases_digest, load_cases
from tunesmith.run import Run, held_out_file
from tunesmith.scorers import label_set, load_scorer, mean_scores, score_answers

SEEN = "repeats training"
UNSEEN = "new"


@dataclass
class ModelScores:
    model: str
    n: int
    means: dict[str, float]
    seconds: float
    answers: list[str] = field(repr=False, default_factory=list)
    apart: dict[str, tuple[int, dict[str, float | None]]] = field(default_factory=dict)
    """SEEN and UNSEEN: (how many examples, their mean scores), when some held-out examples repeat training."""


def evaluated_models(run: Run) -> set[str]:
    return {row["model"] for row in run.eval_rows()}


def summarize(run: Run) -> list[ModelScores]:
    """Per-model means of everything in eval.jsonl (for the report)."""
    return scores_of(run.eval_rows())


def scores_of(rows: list[dict[str, Any]]) -> list[ModelScores]:
    """Per-model means of eval.jsonl's rows, in the order models were added."""
    by_model: dict[str, list[dict[str, Any]]] = {}
    for row in rows:
        by_model.setdefault(row["model"], []).append(row)
    return [_scores(model, model_rows, model_rows[0].get("seconds", 0.0)) for model, model_rows in by_model.items()]


def _scores(model: str, rows: list[dict[str, Any]], seconds: float) -> ModelScores:
    result = ModelScores(model, len(rows), mean_scores([row["scores"] for row in rows]), seconds,
                         [row["answer"] for row in rows])
    seen = [row for row in rows if row.get("repeats")]
    if seen:
        unseen = [row for row in rows if not row.get("repeats")]
        result.apart = {SEEN: (len(seen), mean_scores([row["scores"] for row in seen])),
                        UNSEEN: (len(unseen), mean_scores([row["scores"] for row in unseen]))}
    return result


def evaluate(config: Config, run: Run, file: str | Path | None, models: list[str], console: Console,
             limit: int | None = None, keep_existing: bool = False) -> list[ModelScores]:
    file = file or held_out_file(config)
    if not file:
        raise ConfigError("nothing to evaluate on: set eval.file (or data.test_file) or pass --file")
    cases = load_cases(file, config, limit or config.eval.limit)
    task = load_scorer(config.eval.scorer) if config.eval.scorer else None
    labels = label_set([case.reference for case in cases])
    repeats = repeated_training(config, run, cases)
    if any(repeats):
        console.print(f"eval: {near_duplicates.summary(repeats, config.eval.near_duplicate_similarity)}; they are "
                      "scored apart", highlight=False)
    results = []
    rows: list[dict[str, Any]] = [row for row in run.eval_rows() if row["model"] not in models] if keep_existing else []
    for name in models:
        chosen = cases[:config.eval.base_examples] if name == "base" else cases
        started = time.perf_counter()
        answers = _exported_answers(run, name, chosen)
        if answers is None:
            console.print(f"eval: {model_label(name)} on {len(chosen)} examples from {file}")
            answers = model_answers(name, config, run, [case.messages for case in chosen],
                                    [case.reference for case in chosen])
        else:
            console.print(f"eval: {model_label(name)}: the answers export gave to these {len(chosen)} examples")
        seconds = time.perf_counter() - started
        per_case = score_answers(answers, [case.reference for case in chosen], config.eval.expect, task, labels,
                                 [case.prompt for case in chosen])
        model_rows = []
        for index, (case, answer, scores) in enumerate(zip(chosen, answers, per_case)):
            repeat = repeats[index]
            model_rows.append({"index": index, "model": name, "prompt": case.prompt, "reference": case.reference,
                               "answer": answer, "scores": scores, "seconds": round(seconds, 1),
                               "repeats": None if repeat is None else {"kind": repeat.kind,
                                                                       "similarity": repeat.similarity,
                                                                       "training": repeat.training_source}})
        results.append(_scores(name, model_rows, seconds))
        rows += model_rows
    with atomic_path(run.eval_answers) as tmp:
        tmp.write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows), encoding="utf-8")
    return results


def repeated_training(config: Config, run: Run, cases: list[Case]) -> list[near_duplicates.Repeat | None]:
    """For each case, the training example it repeats (data/near_duplicates.py): the training split the data
    stage wrote, else data.train_file; all None when there is neither."""
    training = training_examples(config, run)
    held_out = [(near_duplicates.input_text(case.messages), case.reference) for case in cases]
    if not training:
        return [None] * len(cases)
    return near_duplicates.find_repeats(training, held_out, config.eval.near_duplicate_similarity)


def training_examples(config: Config, run: Run) -> list[tuple[str, str, str]]:
    """(input, answer, where) of each training example."""
    if run.train_split.is_file():
        examples = read_split(run.train_split)
    elif config.data.train_file and Path(config.data.train_file).exists():
        from tunesmith.data import load_examples

        examples = load_examples(config.data.train_file, config.data)
    else:
        return []
    return [(*pair, str(example.source)) for example in examples
            if (pair := near_duplicates.split_example(list(example.messages)))]


def _exported_answers(run: Run, name: str, cases: list[Case]) -> list[str] | None:
    """A GGUF's answers to exactly these cases as export recorded them in fidelity.json, else None."""
    if not name.endswith(".gguf") or not run.fidelity.is_file():
        return None
    recorded = json.loads(run.fidelity.read_text(encoding="utf-8"))
    if recorded.get("cases") != cases_digest(cases):
        return None
    for entry in recorded.get("quantizations", []):
        if Path(entry.get("path", "")).resolve() == Path(name).resolve() and len(entry.get("answers", [])) == len(cases):
            return entry["answers"]
    return None


def gguf_models(run: Run) -> list[str]:
    """The exported model files of a run, as eval names them (not the LoRA-only GGUF, which needs its base)."""
    return [str(path) for path in run.ggufs()]


def scored_gguf_models(run: Run) -> list[str]:
    """The GGUFs export answered the whole held-out set with (the Modelfile's among them; a larger one answered
    only the fidelity prompts: export._fidelity), whose answers eval reuses; every GGUF when export scored none.
    The pipeline scores these: answering the others again would spend the time export saved."""
    recorded = json.loads(run.fidelity.read_text(encoding="utf-8")) if run.fidelity.is_file() else {}
    whole = {Path(entry["path"]).resolve() for entry in recorded.get("quantizations", [])
             if entry.get("exact_match") is not None and entry.get("path")}
    return [str(path) for path in run.ggufs() if path.resolve() in whole] or gguf_models(run)


def print_summary(results: list[ModelScores], console: Console) -> None:
    """One column per model, one row per score: a task scorer can add dozens of per-rule scores, which as
    columns would not fit a terminal (rich squeezed them to nothing in an 80-column `make demo` log)."""
    keys = list(dict.fromkeys(key for result in results for key in result.means))
    # exact_match, edit_similarity, json_valid, the task's F1..., then exact match on parts of the test set that a
    # task scorer names (goDrive's "exact_match:4+ rules"), then the detail (per rule, field, label)
    headline = [key for key in keys if ":" not in key] + [key for key in keys if key.startswith("exact_match:")]
    table = Table(title="evaluation (mean over held-out examples)")
    table.add_column("score")
    for result in results:
        table.add_column(model_label(result.model), justify="right")
    table.add_row("examples", *[str(result.n) for result in results])
    for key in headline + [key for key in keys if key not in headline]:
        table.add_row(key, *[f"{result.means[key]:.3f}" if result.means.get(key) is not None else "–"
                             for result in results],
                      end_section=key == headline[-1] if headline else False)
    table.add_row("seconds", *[f"{result.seconds:.0f}" for result in results])
    console.print(table)
    apart = [result for result in results if result.apart]
    if apart:
        split = Table(title="exact match: held-out examples that repeat a training example, and the rest")
        split.add_column("examples")
        for result in apart:
            split.add_column(model_label(result.model), justify="right")
        for part in (SEEN, UNSEEN):
            split.add_row(part, *[_count_and_score(*result.apart[part]) for result in apart])
        console.print(split)


def _count_and_score(n: int, means: dict[str, float | None]) -> str:
    value = means.get("exact_match")
    return f"{value:.3f} of {n}" if value is not None else f"– of {n}"


def model_label(model: str) -> str:
    """How tables name a model: `base`, `finetuned`, or a GGUF's file name (runs/goDrive/gguf/goDrive.q8_0.gguf ->
    goDrive.q8_0.gguf): its whole path is too long for a column, and the quantization alone does not say which
    file it was."""
    return Path(model).name if model.endswith(".gguf") else model
