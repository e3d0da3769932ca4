"""The model store after a crash and on a full disk: a killed upload's temporary is swept at the next server
start (as Ollama prunes its partial files), one still being written is not; a full disk is one line."""

from __future__ import annotations

import fcntl
import hashlib
import os
import signal
import threading
from collections.abc import Iterator
from pathlib import Path

import httpx

from tests.disk import small_disk
from tests.serve_fixtures import free_port, start_server, start_server_process, wait_until
from tunesmith.serve.store import Store


def test_a_killed_uploads_temporary_is_pruned_at_the_next_start_but_a_live_one_is_kept(tmp_path):
    models = tmp_path / "models"
    server = start_server_process(tmp_path)
    stalled = threading.Event()

    def body() -> Iterator[bytes]:  # 1 MiB, then a client that waits (a slow network, a large GGUF)
        yield b"\0" * (1 << 20)
        stalled.wait(60)

    upload = threading.Thread(target=lambda: httpx.post(
        f"{server.url}/api/blobs/sha256:{'0' * 64}", content=body(), timeout=60), daemon=True)
    upload.start()
    try:
        assert wait_until(lambda: any(path.stat().st_size for path in (models / "blobs").glob(".tmp-sha256-*"))), (
            "the upload never reached the store")
        server.process.send_signal(signal.SIGKILL)  # the server dies mid-upload: nothing of its own cleans up
    finally:
        stalled.set()
        server.process.kill()
        server.process.wait()
    (left,) = (models / "blobs").glob(".tmp-sha256-*")  # part of the upload, under a temporary name

    # Another server on this store is receiving a blob right now: its temporary is locked and must survive.
    live = models / "blobs" / ".tmp-sha256-live"
    with open(live, "wb") as receiving:
        fcntl.flock(receiving, fcntl.LOCK_EX)
        restarted = start_server(Store(models))
        try:
            assert not left.exists(), "the killed upload's temporary was kept"
            assert live.exists(), "a temporary still being written was removed"
        finally:
            restarted.stop()


def test_a_full_disk_during_create_is_one_line_naming_the_blob(tmp_path, monkeypatch, capsys):
    from tunesmith.cli import main

    with small_disk(tmp_path / "disk", "1m") as disk:
        gguf = tmp_path / "big.gguf"
        gguf.write_bytes(b"GGUF" + os.urandom(4 << 20))  # 4 MiB onto a 1 MiB store
        (tmp_path / "Modelfile").write_text(f"FROM {gguf}\n")
        # `tunesmith create` starts a local server on this store (and stops it when done), as a user's would.
        monkeypatch.setenv("TUNESMITH_HOST", f"127.0.0.1:{free_port()}")
        monkeypatch.setenv("TUNESMITH_MODELS", str(disk))
        assert main(["create", "big", "-f", str(tmp_path / "Modelfile")]) == 2
        err = capsys.readouterr().err
        digest = hashlib.sha256(gguf.read_bytes()).hexdigest()
        assert f"{disk}/blobs/sha256-{digest}: the disk is full" in err, err
        assert not list(Path(disk, "blobs").glob("*")), "a partial blob was kept"
