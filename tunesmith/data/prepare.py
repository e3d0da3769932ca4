"""The data stage: load → validate → dedupe → split → tokenize → length report, written to runs/<name>/data.

`prepare(config, tokenizer) -> Prepared` with `.train` and `.eval` (lists of {"input_ids", "labels"}),
the matching `.train_examples` / `.eval_examples` (messages + source), and `.stats` (also written as
`data/stats.json`, next to the splits `data/train.jsonl` and `data/validation.jsonl`, each written atomically).
Everything that removes or changes an example is counted in the stats and logged: skipped records,
duplicates, stripped <think> blocks, truncated or dropped overlong examples.

The split the data stage wrote is read back, not made again, while it is current: stats.json records what it
was made from (the digest of the data files, the data section, the split's seed, the length limit and the
tokenizer) and the digest of each split file, and both must match. So the pipeline's train stage, and a
resumed training, train on exactly the examples the data stage wrote and reported, without loading the files
twice; a changed file or setting makes a new split.
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
from tunesmith.data.source import Source
from tunesmith.data.split import dedupe, overlap, split
from tunesmith.data.stats import length_stats
from tunesmith.data.validate import Example, LoadReport, load_examples
from tunesmith.digest import file_sha256, files_sha256
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
    run = Run.of(config)
    made_from = split_inputs(config, tokenizer)
    recorded = current_split(run, made_from)
    if recorded is not None:
        log.info("data: %s and %s are current (same data files and settings): read back, not split again",
                 run.train_split, run.eval_split)
        return _encode(config, tokenizer, read_split(run.train_split), read_split(run.eval_split)).prepared(recorded)

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

    encoded = _encode(config, tokenizer, train_examples, eval_examples)
    stats: dict[str, Any] = {
        "train_file": data.train_file,
        "train_file_sha256": file_sha256(data.train_file) if Path(data.train_file).is_file() else None,
        "eval_file": data.eval_file,
        "load": train_report.to_dict(),
        "eval_load": eval_report.to_dict() if eval_report else None,
        "shape": train_report.shape,
        "duplicates_count": len(duplicates),
        "duplicates": duplicates,
        "eval_in_train_count": len(leaked),
        "eval_in_train": leaked,
        "split": {"train": len(encoded.train), "eval": len(encoded.eval), "eval_fraction": data.eval_fraction,
                  "seed": config.train.seed, "from_eval_file": bool(data.eval_file)},
        "tokens": {"train": length_stats(encoded.train_lengths, encoded.max_length),
                   "eval": length_stats(encoded.eval_lengths, encoded.max_length)},
        "trained_tokens": length_stats(encoded.trained),
        "max_seq_length": encoded.max_length,
        "overlength_policy": data.overlength,
        "overlength_count": len(encoded.overlong),
        "overlength": encoded.overlong,
        "think": data.think,
        "think_stripped": encoded.think_stripped,
        "loss_on": config.train.loss_on,
        "made_from": made_from,
    }
    _write_jsonl(run.train_split, encoded.train_examples)
    _write_jsonl(run.eval_split, encoded.eval_examples)
    stats["split_sha256"] = _split_digests(run)
    write_json(run.stats, stats)  # last: the split is current only once its record is written
    run.duplicates.unlink(missing_ok=True)
    if duplicates:
        write_text(run.duplicates, "".join(line + "\n" for line in duplicates))
    _summarize("duplicates removed (data.dedupe)", duplicates, run.duplicates, logging.INFO)
    _summarize(f"examples over train.max_seq_length {encoded.max_length} ({data.overlength})", encoded.overlong,
               run.stats, logging.WARNING)
    _summarize("eval examples also in training", leaked, run.stats, logging.WARNING)
    return encoded.prepared(stats)


@dataclass
class _Encoded:
    """Both parts of the split tokenized and fitted to train.max_seq_length, with what that did."""

    max_length: int
    train: list[dict[str, list[int]]] = field(default_factory=list)
    eval: list[dict[str, list[int]]] = field(default_factory=list)
    train_examples: list[Example] = field(default_factory=list)
    eval_examples: list[Example] = field(default_factory=list)
    train_lengths: list[int] = field(default_factory=list)
    eval_lengths: list[int] = field(default_factory=list)
    trained: list[int] = field(default_factory=list)
    """Trained tokens per training example."""
    overlong: list[str] = field(default_factory=list)
    think_stripped: int = 0

    def prepared(self, stats: dict[str, Any]) -> Prepared:
        return Prepared(self.train, self.eval, stats, self.train_examples, self.eval_examples)


def _encode(config: Config, tokenizer: Any, train_examples: list[Example], eval_examples: list[Example]) -> _Encoded:
    data = config.data
    encoded = _Encoded(config.train.max_seq_length)
    for part, is_train in ((train_examples, True), (eval_examples, False)):
        for example, tokens in zip(part, tokenize_many(tokenizer, part, data, config.train)):
            if data.think == "strip":
                encoded.think_stripped += any("<think>" in m["content"] for m in example.messages
                                              if m["role"] == "assistant")
            if not any(label != IGNORE_INDEX for label in tokens["labels"]):
                raise DataError(f"{example.source}: no token is trained (all labels are -100)",
                                "the chat template may drop assistant turns; check with tunesmith data inspect")
            (encoded.train_lengths if is_train else encoded.eval_lengths).append(len(tokens["input_ids"]))
            fitted = fit_length(tokens, encoded.max_length, data.overlength)
            if fitted is not tokens:
                action = "dropped" if fitted is None else "truncated"
                encoded.overlong.append(f"{example.source}: {len(tokens['input_ids'])} tokens > "
                                        f"train.max_seq_length {encoded.max_length}, {action}")
            if fitted is None:
                continue
            (encoded.train if is_train else encoded.eval).append(fitted)
            (encoded.train_examples if is_train else encoded.eval_examples).append(example)
            if is_train:
                encoded.trained.append(sum(1 for label in fitted["labels"] if label != IGNORE_INDEX))
    if not encoded.train:
        raise DataError(f"{data.train_file}: no training example left after the length check "
                        f"(train.max_seq_length {encoded.max_length}, data.overlength {data.overlength})",
                        "raise train.max_seq_length or set data.overlength: truncate")
    return encoded


SPLIT_FORMAT = 1
"""Part of what a split is made from: raised when prepare() changes what it writes, so older splits are made again."""


def split_inputs(config: Config, tokenizer: Any) -> dict[str, Any]:
    """What the split depends on, as stats.json records it: the data files' bytes (a `datasets` folder's every
    file), the data section (but test_file, which the split never reads), the seed that draws it, and what decides
    which examples fit: train.max_seq_length, loss_on, the base model and its chat template."""
    data = config.data
    template = getattr(tokenizer, "chat_template", None)
    return {
        "format": SPLIT_FORMAT,
        "files_sha256": files_sha256([data.train_file, data.eval_file]),
        "data": data.model_dump(mode="json", exclude={"test_file"}),
        "seed": config.train.seed,
        "max_seq_length": config.train.max_seq_length,
        "loss_on": config.train.loss_on,
        "model": {"base": config.model.base, "revision": config.model.revision},
        "chat_template_sha256": hashlib.sha256(str(template).encode("utf-8")).hexdigest(),
        "vocabulary": len(tokenizer),
    }


def current_split(run: Run, made_from: dict[str, Any]) -> dict[str, Any] | None:
    """The data stage's stats when the split on disk was made from exactly `made_from` and is as it was written
    (each file's digest); else None (no split yet, another input or setting, or a split edited by hand)."""
    try:
        stats = json.loads(run.stats.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(stats, dict) or stats.get("made_from") != made_from:
        return None
    if stats.get("split_sha256") != _split_digests(run):
        return None
    return stats


def _split_digests(run: Run) -> dict[str, str | None]:
    return {name: file_sha256(path) if path.is_file() else None
            for name, path in (("train", run.train_split), ("eval", run.eval_split))}


def read_split(path: Path) -> list[Example]:
    """The examples of a split file (data/train.jsonl, data/validation.jsonl) as `_write_jsonl` wrote them, each
    with the place in the data file it came from (a row without one is placed in the split file itself)."""
    examples = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if line.strip():
            row = json.loads(line)
            source = row.get("source") or {}
            examples.append(Example(row["messages"], Source(source.get("file", str(path)),
                                                            source.get("index", number - 1),
                                                            source.get("line", number))))
    return examples


SHOWN = 3


def _summarize(what: str, lines: list[str], where: Path, level: int) -> None:
    """The count and the first SHOWN lines (65 duplicates were once 65 lines); every line with --debug and in
    `where`."""
    if not lines:
        return
    for line in lines:
        log.debug("%s", line)
    more = f" (the first {SHOWN}; all of them in {where}, and with --debug)" if len(lines) > SHOWN else ""
    log.log(level, "%d %s%s:", len(lines), what, more)
    for line in lines[:SHOWN]:
        log.log(level, "  %s", line)


def _write_jsonl(path: Path, examples: list[Example]) -> None:
    with atomic_path(path) as tmp, tmp.open("w", encoding="utf-8") as f:
        for example in examples:
            source = {"file": example.source.file, "line": example.source.line, "index": example.source.index}
            f.write(json.dumps({"messages": example.messages, "source": source}, ensure_ascii=False) + "\n")

