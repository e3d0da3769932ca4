"""The Ollama-compatible HTTP API (FastAPI): thin handlers over the store and the engine.

Routes, status codes and wire shapes follow Ollama's `server/routes.go` (see
shared/reference/ollama-api.md); the OpenAI-compatible routes live in `openai_compat.py`.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import hashlib
import ipaddress
import json
import logging
import os
import time
from collections.abc import AsyncIterator
from pathlib import Path, PurePosixPath
from typing import Any, TypeVar

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from gguf import Keys
from pydantic import BaseModel, ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from tunesmith.config import ServeConfig
from tunesmith.errors import ConfigError, DiskFull, TunesmithError
from tunesmith.serve import api_types as t
from tunesmith.serve import gguf_meta, known_templates, modelfile, options, strict_json, templates
from tunesmith.serve.engine import BadRequest, Engine, EngineError
from tunesmith.serve.generation import (
    Content,
    Done,
    Job,
    Thinking,
    ToolCalls,
    capabilities,
    chat_messages,
    grammar_for,
    logprobs_request,
    resolve_think,
    run,
)
from tunesmith.serve.guard import UI_COOKIE, Guard, allowed_origins, error_response, ui_token
from tunesmith.serve.options import FOREVER, OptionError
from tunesmith.serve.store import (
    BlobNotFound,
    DigestMismatch,
    InvalidDigest,
    InvalidName,
    Manifest,
    ModelNotFound,
    Store,
    StoreError,
    full_name,
    parse_digest,
)
from tunesmith.serve.templates import TemplateError

log = logging.getLogger("tunesmith.serve")

# The Ollama API level these routes implement (clients compare it, e.g. for `think` support).
OLLAMA_API_VERSION = "0.13.0"
MAX_BODY_BYTES = 64 * 1024 * 1024
"""JSON bodies (prompts, base64 images) above this are refused; blob uploads have serve.max_blob_bytes."""
API_KEY_ENV = "TUNESMITH_API_KEY"

M = TypeVar("M", bound=BaseModel)


class ApiError(Exception):
    """An error reply: status code and Ollama's one-line message."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status
        self.message = message


def now_rfc3339() -> str:
    return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def ndjson(obj: BaseModel | dict[str, Any]) -> bytes:
    # ensure_ascii: httpx splits lines on \u2028 and friends, so never send them raw.
    data = obj.wire() if isinstance(obj, t.Response) else obj
    return (json.dumps(data, ensure_ascii=True, separators=(",", ":")) + "\n").encode()


def is_loopback(host: str) -> bool:
    if host in ("localhost", ""):
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def api_key_for(config: ServeConfig) -> str | None:
    return config.api_key or os.environ.get(API_KEY_ENV) or None


