"""Client side of `tunesmith create/run/list/show/ps/cp/rm/deploy`: the official `ollama` Python client.

Every command goes through `ollama.Client`, so each one a user runs also proves the server speaks Ollama's API,
and `deploy --to` talks to a real Ollama exactly as Ollama's own client does. `create` works as Ollama's CLI
does: upload the local files to `/api/blobs/<digest>`, then `/api/create` with `files={name: digest}`.
Starting a local server when none answers (`server_at`) is tunesmith's own.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, Any
from urllib.parse import urlsplit

import httpx
import ollama
from gguf import Keys

from tunesmith.children import die_with_parent
from tunesmith.config import ServeConfig
from tunesmith.errors import TunesmithError
from tunesmith.serve import modelfile
from tunesmith.serve.address import API_KEY_ENV, DEFAULT_PORT, client_api_key, host_url


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


def _size(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return str(n)


def _human(when: datetime.datetime) -> str:
    """`4 minutes ago`, `4 minutes from now`: Ollama's format.HumanTime, as `ollama list` and `ps` print."""
    seconds = (datetime.datetime.now(datetime.UTC) - when).total_seconds()
    suffix = "ago" if seconds >= 0 else "from now"
    for unit, span in (("days", 86400), ("hours", 3600), ("minutes", 60)):
        if abs(seconds) >= span:
            return f"{int(abs(seconds) // span)} {unit} {suffix}"
    return "just now" if seconds >= 0 else "less than a minute from now"


def _table(rows: list[list[str]]) -> str:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("    ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows)


def list_table(host: str | None = None, api_key: str | None = None) -> str:
    """`tunesmith list` output, as `ollama list` prints it."""
    rows = [["NAME", "ID", "SIZE", "MODIFIED"]]
    for m in list_models(host, api_key):
        rows.append([m["name"], m["digest"][:12], _size(m["size"]), _human(m["modified_at"])])
    return _table(rows)


def ps_table(host: str | None = None, api_key: str | None = None) -> str:
    """`tunesmith ps` output, as `ollama ps` prints it."""
    rows = [["NAME", "ID", "SIZE", "PROCESSOR", "CONTEXT", "UNTIL"]]
    for m in ps(host, api_key):
        rows.append([m.name or m.model, (m.digest or "")[:12], _size(m.size or 0), "100% CPU",
                     str(m.context_length or ""), _human(m.expires_at) if m.expires_at else "Never"])
    return _table(rows)


def show_text(host: str | None, name: str, *, modelfile_only: bool = False, api_key: str | None = None) -> str:
    """`tunesmith show NAME` (or `--modelfile`)."""
    info = show(host, name, api_key)
    if modelfile_only:
        return info.modelfile or ""
    d = info.details.model_dump(exclude_none=True) if info.details else {}
    meta = info.modelinfo or {}
    arch = d.get("family", "")
    lines = ["  Model",
             f"    architecture        {arch}",
             f"    parameters          {d.get('parameter_size', '')}",
             f"    context length      {meta.get(Keys.LLM.CONTEXT_LENGTH.format(arch=arch), '')}",
             f"    embedding length    {meta.get(Keys.LLM.EMBEDDING_LENGTH.format(arch=arch), '')}",
             f"    quantization        {d.get('quantization_level', '')}",
             "", "  Capabilities", *[f"    {c}" for c in info.capabilities or []]]
    if info.parameters:
        lines += ["", "  Parameters", *[f"    {p}" for p in info.parameters.splitlines()]]
    # The client's ShowResponse drops the wire's `system`; the Modelfile the server sends carries it.
    system = modelfile.parse(info.modelfile).system if info.modelfile else None
    if system:
        lines += ["", "  System", f"    {system}"]
    if info.license:
        lines += ["", "  License", f"    {info.license.splitlines()[0]}"]
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------- run

def chat_stream(host: str | None, name: str, messages: list[dict[str, Any]], *,
                options: dict[str, Any] | None = None, api_key: str | None = None) -> Iterator[ollama.ChatResponse]:
    """Streamed /api/chat chunks."""
    with _client(host, api_key, what=f"chat with {name}", timeout=None) as client:
        yield from client.chat(name, messages, stream=True, options=options or None)


def start_local_server(host: str | None = None, *, config: str | Path | None = None, overrides: list[str] | None = None,
                       settings: ServeConfig | None = None, wait: float = 60) -> subprocess.Popen[bytes]:
    """Start `python -m tunesmith.app` (the server with its web UI) in the background at `host` and wait until it answers.

    `config`/`overrides` are the CLI's --config/--set, so the server gets the same `serve` section; `settings`
    is a serve section itself (the pipeline's), passed setting by setting.
    """
    parts = urlsplit(host_url(host))
    if parts.hostname not in ("127.0.0.1", "localhost", "::1"):
        raise ClientError(f"no server answers at {host_url(host)}", "start it there with `tunesmith serve`")
    command = [sys.executable, "-m", "tunesmith.app", "--host", parts.hostname or "127.0.0.1",
               "--port", str(parts.port or DEFAULT_PORT)]
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


def run(host: str | None, name: str, prompt: str | None = None, *, stdin: IO[str] | None = None,
        stdout: IO[str] | None = None, options: dict[str, Any] | None = None, api_key: str | None = None) -> None:
    """`tunesmith run NAME [PROMPT]`: one answer for PROMPT, else an interactive chat until /bye or EOF.

    Multi-line input goes between triple quotes, as in `ollama run`.
    """
    stdin = stdin or sys.stdin
    stdout = stdout or sys.stdout
    interactive = stdin.isatty() and prompt is None
    messages: list[dict[str, Any]] = []

    def answer(text: str) -> None:
        messages.append({"role": "user", "content": text})
        reply = []
        for chunk in chat_stream(host, name, messages, options=options, api_key=api_key):
            piece = chunk.message.content or ""
            reply.append(piece)
            stdout.write(piece)
            stdout.flush()
        stdout.write("\n\n" if interactive else "\n")
        stdout.flush()
        messages.append({"role": "assistant", "content": "".join(reply)})

    if prompt is not None:
        answer(prompt)
        return
    if not interactive:
        # Piped input is one prompt, as `echo hi | ollama run NAME` does.
        text = stdin.read().strip()
        if text:
            answer(text)
        return
    while True:
        stdout.write(">>> ")
        stdout.flush()
        line = stdin.readline()
        if not line:
            return
        text = line.rstrip("\n")
        if text.strip() in ("/bye", "/exit"):
            return
        if text.startswith('"""'):
            parts = [text[3:]]
            while not parts[-1].endswith('"""'):
                stdout.write("... ")
                stdout.flush()
                more = stdin.readline()
                if not more:
                    break
                parts.append(more.rstrip("\n"))
            text = "\n".join(parts).removesuffix('"""')
        if text.strip() == "/clear":
            messages.clear()
            continue
        if text.strip():
            answer(text)


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
