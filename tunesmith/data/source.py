"""Where a record came from (file, line, record index), so every data error can point at it.

`Source` is carried by every record and every `Example`; `RecordError` is the one-field problem a
validator raises before it is turned into a `DataError` naming the file, the line or index and the field.
"""

from __future__ import annotations

from dataclasses import dataclass

from tunesmith.errors import DataError


@dataclass(frozen=True)
class Source:
    """One record's place: `line` is 1-based (JSONL, CSV, JSON arrays), `index` 0-based among records."""

    file: str
    index: int
    line: int | None = None

    def __str__(self) -> str:
        if self.line is not None:
            return f"{self.file}, line {self.line} (record {self.index})"
        return f"{self.file}, record {self.index}"


class RecordError(Exception):
    """A problem with one field of one record; the reader or loader adds where the record is."""

    def __init__(self, field: str | None, problem: str):
        super().__init__(problem)
        self.field = field
        self.problem = problem

    def describe(self, source: Source) -> str:
        field = f", field {self.field!r}" if self.field else ""
        return f"{source}{field}: {self.problem}"

    def to_data_error(self, source: Source, hint: str | None = None) -> DataError:
        return DataError(self.describe(source), hint)
