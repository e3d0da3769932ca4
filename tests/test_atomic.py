"""Atomic writes: the data is on the disk before the rename, the folder after it; a full disk or a file in the way
is one line naming the path."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest

from tests.disk import leave_free, small_disk
from tunesmith.atomic import atomic_path, write_text
from tunesmith.errors import DiskFull, TunesmithError
from tunesmith.serve.store import Store


@pytest.fixture
def disk_calls(monkeypatch) -> list[tuple[str, str]]:
    """Every fsync and rename, in order, as (call, path): the real calls still happen (a recording, not a mock).
    A power loss between a rename and the fsync of its data can leave the new name on an empty or torn file."""
    calls: list[tuple[str, str]] = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd: int) -> None:
        calls.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        real_fsync(fd)

    def replace(src, dst, **kwargs) -> None:
        calls.append(("rename", f"{src} -> {dst}"))
        real_replace(src, dst, **kwargs)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    return calls


def test_a_file_is_fsynced_before_its_rename_and_its_folder_after(tmp_path, disk_calls):
    target = tmp_path / "run.json"
    write_text(target, "{}\n")
    kinds = [kind for kind, _ in disk_calls]
    assert kinds == ["fsync", "rename", "fsync"], disk_calls
    (_, data), (_, rename), (_, folder) = disk_calls
    assert Path(data).name.startswith(".tmp-run.json-") and rename.endswith(f"-> {target}")
    assert folder == str(tmp_path)


def test_a_directory_has_every_file_and_folder_fsynced_before_its_rename(tmp_path, disk_calls):
    target = tmp_path / "checkpoints" / "step-00000003"
    with atomic_path(target, directory=True) as tmp:
        (tmp / "a.bin").write_bytes(b"a" * 10)
        (tmp / "sub").mkdir()
        (tmp / "sub" / "b.bin").write_bytes(b"b")
    rename = next(i for i, (kind, _) in enumerate(disk_calls) if kind == "rename")
    synced_before = {Path(path).name for kind, path in disk_calls[:rename] if kind == "fsync"}
    assert {"a.bin", "b.bin", "sub"} <= synced_before
    assert any(name.startswith(".tmp-step-00000003-") for name in synced_before)
    assert disk_calls[rename + 1:] == [("fsync", str(target.parent))]
    assert (target / "sub" / "b.bin").read_bytes() == b"b"


def test_a_store_blob_is_fsynced_before_its_rename(tmp_path, disk_calls):
    store = Store(tmp_path / "models")
    digest = "sha256:" + hashlib.sha256(b"weights").hexdigest()
    assert store.write_blob(digest, [b"weig", b"hts"])
    kinds = [kind for kind, _ in disk_calls]
    assert kinds == ["fsync", "rename", "fsync"], disk_calls
    assert ".tmp-sha256-" in disk_calls[0][1] and disk_calls[1][1].endswith(str(store.blob_path(digest)))


def test_replacing_a_directory_never_leaves_neither(tmp_path):
    target = tmp_path / "adapter"
    target.mkdir()
    (target / "old").write_text("old")
    with atomic_path(target, directory=True) as tmp:
        (tmp / "new").write_text("new")
        assert (target / "old").exists()  # the old one stays complete until the new one is
    assert [p.name for p in target.iterdir()] == ["new"] and not list(tmp_path.glob(".tmp-*"))


def test_a_folder_that_is_a_file_is_one_line(tmp_path):
    (tmp_path / "runs").write_text("oops")
    with pytest.raises(TunesmithError, match=f"{tmp_path}/runs/x: cannot create this folder: {tmp_path}/runs is "
                                             "a file, not a folder"):
        write_text(tmp_path / "runs" / "x" / "run.json", "{}")


def test_a_full_disk_names_the_file_and_leaves_nothing_half_written(tmp_path):
    with small_disk(tmp_path / "disk", "1m") as disk:
        leave_free(disk, 64 * 1024)
        target = disk / "big.bin"
        with pytest.raises(DiskFull, match=f"{target}: the disk is full"), atomic_path(target) as tmp:
            tmp.write_bytes(b"x" * 1024 * 1024)
        assert not target.exists() and not list(disk.glob(".tmp-*"))
