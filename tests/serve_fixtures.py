"""Shared helpers of the serve tests: a real uvicorn server on a free loopback port, in a thread, or
`tunesmith serve` in a process of its own; a free port; waiting until something holds.

Test modules import `start_server` and build their own fixtures on it (the lead owns conftest.py; the
`smollm2_gguf` fixture comes from there).
"""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import uvicorn

from tests.conftest import ROOT
from tunesmith.app import create_app
from tunesmith.config import ServeConfig
from tunesmith.serve import gguf_meta
from tunesmith.serve.known_templates import CHATML
from tunesmith.serve.store import Manifest, Store
from tunesmith.serve.timeouts import uvicorn_config

MODEL = "smol:latest"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until(predicate, timeout: float = 60, interval: float = 0.05) -> bool:
    """True as soon as `predicate()` is, False once `timeout` seconds have passed without it (a limit for a
    failing test, never a timing the test checks)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return False


@dataclass
class LiveServer:
    url: str
    port: int
    store: Store
    app: object
    server: uvicorn.Server
    thread: threading.Thread

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)

    @property
    def engine(self):
        return self.app.state.server.engine


def start_server(store: Store, **config: object) -> LiveServer:
    """Serve `store` with a ServeConfig built from `config` (host stays loopback for uvicorn's bind)."""
    port = free_port()
    serve_config = ServeConfig(**{"port": port, **config})
    app = create_app(serve_config, store)
    server = uvicorn.Server(uvicorn_config(app, host="127.0.0.1", port=port, read_timeout=serve_config.read_timeout,
                                           log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    if not wait_until(lambda: server.started or not thread.is_alive(), 30) or not server.started:
        raise RuntimeError("test server did not start")
    return LiveServer(f"http://127.0.0.1:{port}", port, store, app, server, thread)


@dataclass
class ServerProcess:
    """`tunesmith serve` in a process of its own: its memory is its own to measure, a crash shows as a dead
    process instead of taking pytest with it, and its log (stdout and stderr) is a file to read."""

    process: subprocess.Popen
    url: str
    port: int
    log: Path

    def status(self, field: str) -> int:
        """A line of /proc/PID/status in KiB (VmRSS, VmHWM: the peak since the last `reset_peak`)."""
        text = Path(f"/proc/{self.process.pid}/status").read_text()
        return int(re.search(rf"{field}:\s+(\d+) kB", text).group(1))

    def reset_peak(self) -> None:
        Path(f"/proc/{self.process.pid}/clear_refs").write_text("5")  # VmHWM starts again from VmRSS

    def log_text(self) -> str:
        return self.log.read_text(errors="replace")

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(timeout=30)


def start_server_process(home: Path, *args: str, env: dict[str, str] | None = None) -> ServerProcess:
    """`tunesmith serve ARGS` on a free loopback port, the store in `home`/models (TUNESMITH_MODELS); `env` adds to
    the environment (an empty value unsets a variable for the server)."""
    port = free_port()
    log = home / "server.log"
    environment = {**os.environ, "TUNESMITH_HOST": f"127.0.0.1:{port}", "TUNESMITH_MODELS": str(home / "models"),
                   "PYTHONPATH": str(ROOT), **(env or {})}
    with log.open("wb") as out:
        process = subprocess.Popen([sys.executable, "-m", "tunesmith.cli", "serve", *args], cwd=ROOT,
                                   env={key: value for key, value in environment.items() if value}, stdout=out,
                                   stderr=subprocess.STDOUT)
    server = ServerProcess(process, f"http://127.0.0.1:{port}", port, log)

    def answers() -> bool:
        try:
            return httpx.get(server.url, timeout=1).status_code in (200, 401)
        except httpx.HTTPError:
            return False

    if not wait_until(lambda: answers() or process.poll() is not None, 60, 0.2) or process.poll() is not None:
        process.kill()
        raise RuntimeError("tunesmith serve did not start: " + server.log_text()[-2000:])
    return server


def add_smol(store: Store, gguf: Path, name: str = MODEL) -> None:
    """The built-in SmolLM2 GGUF as `name`, with Ollama's ChatML template and greedy decoding."""
    digest = store.add_file(gguf)
    store.write(name, Manifest(model=digest, template=CHATML, details=gguf_meta.details(gguf),
                               parameters={"stop": ["<|im_start|>", "<|im_end|>"], "temperature": 0.0}))


def write_lora(path: Path, scale: float, rank: int = 8, layers: int = 30, width: int = 576) -> Path:
    """A LoRA adapter GGUF for SmolLM2's attention queries, as convert_lora_to_gguf.py lays one out.

    Random A/B scaled by `scale`: 0 leaves the model as it is, 0.5 scrambles its answers.
    """
    import gguf
    import numpy as np

    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_type("adapter")
    writer.add_string("adapter.type", "lora")
    writer.add_float32("adapter.lora.alpha", float(rank))
    rng = np.random.default_rng(0)
    for i in range(layers):
        writer.add_tensor(f"blk.{i}.attn_q.weight.lora_a", (rng.standard_normal((rank, width)) * scale).astype("f4"))
        writer.add_tensor(f"blk.{i}.attn_q.weight.lora_b", (rng.standard_normal((width, rank)) * scale).astype("f4"))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path
