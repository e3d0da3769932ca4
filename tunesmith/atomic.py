"""Write files and directories so they are complete or absent: write under a temporary name, then rename.

Complete means on the disk, not only in the page cache: the data is fsynced before the rename and the folder
after it, so a power loss leaves the old file or the new one under the final name, never a torn one. A full
disk is one line naming the path (`DiskFull`), whichever library was writing.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from tunesmith.errors import DiskFull, TunesmithError

TMP_PREFIX = ".tmp-"
"""Every temporary starts with this, so nothing mistakes one for output and a re-run can sweep them up."""


@contextlib.contextmanager
def atomic_path(target: str | Path, *, directory: bool = False) -> Iterator[Path]:
    """Yield a temporary path next to `target`; on success fsync it and rename it onto `target`, on error remove it.

    A directory that replaces an existing one is swapped in by two renames (old aside, new in place) and the
    old one removed afterwards, so there is no moment when neither is complete on the disk.
    """
    target = Path(target)
    make_dirs(target.parent)
    if directory:
        tmp = Path(tempfile.mkdtemp(prefix=f"{TMP_PREFIX}{target.name}-", dir=target.parent))
    else:
        fd, name = tempfile.mkstemp(prefix=f"{TMP_PREFIX}{target.name}-", dir=target.parent)
        os.close(fd)
        tmp = Path(name)
    try:
        try:
            yield tmp
            _fsync_tree(tmp)
            old = None
            if directory and target.exists():
                old = Path(tempfile.mkdtemp(prefix=f"{TMP_PREFIX}{target.name}-old-", dir=target.parent))
                os.replace(target, old / target.name)
            os.replace(tmp, target)
            fsync_dir(target.parent)
            if old is not None:
                shutil.rmtree(old, ignore_errors=True)
        except Exception as exc:
            if not isinstance(exc, DiskFull) and is_disk_full(exc):
                raise DiskFull(target) from exc
            raise
    except BaseException:
        if tmp.is_dir():
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            tmp.unlink(missing_ok=True)
        raise


def write_text(target: str | Path, text: str) -> None:
    with atomic_path(target) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_json(target: str | Path, data: Any) -> None:
    write_text(target, json.dumps(data, indent=2, ensure_ascii=False, default=str) + "\n")


def make_dirs(path: Path) -> None:
    """`mkdir -p`, or one line naming the part of the path that is a file (runs_dir: a file, say)."""
    try:
        path.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError) as exc:
        blocking = next((part for part in [path, *path.parents] if part.exists() and not part.is_dir()), path)
        raise TunesmithError(f"{path}: cannot create this folder: {blocking} is a file, not a folder",
                             "move the file away, or point the config at another folder") from exc
    except OSError as exc:
        if is_disk_full(exc):
            raise DiskFull(path) from exc
        raise


def is_disk_full(exc: BaseException) -> bool:
    """ENOSPC or a quota, however the writing library reports it: Python's OSError, or the text of a Rust
    (safetensors) or C++ error that carries the OS message."""
    if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    text = str(exc)
    return "No space left on device" in text or "Disk quota exceeded" in text


def remove_temporaries(*folders: Path) -> None:
    """Leftovers of a killed process: temporary names never look like outputs, but they take disk."""
    for folder in folders:
        if folder.is_dir():
            for path in folder.glob(f"{TMP_PREFIX}*"):
                shutil.rmtree(path, ignore_errors=True) if path.is_dir() else path.unlink(missing_ok=True)


def _fsync_tree(path: Path) -> None:
    """Every file under `path` (or `path` itself), then every folder, onto the disk."""
    if not path.is_dir():
        _fsync_file(path)
        return
    for folder, _, files in os.walk(path, topdown=False):
        for name in files:
            _fsync_file(Path(folder) / name)
        fsync_dir(Path(folder))


def _fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_dir(path: Path) -> None:
    """The folder's entries (a rename into it) onto the disk; filesystems that cannot are let be."""
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
