"""The client of an Ollama-compatible server (tunesmith's or Ollama's): the official `ollama` Python client.

Every call goes through `ollama.Client`, so each command a user runs also proves the server speaks Ollama's API,
and `deploy --to` talks to a real Ollama exactly as Ollama's own client does. `create` works as Ollama's CLI
does: upload the local files to `/api/blobs/<digest>`, then `/api/create` with `files={name: digest}`.
Only the client lives here, as in Ollama's api/client.go: what the commands print is tunesmith/tables.py, the
chat of `tunesmith run` tunesmith/interactive.py, and starting a local server tunesmith/local_server.py.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import ollama

from tunesmith.errors import TunesmithError
from tunesmith.serve import modelfile
from tunesmith.serve.address import client_api_key, host_url


class ClientError(TunesmithError):
    """The server could not be reached or refused the request."""


@contextlib.contextmanager
def _client(host: str | None, api_key: str | None = None, *, what: str,
            timeout: float | None = 600) -> Iterator[ollama.Client]:
    """An `ollama.Client` for `host` whose failures, while the block runs, become one-line ClientErrors.

    `what` names the request in messages; the key is `address.client_api_key`'s. Streams have no time limit
    (`timeout=None`): a long answer or a large upload is not a failure.
    """
    key = client_api_key(api_key)
    url = host_url(host)
    try:
        with ollama.Client(host=url, timeout=timeout,
                           headers={"Authorization": f"Bearer {key}"} if key else None) as client:
            yield client
    except ollama.ResponseError as exc:
        message = exc.error.get("message", exc.error) if isinstance(exc.error, dict) else exc.error
        status = f" (HTTP {exc.status_code})" if exc.status_code > 0 else ""  # -1: an error inside a stream
        raise ClientError(f"{what}: {message}{status}") from exc
    except (ConnectionError, httpx.TransportError) as exc:
        # ollama turns a refused connection into ConnectionError("Failed to connect to Ollama ..."); other
        # transport failures (a reset, a timeout) come through as httpx's own.
        detail = "" if isinstance(exc, ConnectionError) else f": {exc}"
        raise ClientError(f"could not reach the server at {url}{detail}",
                          "start it with `tunesmith serve` or set TUNESMITH_HOST") from exc


def heartbeat(host: str | None = None, api_key: str | None = None) -> bool:
    """True when a server answers `HEAD /` at `host` (Ollama's CLI checks the same way before it starts one;
    the Python client has no call for it)."""
    key = client_api_key(api_key)
    try:
        with httpx.Client(base_url=host_url(host), timeout=2,
                          headers={"Authorization": f"Bearer {key}"} if key else None) as client:
            return client.head("/").status_code == 200
    except httpx.HTTPError:
        return False


# ---------------------------------------------------------------------------------------- create / deploy

def upload_blob(host: str | None, path: str | Path, api_key: str | None = None) -> str:
    """Upload a local file to `/api/blobs/<digest>` (the server verifies it); returns the digest."""
    with _client(host, api_key, what=f"upload {Path(path).name}", timeout=None) as client:
        return client.create_blob(path)


def _create(host: str | None, name: str, progress: Callable[[str], None] | None, api_key: str | None,
            **request: Any) -> None:
    """`/api/create` for `name`, streaming its status lines to `progress`."""
    with _client(host, api_key, what=f"create {name}", timeout=None) as client:
        for status in client.create(name, stream=True, **{k: v for k, v in request.items() if v}):
            if progress is not None and status.status:
                progress(status.status)


def create_model(host: str | None, name: str, gguf: str | Path, *, adapter: str | Path | None = None,
                 template: str | None = None, system: str | None = None, parameters: dict[str, Any] | None = None,
                 messages: list[dict[str, str]] | None = None, license: list[str] | None = None,
                 progress: Callable[[str], None] | None = None, api_key: str | None = None) -> None:
    """Upload a GGUF (and LoRA adapter) and create `name` on the server. `tunesmith deploy` calls this."""
    files = {Path(gguf).name: upload_blob(host, gguf, api_key)}
    adapters = {Path(adapter).name: upload_blob(host, adapter, api_key)} if adapter is not None else None
    _create(host, name, progress, api_key, files=files, adapters=adapters, template=template, system=system,
            parameters=parameters, messages=messages, license=license)


def create_from_modelfile(host: str | None, name: str, path: str | Path, *,
                          progress: Callable[[str], None] | None = None, api_key: str | None = None) -> None:
    """`tunesmith create NAME -f Modelfile`: FROM/ADAPTER paths are relative to the Modelfile."""
    path = Path(path)
    try:
        mf = modelfile.parse(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ClientError(f"{path}: Modelfile not found", "pass -f PATH to an existing Modelfile") from None
    for warning in mf.warnings:
        if progress is not None:
            progress(f"warning: {warning}")

    def local(value: str) -> Path | None:
        candidate = Path(value).expanduser()
        candidate = candidate if candidate.is_absolute() else path.parent / candidate
        if candidate.is_dir():
            ggufs = sorted(candidate.glob("*.gguf"))
            if len(ggufs) != 1:
                raise ClientError(f"{candidate}: expected one .gguf file in the directory, found {len(ggufs)}")
            return ggufs[0]
        return candidate if candidate.is_file() else None

    options: dict[str, Any] = {"template": mf.template, "system": mf.system, "parameters": mf.parameters or None,
                               "messages": mf.messages or None, "license": mf.license or None}
    gguf = local(mf.from_)
    adapter = local(mf.adapters[0]) if mf.adapters else None
    if mf.adapters and adapter is None:
        raise ClientError(f"ADAPTER {mf.adapters[0]}: file not found")
    if gguf is not None:
        create_model(host, name, gguf, adapter=adapter, progress=progress, api_key=api_key, **options)
        return
    # FROM names an existing model on the server.
    adapters = {adapter.name: upload_blob(host, adapter, api_key)} if adapter is not None else None
    _create(host, name, progress, api_key, from_=mf.from_, adapters=adapters, **options)


# ---------------------------------------------------------------------------------------- management

def list_models(host: str | None = None, api_key: str | None = None) -> list[dict[str, Any]]:
    """The models as /api/tags lists them (`name` as well as the client's `model`, as the wire has both)."""
    with _client(host, api_key, what="list") as client:
        return [{**m.model_dump(), "name": m.model} for m in client.list().models]


def show(host: str | None, name: str, api_key: str | None = None) -> ollama.ShowResponse:
    with _client(host, api_key, what=f"show {name}") as client:
        return client.show(name)


def ps(host: str | None = None, api_key: str | None = None) -> list[ollama.ProcessResponse.Model]:
    with _client(host, api_key, what="ps") as client:
        return list(client.ps().models)


def copy(host: str | None, source: str, destination: str, api_key: str | None = None) -> None:
    with _client(host, api_key, what=f"cp {source} {destination}") as client:
        client.copy(source, destination)


def delete(host: str | None, name: str, api_key: str | None = None) -> None:
    with _client(host, api_key, what=f"rm {name}") as client:
        client.delete(name)


# ---------------------------------------------------------------------------------------- chat

def chat_stream(host: str | None, name: str, messages: list[dict[str, Any]], *,
                options: dict[str, Any] | None = None, api_key: str | None = None) -> Iterator[ollama.ChatResponse]:
    """Streamed /api/chat chunks."""
    with _client(host, api_key, what=f"chat with {name}", timeout=None) as client:
        yield from client.chat(name, messages, stream=True, options=options or None)