def read_api_key_file(path: str | Path) -> str:
    """The key in a key file: its first line, without the line break editors and `echo` add."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: cannot read the API key file ({exc.__class__.__name__}: {exc})",
                          "pass a readable file holding the key on its first line") from exc
    lines = text.splitlines()
    key = lines[0].strip("\r\n") if lines else ""
    if not key:
        raise ConfigError(f"{path}: the API key file is empty", "write the key on its first line")
    return key


MIN_API_KEY = 16


def check_api_key(host: str, api_key: str | None) -> None:
    """A server others can reach needs a key they cannot guess: at least MIN_API_KEY characters, no whitespace
    (a stray space or tab from a shell or a file is not a key)."""
    if is_loopback(host):
        return
    hint = (f"set {API_KEY_ENV} or pass --api-key-file FILE (--api-key shows in the process list); "
            "e.g. `openssl rand -hex 16`; clients send Authorization: Bearer KEY")
    if not api_key:
        raise ConfigError(f"serve.host {host} is not a loopback address and no API key is set", hint)
    if len(api_key) < MIN_API_KEY or any(c.isspace() for c in api_key):
        raise ConfigError(f"serve.host {host} is not a loopback address and its API key is too weak: it must be "
                          f"at least {MIN_API_KEY} characters without whitespace", hint)


async def read_json(request: Request, model: type[M]) -> M:
    """The body as `model`; 400 with a one-line reason for an empty body, bad JSON or wrong types."""
    # Counted as it arrives: a chunked body has no Content-Length for the guard to check.
    parts: list[bytes] = []
    size = 0
    async for part in request.stream():
        size += len(part)
        if size > MAX_BODY_BYTES:
            raise ApiError(413, f"request body too large (limit {MAX_BODY_BYTES} bytes)")
        parts.append(part)
    body = b"".join(parts)
    if not body.strip():
        raise ApiError(400, "missing request body")
    try:
        data = strict_json.loads(body)
    except strict_json.InvalidJSON as exc:
        raise ApiError(400, f"invalid JSON: {exc}") from exc
    if not isinstance(data, dict):
        raise ApiError(400, f"invalid request: expected a JSON object, got {type(data).__name__}")
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        err = exc.errors()[0]
        where = ".".join(str(p) for p in err["loc"]) or "body"
        raise ApiError(400, f"invalid request: {where}: {err['msg']}") from exc


class Server:
    """The state every handler shares: config, store, engine."""

    def __init__(self, config: ServeConfig, store: Store | None = None):
        self.config = config
        self.store = store or Store()
        self.engine = Engine(self.store, config)
        self._context_lengths: dict[str, int | None] = {}

    # ------------------------------------------------------------------ helpers
    def manifest(self, name: str, *, not_found: str | None = None) -> tuple[str, Manifest]:
        if not name:
            raise ApiError(400, "model is required")
        try:
            full = full_name(name)
            return full, self.store.read(full)
        except InvalidName as exc:
            raise ApiError(400, exc.message) from exc
        except ModelNotFound as exc:
            raise ApiError(404, not_found or f"model '{name}' not found") from exc

    def options_for(self, manifest: Manifest, request_options: dict[str, Any] | None) -> options.Options:
        ignored = sorted(options.CPU_IGNORED & set(request_options or {}))
        if ignored:
            log.info("options %s ignored: %s", ", ".join(ignored), options.CPU_IGNORED_REASON)
        opts = options.resolve(self.config.num_ctx, manifest.parameters, request_options)
        return options.fit(opts, self.context_length(manifest))

    def context_length(self, manifest: Manifest) -> int | None:
        """The context the model was trained for (GGUF `<arch>.context_length`), read once per blob."""
        if manifest.model not in self._context_lengths:
            try:
                meta, _ = gguf_meta.read_metadata(self.store.blob_path(manifest.model))
            except (OSError, gguf_meta.GGUFError):
                return None  # loading it will say what is wrong
            value = meta.get(f"{meta.get(Keys.General.ARCHITECTURE)}.context_length")
            self._context_lengths[manifest.model] = value if isinstance(value, int) and value > 0 else None
        return self._context_lengths[manifest.model]

    def keep_alive(self, value: Any) -> float:
        return options.keep_alive_seconds(value, self.config.keep_alive)

    async def load_or_unload(self, name: str, manifest: Manifest, keep_alive: float, opts: options.Options) -> str:
        """An empty prompt loads the model (or unloads it with keep_alive 0), as Ollama does."""
        if keep_alive == 0:
            await self.engine.unload(name)
            return "unload"
        lease = await self.engine.acquire(name, manifest, opts, keep_alive)
        await self.engine.finish(lease)
        return "load"

    def details(self, manifest: Manifest) -> t.ModelDetails:
        return t.ModelDetails(**manifest.details) if manifest.details else t.ModelDetails(format="gguf")


async def watch_disconnect(request: Request, cancel: Any) -> None:
    """Set `cancel` when the client of a non-streaming request goes away."""
    while not cancel.is_set():
        if await request.is_disconnected():
            cancel.set()
            return
        await asyncio.sleep(0.2)


async def primed(request: Request, job: Job, events: AsyncIterator[Any]) -> tuple[Any, AsyncIterator[Any]]:
    """Start a generation and wait for its first event, so errors before any output get a real status code.

    A client that leaves while its request waits in the queue is noticed here, and its turn is skipped.
    """
    watcher = asyncio.create_task(watch_disconnect(request, job.cancel))
    try:
        first = await anext(events)
    except BaseException:
        await events.aclose()
        raise
    finally:
        watcher.cancel()
    return first, events


async def collect(request: Request, job: Job, events: AsyncIterator[Any]) -> list[Any]:
    watcher = asyncio.create_task(watch_disconnect(request, job.cancel))
    try:
        return [event async for event in events]
    finally:
        watcher.cancel()


class ClosingStreamingResponse(StreamingResponse):
    """A StreamingResponse that closes its body when the stream ends, however it ends.

    When the client leaves, Starlette cancels the streaming task. If the cancellation lands while the body
    generator waits for a token, the generator's `finally` runs at once (it stops the generation and gives the
    model back); if it lands while the body waits in `send`, the generator is left suspended at its `yield` and
    its `finally` runs only when the garbage collector finds it: the model went on generating for a client that
    had gone, holding its queue slot (seen once in a full test run). Closing it here, shielded from the
    cancellation, makes the clean-up happen at once either way."""

    async def stream_response(self, send: Any) -> None:
        import anyio

        try:
            await super().stream_response(send)
        finally:
            with anyio.CancelScope(shield=True):
                await self.body_iterator.aclose()


def stream_response(chunks: AsyncIterator[bytes], media_type: str = "application/x-ndjson") -> StreamingResponse:
    return ClosingStreamingResponse(chunks, media_type=media_type)


def all_logprobs(events: list[Any]) -> list[t.Logprob] | None:
    """A non-streamed answer's log probabilities: every event's, in order (None when none were asked for)."""
    return [t.Logprob(**lp) for e in events for lp in e.logprobs] or None


def final_metrics(stats: Any) -> dict[str, Any]:
    # Go's omitempty drops zeros; None does the same here.
    total = stats.total_duration or stats.load_duration + stats.prompt_eval_duration + stats.eval_duration
    return {
        "done_reason": stats.done_reason,
        "total_duration": total or None,
        "load_duration": stats.load_duration or None,
        "prompt_eval_count": stats.prompt_eval_count or None,
        "prompt_eval_duration": stats.prompt_eval_duration or None,
        "eval_count": stats.eval_count or None,
        "eval_duration": stats.eval_duration or None,
    }


def create_app(config: ServeConfig, store: Store | None = None) -> FastAPI:
    """The API app for `config`. Refuses a non-loopback host without an API key."""
    api_key = api_key_for(config)
    check_api_key(config.host, api_key)
    server = Server(config, store)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        server.store.prune_temporaries()  # what killed uploads left behind, as Ollama prunes at start
        await server.engine.start()
        yield
        await server.engine.stop()

    app = FastAPI(title="tunesmith", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.server = server
    app.add_middleware(Guard, api_key=api_key, check_host=is_loopback(config.host), origins=allowed_origins(),
                       max_body=MAX_BODY_BYTES)
    _install_errors(app)
    _ollama_routes(app, server)
    from tunesmith.serve.openai_compat import install_openai_routes

    install_openai_routes(app, server)
    from tunesmith.ui import install_ui

    install_ui(app, Path(config.runs_dir), server.store, api_key)
    return app


_STATUS = {DiskFull: 507, ModelNotFound: 404, BlobNotFound: 400, InvalidName: 400, InvalidDigest: 400, DigestMismatch: 400,
           OptionError: 400, TemplateError: 400, modelfile.ModelfileError: 400, gguf_meta.GGUFError: 400}


def _install_errors(app: FastAPI) -> None:
    @app.exception_handler(ApiError)
    async def api_error(request: Request, exc: ApiError) -> JSONResponse:
        return error_response(request.url.path, exc.status, exc.message)

    @app.exception_handler(TunesmithError)
    async def tunesmith_error(request: Request, exc: TunesmithError) -> JSONResponse:
        status = exc.status_code if isinstance(exc, EngineError) else next(
            (code for kind, code in _STATUS.items() if isinstance(exc, kind)), 500)
        return error_response(request.url.path, status, exc.message)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> Response:
        # Unknown routes and methods answer as Ollama's gin router does: plain text.
        if exc.status_code == 404:
            return PlainTextResponse("404 page not found", 404)
        if exc.status_code == 405:
            return PlainTextResponse("405 method not allowed", 405)
        return error_response(request.url.path, exc.status_code, str(exc.detail))


def _safe_file_name(name: str) -> bool:
    """Go's fs.ValidPath: relative, slash-separated, no `.`/`..`/empty elements, no backslashes."""
    if not name or "\\" in name or name.startswith("/") or ":" in PurePosixPath(name).parts[0]:
        return False
    return all(part not in ("", ".", "..") for part in name.split("/"))


