"""The model store: content-addressed blobs and one manifest per `name:tag`, laid out like `~/.ollama/models`.

    <root>/blobs/sha256-<hex>               GGUF models and adapters, verified against their digest
    <root>/manifests/<name>/<tag>.json      what makes a model: its GGUF blob, template, system, parameters...

Every write is atomic; a blob is removed only when no manifest uses it any more.
"""

from __future__ import annotations

import contextlib
import datetime
import fcntl
import hashlib
import json
import re
import shutil
import threading
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any, BinaryIO

from pydantic import BaseModel, Field, ValidationError

from tunesmith import paths
from tunesmith.atomic import TMP_PREFIX, atomic_path, write_text
from tunesmith.digest import file_sha256
from tunesmith.errors import TunesmithError, clip

DEFAULT_TAG = "latest"
_DIGEST_RE = re.compile(r"^sha256[:-]([0-9a-fA-F]{64})$")
# Each part of a name: starts with a letter or digit, then letters, digits, `.`, `_`, `-` (as Ollama's names).
_PART_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,79}$")
_TAG_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9._-]{0,79}$")
_CHUNK = 1 << 20


class StoreError(TunesmithError):
    """A problem with the model store: bad name, missing model, bad blob."""


class InvalidName(StoreError):
    pass


class ModelNotFound(StoreError):
    def __init__(self, name: str):
        super().__init__(f"model '{name}' not found", "see `tunesmith list` for the models there are")
        self.name = name


class InvalidDigest(StoreError):
    pass


class BlobNotFound(StoreError):
    def __init__(self, digest: str):
        super().__init__(f'blob "{digest}" not found', "upload it first (POST /api/blobs/<digest>)")
        self.digest = digest


class DigestMismatch(StoreError):
    pass


class BlobWriter:
    def __init__(self, out: BinaryIO | None, created: bool):
        self.out = out
        self.created = created
        self.hash = hashlib.sha256()
        self.size = 0

    def write(self, chunk: bytes) -> None:
        if self.out is not None:
            self.hash.update(chunk)
            self.out.write(chunk)
        self.size += len(chunk)


class Manifest(BaseModel):
    """One model: a GGUF blob plus everything a Modelfile adds to it."""

    schema_version: int = 1
    model: str
    """The GGUF blob, `sha256:<hex>`."""
    adapters: list[str] = Field(default_factory=list)
    template: str | None = None
    system: str | None = None
    parameters: dict[str, Any] = Field(default_factory=dict)
    messages: list[dict[str, Any]] = Field(default_factory=list)
    license: list[str] = Field(default_factory=list)
    details: dict[str, Any] = Field(default_factory=dict)
    size: int = 0
    """Bytes of all blobs, as /api/tags reports it."""

    def blobs(self) -> list[str]:
        return [self.model, *self.adapters]


def parse_name(name: str) -> tuple[str, str]:
    """`name[:tag]` → (name, tag), validated so it can never leave the manifests directory."""
    if not isinstance(name, str) or not name.strip():
        raise InvalidName("model is required", "give a model name such as godrive or godrive:latest")
    base, sep, tag = name.strip().rpartition(":")
    if not sep:
        base, tag = tag, DEFAULT_TAG
    parts = base.split("/")
    if len(parts) > 3 or not all(_PART_RE.match(p) and p not in (".", "..") for p in parts) or not _TAG_RE.match(tag):
        raise InvalidName(f"invalid model name {clip(repr(name))}",
                          "use letters, digits, '.', '_', '-' (optionally namespace/name and :tag)")
    return base, tag


def full_name(name: str) -> str:
    base, tag = parse_name(name)
    return f"{base}:{tag}"


def parse_digest(digest: str) -> str:
    """`sha256:<hex>` or `sha256-<hex>` → the canonical `sha256:<hex>` (lower case)."""
    m = _DIGEST_RE.match(digest or "")
    if not m:
        raise InvalidDigest("invalid digest format", "expected sha256:<64 hex digits>")
    return "sha256:" + m.group(1).lower()


def file_digest(path: str | Path) -> str:
    """A file's digest as Ollama names blobs: `sha256:<hex>`."""
    return "sha256:" + file_sha256(path)


