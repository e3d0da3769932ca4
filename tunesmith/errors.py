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


class DiskFull(TunesmithError):
    """The disk filled up while writing `path`; what was written before it is intact (atomic writes)."""

    def __init__(self, path: object, hint: str | None = None):
        super().__init__(f"{path}: the disk is full (no space left on device while writing it)",
                         hint or "free some space and run the command again; nothing half-written was kept")
        self.path = path


ECHO_CHARS = 100
"""How much of a value a user sent (a model name, a digest, a header) a message repeats."""


def clip(text: str, limit: int = ECHO_CHARS) -> str:
    """`text` for a message that echoes it: its first `limit` characters and how long it was, so that one
    request cannot make the server write megabytes back (a 10 MiB model name) or into its log."""
    if len(text) <= limit:
        return text
    return f"{text[:limit]}… ({len(text):,} characters)"