def _ollama_routes(app: FastAPI, server: Server) -> None:
    store, engine = server.store, server.engine

    @app.api_route("/", methods=["GET", "HEAD"])
    async def root() -> Response:
        return PlainTextResponse("Ollama is running")

    @app.api_route("/api/version", methods=["GET", "HEAD"])
    async def version() -> dict[str, Any]:
        return t.VersionResponse(version=OLLAMA_API_VERSION).wire()

    @app.api_route("/api/tags", methods=["GET", "HEAD"])
    async def tags() -> dict[str, Any]:
        models = []
        for name, manifest in store.list():
            models.append(t.ListModel(
                name=name, model=name, modified_at=store.modified_at(name).isoformat(), size=manifest.size,
                digest=hashlib.sha256(store.manifest_path(name).read_bytes()).hexdigest(),
                details=server.details(manifest)))
        return t.ListResponse(models=models).wire()

    @app.post("/api/show")
    async def show(request: Request) -> dict[str, Any]:
        req = await read_json(request, t.ModelRequest)
        name, manifest = server.manifest(req.model)
        path = store.blob_path(manifest.model)
        meta, _ = await asyncio.to_thread(gguf_meta.read_metadata, path)
        mf = modelfile.Modelfile(
            from_=str(path), adapters=[str(store.blob_path(a)) for a in manifest.adapters],
            template=manifest.template, system=manifest.system, parameters=manifest.parameters,
            messages=manifest.messages, license=manifest.license)
        params = "\n".join(f"{k:<30} {json.dumps(v)}" for k, vs in manifest.parameters.items()
                           for v in (vs if isinstance(vs, list) else [vs]))
        return t.ShowResponse(
            license="\n".join(manifest.license) or None,
            modelfile=f'# Modelfile generated by "ollama show"\n# To build a new Modelfile based on this, replace '
                      f"FROM with:\n# FROM {name}\n\n" + mf.to_text(),
            parameters=params or None, template=manifest.template, system=manifest.system,
            details=server.details(manifest), messages=[t.Message(**m) for m in manifest.messages] or None,
            model_info=meta, capabilities=capabilities(manifest),
            modified_at=store.modified_at(name).isoformat()).wire()

    @app.get("/api/ps")
    async def ps() -> dict[str, Any]:
        models = []
        for name, runner in list(engine.runners.items()):
            expires = engine.expires_at(runner)
            if expires == FOREVER:
                expires = time.time() + 100 * 365 * 86400  # Ollama's way of saying "never"
            models.append(t.ProcessModel(
                name=name, model=name, size=runner.size, digest=runner.digest.removeprefix("sha256:"),
                details=server.details(runner.manifest), context_length=runner.num_ctx,
                expires_at=datetime.datetime.fromtimestamp(expires, datetime.UTC).isoformat()))
        return t.ProcessResponse(models=models).wire()

    @app.post("/api/generate")
    async def generate(request: Request) -> Response:
        req = await read_json(request, t.GenerateRequest)
        name, manifest = server.manifest(req.model)
        if req.raw and (req.template or req.system or req.context):
            raise ApiError(400, "raw mode does not support template, system, or context")
        opts = server.options_for(manifest, req.options)
        keep_alive = server.keep_alive(req.keep_alive)
        if req.images:
            raise ApiError(400, f"{req.model} does not support images")
        if not req.prompt:
            reason = await server.load_or_unload(name, manifest, keep_alive, opts)
            return JSONResponse(t.GenerateResponse(model=req.model, created_at=now_rfc3339(), done=True,
                                                   done_reason=reason).wire())
        template = req.template or manifest.template or "{{ .Prompt }}"
        think, think_set = resolve_think(req.model, manifest, req.think)
        if req.suffix and "insert" not in capabilities(manifest) and not req.template:
            raise ApiError(400, f"{req.model} does not support insert")
        grammar = grammar_for(req.format)
        top_logprobs = logprobs_request(req.logprobs, req.top_logprobs)
        if req.raw:
            prompt = req.prompt
        else:
            msgs: list[dict[str, Any]] = []
            system = req.system if req.system is not None else manifest.system
            if system:
                msgs.append({"role": "system", "content": system})
            if not req.context:
                msgs.extend(dict(m) for m in manifest.messages)
            msgs.append({"role": "user", "content": req.prompt})
            prompt = templates.build_prompt(template, msgs, think=think and grammar is None, is_think_set=think_set,
                                            prompt=req.prompt if req.suffix else "", suffix=req.suffix)
        job = Job(name, manifest, prompt, opts, keep_alive, grammar, think=think and grammar is None,
                  context=req.context, top_logprobs=top_logprobs)

        def chunk(event: Any) -> t.GenerateResponse:
            base = {"model": req.model, "created_at": now_rfc3339(), "logprobs": event.logprobs or None}
            if isinstance(event, Done):
                context = None if req.raw else event.stats.tokens
                return t.GenerateResponse(**base, done=True, context=context, **final_metrics(event.stats))
            if isinstance(event, Thinking):
                return t.GenerateResponse(**base, thinking=event.text, done=False)
            text = event.text if isinstance(event, Content) else json.dumps(event.calls)
            return t.GenerateResponse(**base, response=text, done=False)

        first, events = await primed(request, job, run(engine, job))
        if req.stream is False:
            rest = await collect(request, job, events)
            all_events = [first, *rest]
            final = chunk(all_events[-1])
            final.response = "".join(chunk(e).response for e in all_events[:-1])
            final.thinking = "".join(e.text for e in all_events if isinstance(e, Thinking)) or None
            final.logprobs = all_logprobs(all_events)
            return JSONResponse(final.wire())

        async def body() -> AsyncIterator[bytes]:
            try:
                yield ndjson(chunk(first))
                async for event in events:
                    yield ndjson(chunk(event))
            except TunesmithError as exc:
                yield ndjson({"error": exc.message})
            finally:
                job.cancel.set()
                await events.aclose()

        return stream_response(body())

    @app.post("/api/chat")
    async def chat(request: Request) -> Response:
        req = await read_json(request, t.ChatRequest)
        name, manifest = server.manifest(req.model)
        opts = server.options_for(manifest, req.options)
        keep_alive = server.keep_alive(req.keep_alive)
        if not req.messages:
            reason = await server.load_or_unload(name, manifest, keep_alive, opts)
            return JSONResponse(t.ChatResponse(model=req.model, created_at=now_rfc3339(), message=t.ChatMessageOut(),
                                               done=True, done_reason=reason).wire())
        if req.tools and "tools" not in capabilities(manifest):
            raise ApiError(400, f"{req.model} does not support tools")
        if any(m.images for m in req.messages):
            raise ApiError(400, f"{req.model} does not support images")
        think, think_set = resolve_think(req.model, manifest, req.think)
        grammar = grammar_for(req.format)
        think = think and grammar is None  # a format grammar applies from the first token
        top_logprobs = logprobs_request(req.logprobs, req.top_logprobs)
        msgs = chat_messages(manifest, [m.model_dump(exclude_none=True) for m in req.messages])
        prompt = templates.build_prompt(manifest.template or "{{ .Prompt }}", msgs, tools=req.tools or None,
                                        think=think, is_think_set=think_set)
        job = Job(name, manifest, prompt, opts, keep_alive, grammar, think=think, tools=req.tools or None,
                  top_logprobs=top_logprobs)

        def chunk(event: Any) -> t.ChatResponse:
            base = {"model": req.model, "created_at": now_rfc3339(), "logprobs": event.logprobs or None}
            if isinstance(event, Done):
                return t.ChatResponse(**base, message=t.ChatMessageOut(), done=True, **final_metrics(event.stats))
            if isinstance(event, Thinking):
                message = t.ChatMessageOut(thinking=event.text)
            elif isinstance(event, ToolCalls):
                message = t.ChatMessageOut(tool_calls=[t.ToolCall(**c) for c in event.calls])
            else:
                message = t.ChatMessageOut(content=event.text)
            return t.ChatResponse(**base, message=message, done=False)

        first, events = await primed(request, job, run(engine, job))
        if req.stream is False:
            all_events = [first, *await collect(request, job, events)]
            final = chunk(all_events[-1])
            final.message.content = "".join(e.text for e in all_events if isinstance(e, Content))
            final.message.thinking = "".join(e.text for e in all_events if isinstance(e, Thinking)) or None
            calls = [t.ToolCall(**c) for e in all_events if isinstance(e, ToolCalls) for c in e.calls]
            final.message.tool_calls = calls or None
            final.logprobs = all_logprobs(all_events)
            return JSONResponse(final.wire())

        async def body() -> AsyncIterator[bytes]:
            try:
                yield ndjson(chunk(first))
                async for event in events:
                    yield ndjson(chunk(event))
            except TunesmithError as exc:
                yield ndjson({"error": exc.message})
            finally:
                job.cancel.set()
                await events.aclose()

        return stream_response(body())

    @app.post("/api/create")
    async def create(request: Request) -> Response:
        req = await read_json(request, t.CreateRequest)
        if not req.model:
            raise ApiError(400, "model is required")
        name = full_name(req.model)
        if req.quantize:
            raise ApiError(400, "quantize is not supported here; quantize with `tunesmith export`")
        statuses: list[str] = []
        if req.files:
            manifest = _manifest_from_files(store, req.files, statuses)
        elif req.from_:
            _, base = server.manifest(req.from_, not_found=f"model '{req.from_}' not found; tunesmith has no "
                                                           "registry to pull from")
            manifest = base.model_copy(deep=True)
        else:
            raise ApiError(400, "neither 'from' or 'files' was specified")
        for label, digests in (("adapter", req.adapters or {}),):
            for file_name, digest in digests.items():
                if not _safe_file_name(file_name):
                    raise ApiError(400, "file path must be relative")
                digest = parse_digest(digest)
                if not store.has_blob(digest):
                    raise ApiError(400, f"{label} blob {digest} not found; upload it to /api/blobs first")
                if not gguf_meta.is_gguf(store.blob_path(digest)):
                    raise ApiError(400, f"{label} {file_name} is not GGUF; convert it with `tunesmith export`")
                meta, _ = gguf_meta.read_metadata(store.blob_path(digest))
                if meta.get(Keys.General.TYPE) != "adapter":
                    raise ApiError(400, f"{label} {file_name} is a GGUF model, not a LoRA adapter")
                manifest.adapters = [digest]  # llama.cpp applies one LoRA here, as Ollama supports one
        if req.template is not None:
            templates.parse(req.template)  # refuse a template that will not render, now
            manifest.template = req.template
        if req.system is not None:
            manifest.system = req.system
        if req.license is not None:
            manifest.license = [req.license] if isinstance(req.license, str) else list(req.license)
        if req.messages is not None:
            manifest.messages = [m.model_dump(exclude_none=True) for m in req.messages]
        if req.parameters:
            for key in req.parameters:
                if key not in options.Options.__dataclass_fields__ and key not in modelfile.DEPRECATED_OPTIONS \
                        and key not in options.CPU_IGNORED:
                    raise ApiError(400, f"unknown parameter '{key}'")
            ignored = sorted(options.CPU_IGNORED & set(req.parameters))
            if ignored:
                log.info("create %s: parameters %s are kept in the model but ignored: %s", name, ", ".join(ignored),
                         options.CPU_IGNORED_REASON)
            options.resolve(server.config.num_ctx, req.parameters)  # type check
            manifest.parameters = {**manifest.parameters, **{k: v for k, v in req.parameters.items()
                                                            if k not in modelfile.DEPRECATED_OPTIONS}}
        statuses.append("writing manifest")
        store.write(name, manifest)
        statuses.append("success")
        if req.stream is False:
            return JSONResponse({"status": "success"})

        async def body() -> AsyncIterator[bytes]:
            for status in statuses:
                yield ndjson(t.ProgressResponse(status=status))

        return stream_response(body())

    @app.head("/api/blobs/{digest}")
    async def head_blob(digest: str) -> Response:
        try:
            exists = store.has_blob(digest)
        except InvalidDigest as exc:
            raise ApiError(400, exc.message) from exc
        if not exists:
            raise ApiError(404, f'blob "{digest}" not found')
        return Response(status_code=200)

    @app.post("/api/blobs/{digest}")
    async def post_blob(digest: str, request: Request) -> Response:
        parse_digest(digest)
        limit = server.config.max_blob_bytes
        too_large = ApiError(413, f"blob too large (limit {limit} bytes, serve.max_blob_bytes)")
        length = request.headers.get("content-length")
        if length and length.isdigit() and int(length) > limit:
            raise too_large
        size = 0
        with store.blob_writer(digest) as writer:
            async for chunk in request.stream():
                size += len(chunk)
                if size > limit:  # a chunked upload announces no length: count it as it comes
                    raise too_large
                writer.write(chunk)
        return Response(status_code=201 if writer.created else 200)

    @app.post("/api/copy")
    async def copy(request: Request) -> Response:
        req = await read_json(request, t.CopyRequest)
        if not req.source or not req.destination:
            raise ApiError(400, "source and destination are required")
        source, _ = server.manifest(req.source, not_found=f'model "{req.source}" not found')
        store.copy(source, full_name(req.destination))
        return Response(status_code=200)

    @app.delete("/api/delete")
    async def delete(request: Request) -> Response:
        req = await read_json(request, t.ModelRequest)
        name, _ = server.manifest(req.model)
        await engine.unload(name)
        store.delete(name)
        return Response(status_code=200)

    @app.post("/api/embed")
    async def embed(request: Request) -> dict[str, Any]:
        req = await read_json(request, t.EmbedRequest)
        name, manifest = server.manifest(req.model)
        inputs = [req.input] if isinstance(req.input, str) else list(req.input)
        inputs = [text for text in inputs if text]
        if not inputs:
            return t.EmbedResponse(model=req.model, embeddings=[]).wire()
        if req.dimensions is not None and req.dimensions < 1:
            raise ApiError(400, "dimensions must be positive")
        vectors, count, load, total = await _embed(server, name, manifest, req.options, req.keep_alive, inputs,
                                                   req.truncate)
        if req.dimensions:
            from tunesmith.serve.engine import normalize

            vectors = [normalize(v[:req.dimensions]) for v in vectors]
        return t.EmbedResponse(model=req.model, embeddings=vectors, total_duration=total,
                               load_duration=load or None, prompt_eval_count=count).wire()

    @app.post("/api/embeddings")
    async def embeddings(request: Request) -> dict[str, Any]:
        req = await read_json(request, t.EmbeddingsRequest)
        name, manifest = server.manifest(req.model)
        if not req.prompt:
            return t.EmbeddingsResponse(embedding=[]).wire()
        vectors, *_ = await _embed(server, name, manifest, req.options, req.keep_alive, [req.prompt], True)
        return t.EmbeddingsResponse(embedding=vectors[0]).wire()

    @app.post("/api/pull")
    async def pull(request: Request) -> Response:
        req = await read_json(request, t.PullRequest)
        if req.model:
            with contextlib.suppress(StoreError):
                store.read(full_name(req.model))
                # Already here: nothing to pull, which is what Ollama reports for an up-to-date model.
                return JSONResponse({"status": "success"})
        raise ApiError(400, f"cannot pull {req.model!r}: tunesmith has no registry; "
                            "create the model with `tunesmith create` or `tunesmith deploy`")

    @app.post("/api/push")
    async def push(request: Request) -> Response:
        req = await read_json(request, t.PullRequest)
        raise ApiError(400, f"cannot push {req.model!r}: tunesmith has no registry; "
                            "use `tunesmith deploy --to URL` to send a model to an Ollama server")