class Store:
    """The store rooted at `root` (default `$TUNESMITH_HOME/models`). Safe to share between threads."""

    def __init__(self, root: str | Path | None = None):
        self.root = Path(root) if root is not None else paths.models_dir()
        self.blobs_dir = self.root / "blobs"
        self.manifests_dir = self.root / "manifests"
        # Manifest changes and blob removal happen under one lock so a delete never removes a blob
        # that a concurrent create is about to reference.
        self._lock = threading.RLock()

    # ------------------------------------------------------------------ blobs
    def blob_path(self, digest: str) -> Path:
        return self.blobs_dir / parse_digest(digest).replace(":", "-")

    def has_blob(self, digest: str) -> bool:
        return self.blob_path(digest).is_file()

    @contextlib.contextmanager
    def blob_writer(self, digest: str) -> Iterator[BlobWriter]:
        """Write blob `digest` chunk by chunk; kept only if the bytes hash to `digest` when the block ends.

        `writer.created` is False when the blob was already there (then the chunks are discarded).
        """
        digest = parse_digest(digest)
        target = self.blob_path(digest)
        if target.is_file():
            yield BlobWriter(None, created=False)
            return
        with atomic_path(target) as tmp, open(tmp, "wb") as out:
            # Locked while written: `prune_temporaries` (at server start) removes only the temporaries of
            # processes that are gone, never one that another server is still receiving.
            fcntl.flock(out, fcntl.LOCK_EX)
            writer = BlobWriter(out, created=True)
            yield writer
            out.flush()
            got = "sha256:" + writer.hash.hexdigest()
            if got != digest:
                raise DigestMismatch(f'digest mismatch, expected "{digest}", got "{got}"',
                                     "the upload was corrupted or the digest is wrong")

    def write_blob(self, digest: str, chunks: Iterable[bytes]) -> bool:
        """Store the bytes as blob `digest`; True if written, False if it was already there."""
        with self.blob_writer(digest) as writer:
            for chunk in chunks:
                writer.write(chunk)
        return writer.created

    def add_file(self, path: str | Path) -> str:
        """Copy a local file into the store; returns its digest."""
        digest = file_digest(path)
        if not self.has_blob(digest):
            def chunks() -> Iterator[bytes]:
                with open(path, "rb") as f:
                    while chunk := f.read(_CHUNK):
                        yield chunk
            self.write_blob(digest, chunks())
        return digest

    def prune_temporaries(self) -> int:
        """Remove the temporaries a killed process left (a blob upload cut off holds tens of MB), as Ollama prunes
        its partial files at start; returns how many. A blob temporary still being written is locked and kept;
        a manifest's is written in microseconds, so one older than a minute is a leftover."""
        removed = 0
        for path in self.blobs_dir.glob(f"{TMP_PREFIX}*") if self.blobs_dir.is_dir() else []:
            with contextlib.suppress(OSError), open(path, "rb") as handle:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)  # BlockingIOError (an OSError): in use
                path.unlink()
                removed += 1
        for path in self.manifests_dir.rglob(f"{TMP_PREFIX}*") if self.manifests_dir.is_dir() else []:
            with contextlib.suppress(OSError):
                if path.stat().st_mtime < time.time() - 60:
                    path.unlink()
                    removed += 1
        return removed

    # ------------------------------------------------------------------ manifests
    def manifest_path(self, name: str) -> Path:
        base, tag = parse_name(name)
        path = self.manifests_dir.joinpath(*base.split("/"), f"{tag}.json")
        # Belt and braces: the validated name cannot escape, but never trust a path we did not check.
        if not path.resolve().is_relative_to(self.manifests_dir.resolve()):
            raise InvalidName(f"invalid model name {name!r}")
        return path

    def read(self, name: str) -> Manifest:
        path = self.manifest_path(name)
        try:
            return Manifest.model_validate_json(path.read_bytes())
        except FileNotFoundError:
            raise ModelNotFound(name) from None
        except ValidationError as exc:
            raise StoreError(f"{path}: damaged manifest ({exc.errors()[0]['msg']})",
                             f"remove it with `tunesmith rm {name}`") from exc

    def exists(self, name: str) -> bool:
        return self.manifest_path(name).is_file()

    def write(self, name: str, manifest: Manifest) -> None:
        with self._lock:
            for digest in manifest.blobs():
                if not self.has_blob(digest):
                    raise BlobNotFound(digest)
            manifest.size = sum(self.blob_path(d).stat().st_size for d in manifest.blobs())
            write_text(self.manifest_path(name), manifest.model_dump_json(indent=2) + "\n")

    def modified_at(self, name: str) -> datetime.datetime:
        mtime = self.manifest_path(name).stat().st_mtime
        return datetime.datetime.fromtimestamp(mtime, tz=datetime.UTC)

    def list(self) -> list[tuple[str, Manifest]]:
        """Every model as (`name:tag`, manifest), most recently modified first."""
        found: list[tuple[float, str, Manifest]] = []
        if not self.manifests_dir.is_dir():
            return []
        for path in self.manifests_dir.rglob("*.json"):
            if path.name.startswith(".tmp-"):
                continue
            rel = path.relative_to(self.manifests_dir)
            name = "/".join(rel.parent.parts) + ":" + path.stem
            try:
                manifest = Manifest.model_validate_json(path.read_bytes())
            except (ValidationError, OSError, json.JSONDecodeError):
                continue  # a damaged manifest must not hide the others
            found.append((path.stat().st_mtime, name, manifest))
        found.sort(key=lambda item: item[0], reverse=True)
        return [(name, manifest) for _, name, manifest in found]

    def copy(self, source: str, destination: str) -> None:
        with self._lock:
            manifest = self.read(source)
            self.write(destination, manifest)

    def delete(self, name: str) -> None:
        """Remove the manifest, then each of its blobs that no other manifest uses."""
        with self._lock:
            manifest = self.read(name)
            path = self.manifest_path(name)
            path.unlink()
            self._prune_dirs(path.parent)
            in_use = {d for _, other in self.list() for d in other.blobs()}
            for digest in manifest.blobs():
                if digest not in in_use:
                    self.blob_path(digest).unlink(missing_ok=True)

    def _prune_dirs(self, directory: Path) -> None:
        while directory != self.manifests_dir and directory.is_dir() and not any(directory.iterdir()):
            shutil.rmtree(directory, ignore_errors=True)
            directory = directory.parent
