"""Errors a user can cause. Each carries one line saying what is wrong and a hint saying what to do.

The CLI turns every `TunesmithError` into that line on stderr and exit code 2 (in one place, `cli.main`);
anything else is a bug and keeps its traceback.
"""

from __future__ import annotations


class TunesmithError(Exception):
    """A problem the user can fix: bad config, bad data, a missing model."""

    exit_code = 2

    def __init__(self, message: str, hint: str | None = None):
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        return self.message if not self.hint else f"{self.message} ({self.hint})"


class ConfigError(TunesmithError):
    """The YAML config or a --set override is wrong."""


class DataError(TunesmithError):
    """A data file or one of its records is wrong."""


class ModelError(TunesmithError):
    """The base model cannot be found, loaded or used as asked."""


class ToolingError(TunesmithError):
    """llama.cpp's converter or another external piece is missing or broken."""