def _manifest_from_files(store: Store, files: dict[str, str], statuses: list[str]) -> Manifest:
    """The manifest of a new model from uploaded blobs: exactly one GGUF model file."""
    ggufs: list[str] = []
    for file_name, digest in files.items():
        if not _safe_file_name(file_name):
            raise ApiError(400, "file path must be relative")
        digest = parse_digest(digest)
        if not store.has_blob(digest):
            raise ApiError(400, f"blob {digest} not found; upload it to /api/blobs first")
        if file_name.endswith(".safetensors"):
            raise ApiError(400, "safetensors models are not supported here; export to GGUF with `tunesmith export`")
        if file_name.endswith(".gguf") or gguf_meta.is_gguf(store.blob_path(digest)):
            ggufs.append(digest)
            statuses.append(f"using existing layer {digest}")
    if len(ggufs) != 1:
        raise ApiError(400, f"expected one GGUF model file, got {len(ggufs)}")
    statuses.insert(0, "parsing GGUF")
    path = store.blob_path(ggufs[0])
    meta, _ = gguf_meta.read_metadata(path)
    manifest = Manifest(model=ggufs[0], details=gguf_meta.details(path))
    known = known_templates.detect(meta.get(Keys.Tokenizer.CHAT_TEMPLATE))
    if known is not None:
        manifest.template, manifest.parameters = known
    return manifest


