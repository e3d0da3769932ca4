"""SHA-256 of files: the one helper every digest of a file's bytes goes through (the store's blobs, checkpoint
manifests, run.json's data digest, the data stage's record of its inputs and split)."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

BLOCK = 1 << 20
"""Read a MiB at a time: a GGUF of several GB is hashed in flat memory."""


def file_sha256(path: str | Path) -> str:
    """The file's SHA-256, in hex (Ollama writes a blob's digest as `sha256:` + this)."""
    digest = hashlib.sha256()
    _update(digest, Path(path))
    return digest.hexdigest()


def files_sha256(paths: list[str | Path | None]) -> str:
    """One SHA-256 over the bytes of the files named, in order (missing ones and None skipped). A folder (one
    saved by `datasets`) counts as every file under it, by name: a changed shard changes the digest."""
    digest = hashlib.sha256()
    for name in paths:
        path = Path(name) if name else None
        if path is not None and path.is_dir():
            for file in sorted(found for found in path.rglob("*") if found.is_file()):
                digest.update(file.relative_to(path).as_posix().encode("utf-8") + b"\0")
                _update(digest, file)
        elif path is not None and path.is_file():
            _update(digest, path)
    return digest.hexdigest()


def _update(digest: Any, path: Path) -> None:
    """Feed the file's bytes to `digest` (a hashlib object)."""
    with open(path, "rb") as handle:
        while block := handle.read(BLOCK):
            digest.update(block)
