"""Read records from JSON (array), JSON Lines, CSV/TSV, Parquet and `datasets` folders, one at a time.

`read_records(path)` yields `RawRecord`s: a record (a dict) with its `Source`, or the `RecordError` that
made it unreadable (bad JSON on one line, non-UTF-8 bytes on one line) so the loader can stop or skip it.
Problems with the whole file (missing, unknown type, a broken JSON array) raise `DataError` at once.
JSON Lines is read line by line, so a large file is never held in memory whole; JSON arrays and CSV
are read whole (they cannot be split into records without parsing everything before them).
"""

from __future__ import annotations

import csv
import io
import json
import re
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tunesmith.data.source import RecordError, Source
from tunesmith.errors import DataError

SUFFIXES = {
    ".jsonl": "jsonl", ".ndjson": "jsonl", ".json": "json",
    ".csv": "csv", ".tsv": "tsv", ".parquet": "parquet", ".pq": "parquet",
}
_SUPPORTED = "JSON (.json array), JSON Lines (.jsonl), CSV (.csv/.tsv), Parquet (.parquet) or a `datasets` folder"
_WHITESPACE = re.compile(r"\s*")
_TOO_DEEP = "nested too deeply (more than Python's recursion limit of about 1,000 levels of [ and {)"


@dataclass
class RawRecord:
    source: Source
    value: dict[str, Any] | None
    error: RecordError | None = None


def detect_kind(path: Path) -> str:
    """The reader for `path`: by suffix, except that a .json file holding JSON Lines is read as such."""
    if not path.exists():
        raise DataError(f"{path}: file not found")
    if path.is_dir():
        if (path / "dataset_dict.json").is_file() or (path / "state.json").is_file():
            return "datasets"
        raise DataError(f"{path}: a folder, but not one saved by `datasets` (no state.json or dataset_dict.json)",
                        f"pass a file: {_SUPPORTED}")
    kind = SUFFIXES.get(path.suffix.lower())
    if kind is None:
        raise DataError(f"{path}: unknown file type {path.suffix!r}", f"use {_SUPPORTED}")
    if kind == "json" and _first_char(path) == "{" and _first_line_is_object(path):
        kind = "jsonl"  # as `datasets` does: a .json file of one object per line
    elif kind == "jsonl" and _first_char(path) == "[":
        kind = "json"
    return kind


def read_records(path: str | Path) -> Iterator[RawRecord]:
    path = Path(path)
    kind = detect_kind(path)
    if kind == "tsv":
        yield from _read_csv(path, delimiter="\t")
        return
    reader = {"jsonl": _read_jsonl, "json": _read_json, "csv": _read_csv,
              "parquet": _read_parquet, "datasets": _read_datasets}[kind]
    yield from reader(path)


def _first_char(path: Path) -> str:
    with path.open("rb") as f:
        head = f.read(4096).lstrip(b"\xef\xbb\xbf").lstrip()
    return head[:1].decode("ascii", errors="replace")


def _first_line_is_object(path: Path) -> bool:
    with path.open("rb") as f:
        line = f.readline(1 << 20).lstrip(b"\xef\xbb\xbf")
    try:
        return isinstance(json.loads(line), dict)
    except ValueError:  # a pretty-printed object spans lines: a JSON document, not JSON Lines
        return False


def _read_jsonl(path: Path) -> Iterator[RawRecord]:
    index = 0
    offset = 0
    with path.open("rb") as f:
        for number, raw in enumerate(f, start=1):
            line_start = offset
            offset += len(raw)
            if number == 1 and raw.startswith(b"\xef\xbb\xbf"):
                raw = raw[3:]
                line_start += 3
            if not raw.strip():
                continue  # blank lines separate nothing in JSON Lines; editors leave them at the end
            source = Source(str(path), index, number)
            index += 1
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                bad = raw[exc.start:exc.start + 1].hex()
                yield RawRecord(source, None, RecordError(
                    None, f"not UTF-8: byte 0x{bad} at offset {line_start + exc.start} (column {exc.start + 1})"))
                continue
            try:
                value = json.loads(text)
            except json.JSONDecodeError as exc:
                yield RawRecord(source, None, RecordError(None, f"not valid JSON at column {exc.colno}: {exc.msg}"))
                continue
            except RecursionError:
                yield RawRecord(source, None, RecordError(None, _TOO_DEEP))
                continue
            if not isinstance(value, dict):
                yield RawRecord(source, None, RecordError(
                    None, f"expected a JSON object per line, got {_json_type(value)}"))
                continue
            yield RawRecord(source, value)


def _decode_whole(path: Path) -> str:
    data = path.read_bytes()
    if data.startswith(b"\xef\xbb\xbf"):
        data = data[3:]
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        column = exc.start - (data.rfind(b"\n", 0, exc.start) + 1) + 1
        bad = data[exc.start:exc.start + 1].hex()
        raise DataError(f"{path}, line {line}: not UTF-8: byte 0x{bad} at offset {exc.start} (column {column})",
                        "save the file as UTF-8") from exc


