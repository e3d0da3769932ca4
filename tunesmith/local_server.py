"""A server to talk to when none answers: `python -m tunesmith.app` (tunesmith/app.py, the server with its web
UI) started in the background, for `tunesmith create` and `run` and the pipeline (as Ollama's CLI starts its
server when the heartbeat finds none), and stopped when they are done with it."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit

from tunesmith.children import die_with_parent
from tunesmith.config import ServeConfig
from tunesmith.serve.address import API_KEY_ENV, DEFAULT_PORT, host_url
from tunesmith.serve.client import ClientError, heartbeat


def start_local_server(host: str | None = None, *, config: str | Path | None = None, overrides: list[str] | None = None,
                       settings: ServeConfig | None = None, wait: float = 60) -> subprocess.Popen[bytes]:
    """Start `python -m tunesmith.app` (the server with its web UI) in the background at `host` and wait until it answers.

    `config`/`overrides` are the CLI's --config/--set, so the server gets the same `serve` section; `settings`
    is a serve section itself (the pipeline's), passed setting by setting.
    """
    parts = urlsplit(host_url(host))
    if parts.hostname not in ("127.0.0.1", "localhost", "::1"):
        raise ClientError(f"no server answers at {host_url(host)}", "start it there with `tunesmith serve`")
    # It listens where the serve section says (0.0.0.0: every interface), and is reached here on loopback.
    bind = settings.host if settings is not None else parts.hostname or "127.0.0.1"
    command = [sys.executable, "-m", "tunesmith.app", "--host", bind, "--port", str(parts.port or DEFAULT_PORT)]
    if config is not None:
        command += ["--config", str(config)]
    env = None
    if settings is not None:
        for key, value in settings.model_dump(mode="json", exclude={"host", "port", "api_key"}).items():
            command += ["--set", f"serve.{key}={json.dumps(value)}"]  # JSON is YAML, which --set reads
        if settings.api_key:  # through the environment: every user of the machine can read a command line
            env = {**os.environ, API_KEY_ENV: settings.api_key}
    for override in overrides or []:
        command += ["--set", override]
    # A session of its own, so Ctrl-C in the terminal reaches the caller, which stops the server in order; and
    # dies with the caller, so a killed caller leaves no server holding the port. (preexec_fn is unsafe only
    # when other threads hold locks at fork time: every caller starts the server from its main thread.)
    proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
                            env=env, preexec_fn=die_with_parent)  # noqa: PLW1509
    deadline = time.monotonic() + wait
    while time.monotonic() < deadline:
        if heartbeat(host, settings.api_key if settings else None):
            return proc
        if proc.poll() is not None:
            raise ClientError(f"the local server exited with code {proc.returncode}", "run `tunesmith serve` to see why")
        time.sleep(0.2)
    proc.terminate()
    raise ClientError("the local server did not start in time")


def ensure_server(host: str | None = None, *, config: str | Path | None = None, overrides: list[str] | None = None,
                  settings: ServeConfig | None = None) -> subprocess.Popen[bytes] | None:
    """A server at `host`: None if one answers already, else the local one just started (`tunesmith run`).

    The caller stops a server it started (`proc.terminate()`) when it is done with it.
    """
    if heartbeat(host, settings.api_key if settings else None):
        return None
    return start_local_server(host, config=config, overrides=overrides, settings=settings)


@contextlib.contextmanager
def server_at(host: str | None, settings: ServeConfig | None = None) -> Iterator[subprocess.Popen[bytes] | None]:
    """A server to talk to: the one at `host`, or a local one started now (with the serve section `settings`)
    and stopped (and waited for) afterwards, so the next caller's heartbeat never reaches a server that is still
    shutting down."""
    server = ensure_server(host, settings=settings)
    try:
        yield server
    finally:
        if server is not None:
            server.terminate()
            try:
                server.wait(timeout=30)
            except subprocess.TimeoutExpired:
                server.kill()
                server.wait()
