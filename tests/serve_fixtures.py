"""Shared helpers of the serve tests: a real uvicorn server on a free loopback port, in a thread.

Test modules import `start_server` and build their own fixtures on it (the lead owns conftest.py; the
`smollm2_gguf` fixture comes from there).
"""

from __future__ import annotations

import socket
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import uvicorn

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
    deadline = time.monotonic() + 30
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError("test server did not start")
        time.sleep(0.05)
    return LiveServer(f"http://127.0.0.1:{port}", port, store, app, server, thread)


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
