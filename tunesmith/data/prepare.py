"""The data stage: load → validate → dedupe → split → tokenize → length report, written to runs/<name>/data.

`prepare(config, tokenizer) -> Prepared` with `.train` and `.eval` (lists of {"input_ids", "labels"}),
the matching `.train_examples` / `.eval_examples` (messages + source), and `.stats` (also written as
`data/stats.json`, next to the splits `data/train.jsonl` and `data/validation.jsonl`, each written atomically).
Everything that removes or changes an example is counted in the stats and logged: skipped records,
duplicates, stripped <think> blocks, truncated or dropped overlong examples.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tunesmith.atomic import atomic_path, write_json, write_text
from tunesmith.config import Config
from tunesmith.data.render import IGNORE_INDEX, fit_length, tokenize_many
from tunesmith.data.split import dedupe, overlap, split
from tunesmith.data.stats import length_stats
from tunesmith.data.validate import Example, LoadReport, load_examples
from tunesmith.errors import DataError
from tunesmith.run import Run

log = logging.getLogger("tunesmith.data")


@dataclass
class Prepared:
    train: list[dict[str, list[int]]]
    eval: list[dict[str, list[int]]]
    stats: dict[str, Any]
    train_examples: list[Example] = field(default_factory=list)
    eval_examples: list[Example] = field(default_factory=list)


def prepare(config: Config, tokenizer: Any) -> Prepared:
    data = config.data
    if not data.train_file:
        raise DataError("data.train_file is not set", "name your JSON, JSONL, CSV or Parquet file in the config")
    train_report = LoadReport(data.train_file)
    examples = load_examples(data.train_file, data, train_report)
    duplicates: list[str] = []
    if data.dedupe:
        examples, duplicates = dedupe(examples)
    eval_report = None
    leaked: list[str] = []
    if data.eval_file:
        eval_report = LoadReport(data.eval_file)
        train_examples, eval_examples = examples, load_examples(data.eval_file, data, eval_report)
        if data.dedupe:
            eval_examples, eval_dups = dedupe(eval_examples)
            duplicates += eval_dups
        leaked = overlap(train_examples, eval_examples)
    else:
        train_examples, eval_examples = split(examples, data.eval_fraction, config.train.seed)

    max_length = config.train.max_seq_length
    overlong: list[str] = []
    think_stripped = 0

    def encode(part: list[Example]) -> tuple[list[dict[str, list[int]]], list[Example], list[int], list[int]]:
        nonlocal think_stripped
        kept, kept_examples, lengths, trained = [], [], [], []
        for example, tokens in zip(part, tokenize_many(tokenizer, part, data, config.train)):
            if data.think == "strip":
                think_stripped += any("<think>" in m["content"] for m in example.messages if m["role"] == "assistant")
            if not any(label != IGNORE_INDEX for label in tokens["labels"]):
                raise DataError(f"{example.source}: no token is trained (all labels are -100)",
                                "the chat template may drop assistant turns; check with tunesmith data inspect")
            lengths.append(len(tokens["input_ids"]))
            fitted = fit_length(tokens, max_length, data.overlength)
            if fitted is not tokens:
                action = "dropped" if fitted is None else "truncated"
                overlong.append(f"{example.source}: {len(tokens['input_ids'])} tokens > train.max_seq_length "
                                f"{max_length}, {action}")
            if fitted is None:
                continue
            kept.append(fitted)
            kept_examples.append(example)
            trained.append(sum(1 for label in fitted["labels"] if label != IGNORE_INDEX))
        return kept, kept_examples, lengths, trained

    train, train_examples, train_lengths, train_trained = encode(train_examples)
    evaluation, eval_examples, eval_lengths, _ = encode(eval_examples)
    if not train:
        raise DataError(f"{data.train_file}: no training example left after the length check "
                        f"(train.max_seq_length {max_length}, data.overlength {data.overlength})",
                        "raise train.max_seq_length or set data.overlength: truncate")

    stats: dict[str, Any] = {
        "train_file": data.train_file,
        "train_file_sha256": _sha256(data.train_file),
        "eval_file": data.eval_file,
        "load": train_report.to_dict(),
        "eval_load": eval_report.to_dict() if eval_report else None,
        "shape": train_report.shape,
        "duplicates_count": len(duplicates),
        "duplicates": duplicates,
        "eval_in_train_count": len(leaked),
        "eval_in_train": leaked,
        "split": {"train": len(train), "eval": len(evaluation), "eval_fraction": data.eval_fraction,
                  "seed": config.train.seed, "from_eval_file": bool(data.eval_file)},
        "tokens": {"train": length_stats(train_lengths, max_length), "eval": length_stats(eval_lengths, max_length)},
        "trained_tokens": length_stats(train_trained),
        "max_seq_length": max_length,
        "overlength_policy": data.overlength,
        "overlength_count": len(overlong),
        "overlength": overlong,
        "think": data.think,
        "think_stripped": think_stripped,
        "loss_on": config.train.loss_on,
    }
    run = Run.of(config)
    _write_jsonl(run.train_split, train_examples)
    _write_jsonl(run.eval_split, eval_examples)
    write_json(run.stats, stats)
    run.duplicates.unlink(missing_ok=True)
    if duplicates:
        write_text(run.duplicates, "".join(line + "\n" for line in duplicates))
    _summarize("duplicates removed (data.dedupe)", duplicates, run.duplicates, logging.INFO)
    _summarize(f"examples over train.max_seq_length {max_length} ({data.overlength})", overlong,
               run.stats, logging.WARNING)
    _summarize("eval examples also in training", leaked, run.stats, logging.WARNING)
    return Prepared(train, evaluation, stats, train_examples, eval_examples)


SHOWN = 3
_said: set[tuple[str, int, str, str]] = set()


def _summarize(what: str, lines: list[str], where: Path, level: int) -> None:
    """The count and the first SHOWN lines, once per process (the pipeline prepares the data in its data stage
    and again in the train stage: 65 duplicates were 130 lines); every line with --debug and in `where`."""
    if not lines:
        return
    for line in lines:
        log.debug("%s", line)
    key = (what, len(lines), lines[0], str(where))
    if key in _said:
        return
    _said.add(key)
    more = f" (the first {SHOWN}; all of them in {where}, and with --debug)" if len(lines) > SHOWN else ""
    log.log(level, "%d %s%s:", len(lines), what, more)
    for line in lines[:SHOWN]:
        log.log(level, "  %s", line)


def _write_jsonl(path: Path, examples: list[Example]) -> None:
    with atomic_path(path) as tmp, tmp.open("w", encoding="utf-8") as f:
        for example in examples:
            source = {"file": example.source.file, "line": example.source.line, "index": example.source.index}
            f.write(json.dumps({"messages": example.messages, "source": source}, ensure_ascii=False) + "\n")


def _sha256(path: str) -> str | None:
    p = Path(path)
    if not p.is_file():
        return None  # a `datasets` folder: its own fingerprint is elsewhere
    digest = hashlib.sha256()
    with p.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