def _read_json(path: Path) -> Iterator[RawRecord]:
    """A JSON array parsed element by element, so each record knows the line it starts on."""
    text = _decode_whole(path)
    decoder = json.JSONDecoder()

    def fail(pos: int, problem: str) -> DataError:
        line = text.count("\n", 0, pos) + 1
        column = pos - (text.rfind("\n", 0, pos) + 1) + 1
        return DataError(f"{path}, line {line}, column {column}: not valid JSON: {problem}")

    pos = _WHITESPACE.match(text, 0).end()
    if not text.startswith("[", pos):
        if text.startswith("{", pos):
            raise DataError(f"{path}: holds one JSON object; expected an array of records or JSON Lines",
                            'write [{"input": ..., "output": ...}, ...] or one object per line')
        raise fail(pos, "expected '[' (an array of records)")
    pos = _WHITESPACE.match(text, pos + 1).end()
    index = 0
    line, counted = 1, 0  # lines are counted incrementally: recounting from 0 per record is quadratic
    if text.startswith("]", pos):
        pos += 1
    else:
        while True:
            line += text.count("\n", counted, pos)
            counted = pos
            try:
                value, pos = decoder.raw_decode(text, pos)
            except json.JSONDecodeError as exc:
                raise fail(exc.pos, exc.msg) from exc
            except RecursionError as exc:  # where the record ends is unknown, so the file cannot go on
                raise DataError(f"{path}, line {line} (record {index}): {_TOO_DEEP}") from exc
            source = Source(str(path), index, line)
            index += 1
            if isinstance(value, dict):
                yield RawRecord(source, value)
            else:
                yield RawRecord(source, None, RecordError(None, f"expected a JSON object, got {_json_type(value)}"))
            pos = _WHITESPACE.match(text, pos).end()
            if text.startswith(",", pos):
                pos = _WHITESPACE.match(text, pos + 1).end()
            elif text.startswith("]", pos):
                pos += 1
                break
            else:
                raise fail(pos, "expected ',' or ']' after a record")
    pos = _WHITESPACE.match(text, pos).end()
    if pos != len(text):
        raise fail(pos, "extra data after the closing ']'")


def _read_csv(path: Path, delimiter: str = ",") -> Iterator[RawRecord]:
    # Python's csv refuses fields over 131,072 characters by default; a long document is a fair training input
    # (the length check after tokenizing says what happens to it).
    csv.field_size_limit(min(sys.maxsize, 2**31 - 1))
    text = _decode_whole(path)
    reader = csv.DictReader(io.StringIO(text, newline=""), delimiter=delimiter, strict=True)
    try:
        header = reader.fieldnames
    except csv.Error as exc:
        raise DataError(f"{path}, line 1: cannot parse the CSV header: {exc}") from exc
    if not header:
        raise DataError(f"{path}: empty CSV file (no header row)", "the first row names the columns")
    duplicates = sorted({name for name in header if header.count(name) > 1})
    if duplicates:
        raise DataError(f"{path}, line 1: column {duplicates[0]!r} appears more than once in the header")
    index = 0
    previous_end = reader.line_num
    while True:
        start = previous_end + 1
        try:
            row = next(reader)
        except StopIteration:
            break
        except csv.Error as exc:  # named by the line its record starts on: line_num is wherever parsing stopped
            raise DataError(f"{path}, line {start}: cannot parse CSV: {exc}",
                            "a quote opened in this record may never be closed" if "end of data" in str(exc)
                            else None) from exc
        previous_end = reader.line_num
        source = Source(str(path), index, start)
        index += 1
        if None in row:
            yield RawRecord(source, None, RecordError(
                None, f"row has {len(header) + len(row[None])} fields but the header names {len(header)}"))
        elif any(value is None for value in row.values()):
            missing = [name for name, value in row.items() if value is None]
            yield RawRecord(source, None, RecordError(
                missing[0], f"row has fewer fields than the header; {missing[0]!r} is missing"))
        else:
            yield RawRecord(source, row)


def _read_parquet(path: Path) -> Iterator[RawRecord]:
    import pyarrow.parquet as pq

    try:
        parquet = pq.ParquetFile(path)
    except Exception as exc:  # pyarrow raises ArrowInvalid, OSError, ... for a damaged file
        raise DataError(f"{path}: not a readable Parquet file: {exc}") from exc
    index = 0
    for batch in parquet.iter_batches(batch_size=1024):
        for row in batch.to_pylist():
            yield RawRecord(Source(str(path), index), row)
            index += 1


def _read_datasets(path: Path) -> Iterator[RawRecord]:
    from datasets import DatasetDict, load_from_disk

    try:
        dataset = load_from_disk(str(path))
    except Exception as exc:  # datasets raises FileNotFoundError, ValueError, ... for a damaged folder
        raise DataError(f"{path}: cannot load this `datasets` folder: {exc}") from exc
    if isinstance(dataset, DatasetDict):
        splits = list(dataset)
        if "train" in dataset:
            dataset = dataset["train"]
        elif len(splits) == 1:
            dataset = dataset[splits[0]]
        else:
            raise DataError(f"{path}: a DatasetDict with splits {', '.join(splits)} and no 'train' split",
                            "point at one split's folder, e.g. DIR/<split>")
    for index, row in enumerate(dataset):
        yield RawRecord(Source(str(path), index), row)


def _json_type(value: Any) -> str:
    return {list: "an array", str: "a string", bool: "a boolean", int: "a number", float: "a number",
            type(None): "null"}.get(type(value), type(value).__name__)