async def _embed(server: Server, name: str, manifest: Manifest, request_options: dict[str, Any] | None,
                 keep_alive_value: Any, inputs: list[str], truncate: bool) -> tuple[list[list[float]], int, int, int]:
    started = time.perf_counter_ns()
    opts = server.options_for(manifest, request_options)
    keep_alive = server.keep_alive(keep_alive_value)
    lease = await server.engine.acquire(name, manifest, opts, keep_alive)
    try:
        vectors, count = await server.engine.embed(lease, inputs, truncate)
        await server.engine.finish(lease)
    finally:
        server.engine.release(lease)
    return vectors, count, lease.load_duration, time.perf_counter_ns() - started


def apply_env(config: ServeConfig) -> ServeConfig:
    """`config` with TUNESMITH_HOST (`host`, `host:port`, `:port`, as OLLAMA_HOST) and TUNESMITH_API_KEY applied."""
    from urllib.parse import urlsplit

    update: dict[str, Any] = {}
    value = os.environ.get("TUNESMITH_HOST", "").strip()
    if value:
        parts = urlsplit(value if "://" in value else "http://" + value)
        if parts.hostname:
            update["host"] = parts.hostname
        if parts.port:
            update["port"] = parts.port
    if os.environ.get(API_KEY_ENV) and not config.api_key:
        update["api_key"] = os.environ[API_KEY_ENV]
    return config.model_copy(update=update) if update else config


def serve(config: ServeConfig) -> None:
    """Run the API with uvicorn until interrupted."""
    import uvicorn

    app = create_app(config)
    uvicorn.run(app, host=config.host, port=config.port, log_level="info", timeout_graceful_shutdown=5)


__all__ = ["UI_COOKIE", "BadRequest", "create_app", "serve", "ui_token"]
