"""`tunesmith eval`: generate answers for held-out examples with every model of a run and score them.

Models: `base` (the base checkpoint, no adapter), `finetuned` (base + the run's adapter), and each GGUF in
`runs/<name>/gguf/` (through llama.cpp). Prompts are rendered by the tokenizer's own chat template, the one
used in training, so all models see identical prompts; greedy decoding, so results are reproducible.
Writes `runs/<name>/eval.jsonl` (one line per example and model) and returns the summary.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from tunesmith import inference
from tunesmith.atomic import atomic_path
from tunesmith.config import Config
from tunesmith.errors import ConfigError
from tunesmith.evaluate.scorers import load_scorer, mean_scores, score_all
from tunesmith.run import Run, held_out_file


@dataclass
class Case:
    messages: list[dict[str, str]]
    reference: str
    source: str


@dataclass
class ModelScores:
    model: str
    n: int
    means: dict[str, float]
    seconds: float
    answers: list[str] = field(repr=False, default_factory=list)


def load_cases(path: str | Path, config: Config, limit: int | None) -> list[Case]:
    from tunesmith.data import load_examples

    cases = []
    for example in load_examples(path, config.data):
        messages = list(example.messages)
        if not messages or messages[-1]["role"] != "assistant":
            continue
        cases.append(Case(messages[:-1], messages[-1]["content"], str(getattr(example, "source", ""))))
        if limit and len(cases) >= limit:
            break
    return cases


def evaluated_models(run_dir: Path) -> set[str]:
    return {row["model"] for row in _rows(run_dir)}


def _rows(run_dir: Path) -> list[dict[str, Any]]:
    path = Run(run_dir).eval_answers
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def summarize(run_dir: Path) -> list[ModelScores]:
    """Per-model means of everything in eval.jsonl (for the report), in the order models were added."""
    by_model: dict[str, list[dict[str, Any]]] = {}
    for row in _rows(run_dir):
        by_model.setdefault(row["model"], []).append(row)
    results = []
    for model, rows in by_model.items():
        means = mean_scores([row["scores"] for row in rows])
        results.append(ModelScores(model, len(rows), means, rows[0].get("seconds", 0.0),
                                   [row["answer"] for row in rows]))
    return results


def evaluate(config: Config, run_dir: Path, file: str | Path | None, models: list[str], console: Console,
             limit: int | None = None, keep_existing: bool = False) -> list[ModelScores]:
    file = file or held_out_file(config)
    if not file:
        raise ConfigError("nothing to evaluate on: set eval.file (or data.test_file) or pass --file")
    cases = load_cases(file, config, limit or config.eval.limit)
    task = load_scorer(config.eval.scorer) if config.eval.scorer else None
    results = []
    rows: list[dict[str, Any]] = [row for row in _rows(run_dir) if row["model"] not in models] if keep_existing else []
    for name in models:
        started = time.perf_counter()
        console.print(f"eval: {name} on {len(cases)} examples from {file}")
        answers = _answers(name, config, run_dir, cases)
        seconds = time.perf_counter() - started
        per_case = [score_all(answer, case.reference, config.eval.expect, task) for answer, case in zip(answers, cases)]
        means = mean_scores(per_case)
        results.append(ModelScores(name, len(cases), means, seconds, answers))
        for index, (case, answer, scores) in enumerate(zip(cases, answers, per_case)):
            rows.append({"index": index, "model": name, "prompt": case.messages[-1]["content"],
                         "reference": case.reference, "answer": answer, "scores": scores,
                         "seconds": round(seconds, 1)})
    with atomic_path(Run(run_dir).eval_answers) as tmp:
        tmp.write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows), encoding="utf-8")
    return results


def _answers(name: str, config: Config, run_dir: Path, cases: list[Case]) -> list[str]:
    conversations = [case.messages for case in cases]
    max_new = config.eval.max_new_tokens
    if name in ("base", "finetuned"):
        model, tokenizer = (inference.load_finetuned(run_dir, config) if name == "finetuned"
                            else inference.load(config, None))
        if name == "finetuned" and config.train.method == "lora":
            model = model.merge_and_unload()  # same answers, no per-layer adapter overhead while generating
        return inference.generate_batch(model, tokenizer, conversations, config, max_new)
    return gguf_answers(Path(name), config, conversations, max_new)


def stored_answers(run_dir: Path, model: str, cases: list[Case]) -> list[str] | None:
    """`model`'s answers to exactly these cases from eval.jsonl, or None when it has not answered them all."""
    rows = {row["index"]: row for row in _rows(run_dir) if row["model"] == model}
    answers = []
    for index, case in enumerate(cases):
        row = rows.get(index)
        if row is None or row["prompt"] != case.messages[-1]["content"] or row["reference"] != case.reference:
            return None
        answers.append(row["answer"])
    return answers


def gguf_answers(gguf: Path, config: Config, conversations: list[list[dict[str, str]]], max_new: int) -> list[str]:
    """Greedy answers of a GGUF through llama.cpp, prompted with the training template's token ids."""
    from tunesmith.models import load_tokenizer, resolve_base
    from tunesmith.serve.engine import open_llama

    tokenizer = load_tokenizer(resolve_base(config.model.base, config.model.revision))
    # open_llama: the thread settings the server uses (llama.cpp's default spin-waits on busy cores)
    llm = open_llama(gguf, n_ctx=2048)
    stop = inference.stop_ids(tokenizer) | {llm.token_eos()}
    answers = []
    for messages in conversations:
        ids = inference.prompt_ids(tokenizer, messages, config)
        out = []
        for token in llm.generate(ids, temp=0.0, top_k=1, reset=True):
            if token in stop or len(out) >= max_new:
                break
            out.append(token)
        answers.append(inference.answer_text(tokenizer, out, cut=len(out) >= max_new))
    return answers


def gguf_models(run_dir: Path) -> list[str]:
    """The exported model files of a run, as eval names them (not the LoRA-only GGUF, which needs its base)."""
    return [str(path) for path in Run(run_dir).ggufs()]


def print_summary(results: list[ModelScores], console: Console) -> None:
    """One column per model, one row per score: a task scorer can add dozens of per-rule scores, which as
    columns would not fit a terminal (rich squeezed them to nothing in an 80-column `make demo` log)."""
    keys = list(dict.fromkeys(key for result in results for key in result.means))
    headline = [key for key in keys if ":" not in key]  # exact_match, edit_similarity, json_valid, the task's F1...
    table = Table(title="evaluation (mean over held-out examples)")
    table.add_column("score")
    for result in results:
        table.add_column(model_label(result.model), justify="right")
    table.add_row("examples", *[str(result.n) for result in results])
    for key in headline + [key for key in keys if ":" in key]:
        table.add_row(key, *[f"{result.means[key]:.3f}" if result.means.get(key) is not None else "–"
                             for result in results],
                      end_section=key == headline[-1] if headline else False)
    table.add_row("seconds", *[f"{result.seconds:.0f}" for result in results])
    console.print(table)


def model_label(model: str) -> str:
    """How tables name a model: `base`, `finetuned`, or a GGUF's file name (runs/goDrive/gguf/goDrive.q8_0.gguf ->
    goDrive.q8_0.gguf): its whole path is too long for a column, and the quantization alone does not say which
    file it was."""
    return Path(model).name if model.endswith(".gguf") else model
