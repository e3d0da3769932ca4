"""Load a data file into `Example`s: read, detect the shape, check every record, apply `data.system_prompt`.

`data.on_error: stop` (default) raises `DataError` at the first bad record, naming file, line or record
index, field and problem. `skip` leaves bad records out, but logs each one and keeps it in the
`LoadReport` (`report.skipped`); nothing is ever dropped silently. A file mixing shapes is always an
error (it names the first record of each shape): guessing which half is wrong is not ours to do.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tunesmith.config import DataConfig
from tunesmith.data import shapes
from tunesmith.data.readers import detect_kind, read_records
from tunesmith.data.source import RecordError, Source
from tunesmith.errors import DataError

log = logging.getLogger("tunesmith.data")


@dataclass
class Example:
    """One training conversation: `messages` are {"role", "content"} dicts (system?, user, assistant, ...)."""

    messages: list[dict[str, str]]
    source: Source


@dataclass
class LoadReport:
    path: str
    reader: str = ""
    shape: str | None = None
    records: int = 0
    """Records read, good and bad (blank JSONL lines are not records)."""
    loaded: int = 0
    skipped: list[str] = field(default_factory=list)
    """One line per skipped record: where, which field, what is wrong."""
    ignored_fields: Counter[str] = field(default_factory=Counter)
    """Keys outside the shape (ids, tags), with how many records had each; they are not trained on."""
    system_prompt_added: int = 0

    def to_dict(self) -> dict[str, Any]:
        return {
            "path": self.path, "reader": self.reader, "shape": self.shape, "records": self.records,
            "loaded": self.loaded, "skipped_count": len(self.skipped), "skipped": self.skipped,
            "ignored_fields": dict(self.ignored_fields), "system_prompt_added": self.system_prompt_added,
        }


def iter_examples(path: str | Path, data_cfg: DataConfig, report: LoadReport | None = None) -> Iterator[Example]:
    """Yield the file's examples one by one (memory stays flat for JSONL); fill `report` as it goes."""
    report = report if report is not None else LoadReport(str(path))
    report.reader = detect_kind(Path(path))
    fixed = None if data_cfg.format == "auto" else data_cfg.format
    first_of: dict[str, Source] = {}
    for raw in read_records(path):
        report.records += 1
        try:
            if raw.error is not None:
                raise raw.error
            record = shapes.rename(raw.value, data_cfg.fields)
            shape = fixed or shapes.detect_shape(record)
            if shape is None:
                keys = ", ".join(repr(k) for k in raw.value) or "none"
                raise RecordError(None, f"no known record shape: the record has keys {keys}; expected "
                                        f"{shapes.describe_shapes()}")
            if fixed is None and shape not in first_of:
                first_of[shape] = raw.source
                if len(first_of) > 1:
                    (a, a_src), (b, b_src) = list(first_of.items())[:2]
                    raise DataError(
                        f"{raw.source.file}: mixed record shapes: {a_src} is {a} but {b_src} is {b}",
                        "one file holds one shape; convert the records, or set data.format to check against one")
            report.shape = report.shape or shape
            messages = shapes.to_messages(shape, record, data_cfg.fields)
        except RecordError as exc:
            if data_cfg.on_error == "stop":
                raise exc.to_data_error(raw.source, _hint(raw.value, data_cfg)) from None
            line = exc.describe(raw.source)
            log.warning("skipped: %s", line)
            report.skipped.append(line)
            continue
        for key in shapes.extra_keys(shape, record):
            report.ignored_fields[key] += 1
        if messages[0]["role"] != "system" and data_cfg.system_prompt:
            messages.insert(0, {"role": "system", "content": data_cfg.system_prompt})
            report.system_prompt_added += 1
        report.loaded += 1
        yield Example(messages, raw.source)
    if report.records == 0:
        raise DataError(f"{path}: no records in the file")
    if report.skipped:
        log.warning("%s: skipped %d of %d records (data.on_error: skip)", path, len(report.skipped), report.records)
    if report.loaded == 0:
        raise DataError(f"{path}: none of its {report.records} records is valid",
                        f"first problem: {report.skipped[0]}" if report.skipped else None)


def _hint(record: dict[str, Any] | None, data_cfg: DataConfig) -> str:
    looks_like = shapes.detect_shape(shapes.rename(record, data_cfg.fields)) if record is not None else None
    if data_cfg.format != "auto" and looks_like not in (None, data_cfg.format):
        return f"data.format is {data_cfg.format}, but the record looks like {looks_like}: set data.format: auto"
    return "fix the record, or set data.on_error: skip to leave bad records out (each is reported)"


def load_examples(path: str | Path, data_cfg: DataConfig, report: LoadReport | None = None) -> list[Example]:
    """All of the file's valid examples, in file order; pass a `LoadReport` to see counts and skips."""
    return list(iter_examples(path, data_cfg, report))


def validate_file(path: str | Path, data_cfg: DataConfig) -> LoadReport:
    """Check every record without keeping any (constant memory for JSON Lines); return the report."""
    report = LoadReport(str(path))
    for _ in iter_examples(path, data_cfg, report):
        pass
    return report
