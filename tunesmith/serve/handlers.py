"""Ollama's API handlers, one named function per route (as `GenerateHandler`, `ChatHandler` in Ollama's
server/routes.go): each takes its typed request and the `Server`, validates, calls the store or the engine and
shapes the reply. `routes.py` holds the route table; the OpenAI routes (`openai_compat.py`) translate onto
`start_generate`, `start_chat` and `embed` here, so both wire formats share one generation path.

Routes, status codes and wire shapes follow Ollama's `server/routes.go` (see shared/reference/ollama-api.md).
`request`, where a handler takes it, is the HTTP request, to notice a client that leaves (or read a blob's bytes).
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import json
import logging
import time
from collections.abc import AsyncIterator, Callable
from pathlib import PurePosixPath
from typing import Any

from fastapi import Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from gguf import Keys

from tunesmith.digest import file_sha256
from tunesmith.errors import TunesmithError, clip
from tunesmith.serve import api_types as t
from tunesmith.serve import gguf_meta, gotemplate, known_templates, modelfile, options
from tunesmith.serve.engine import normalize
from tunesmith.serve.generation import (
    DEFAULT_TEMPLATE,
    Content,
    Done,
    Event,
    Generation,
    Job,
    Thinking,
    ToolCalls,
    capabilities,
    chat_messages,
    grammar_for,
    logprobs_request,
    resolve_think,
)
from tunesmith.serve.http import ApiError, ndjson, now_rfc3339, stream_response
from tunesmith.serve.prompt import build_prompt
from tunesmith.serve.server import Server
from tunesmith.serve.store import InvalidDigest, Manifest, Store, StoreError, full_name, parse_digest

log = logging.getLogger("tunesmith.serve")

# The Ollama API level these routes implement (clients compare it, e.g. for `think` support).
OLLAMA_API_VERSION = "0.13.0"


def _disconnected(request: Request | None) -> Any:
    return request.is_disconnected if request is not None else None


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


def _all_logprobs(chunks: list[Any]) -> list[t.Logprob] | None:
    """A non-streamed answer's log probabilities: every chunk's, in order (None when none were asked for)."""
    return [lp for c in chunks for lp in c.logprobs or []] or None


async def _answer(generation: Generation[Any], stream: bool | None, merge: Callable[[list[Any]], t.Response]) -> Response:
    """How generate and chat reply: at once when nothing was generated, one merged answer when the client asked
    for no stream, else the stream."""
    if generation.job is None:
        return JSONResponse(generation.first.wire())
    if stream is False:
        return JSONResponse(merge(await generation.collect()).wire())
    return ndjson_stream(generation)


def ndjson_stream(generation: Generation[Any]) -> Response:
    """An Ollama stream: one JSON line per chunk; a failure part-way is one last `{"error": ...}` line."""

    async def body() -> AsyncIterator[bytes]:
        try:
            async for chunk in generation.chunks():
                yield ndjson(chunk)
        except TunesmithError as exc:
            yield ndjson(t.ErrorResponse(error=exc.message))
        finally:
            await generation.aclose()

    return stream_response(body())


# ---------------------------------------------------------------------------------------- server and models

async def root(server: Server) -> Response:
    return PlainTextResponse("Ollama is running")


async def version(server: Server) -> t.VersionResponse:
    return t.VersionResponse(version=OLLAMA_API_VERSION)


async def tags(server: Server) -> t.ListResponse:
    store = server.store
    models = []
    for name, manifest in store.list():
        models.append(t.ListModel(
            name=name, model=name, modified_at=store.modified_at(name).isoformat(), size=manifest.size,
            digest=file_sha256(store.manifest_path(name)),
            details=server.details(manifest)))
    return t.ListResponse(models=models)


async def show(req: t.ModelRequest, server: Server) -> t.ShowResponse:
    store = server.store
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
        modified_at=store.modified_at(name).isoformat())


async def ps(server: Server) -> t.ProcessResponse:
    engine = server.engine
    models = []
    for name, runner in list(engine.runners.items()):
        # Forever, or later than a date can say (year 9999): Ollama's way of saying "never", 100 years on.
        expires = min(engine.expires_at(runner), time.time() + 100 * 365 * 86400)
        models.append(t.ProcessModel(
            name=name, model=name, size=runner.size, digest=runner.digest.removeprefix("sha256:"),
            details=server.details(runner.manifest), context_length=runner.num_ctx,
            expires_at=datetime.datetime.fromtimestamp(expires, datetime.UTC).isoformat()))
    return t.ProcessResponse(models=models)


# ---------------------------------------------------------------------------------------- generation

async def start_generate(req: t.GenerateRequest, server: Server,
                         request: Request | None = None) -> Generation[t.GenerateResponse]:
    """/api/generate's generation (and /v1/completions'): checks, prompt, job; started, shaped as Ollama's chunks."""
    name, manifest = server.manifest(req.model)
    if req.raw and (req.template or req.system or req.context):
        raise ApiError(400, "raw mode does not support template, system, or context")
    opts = server.options_for(manifest, req.options)
    keep_alive = server.keep_alive(req.keep_alive)
    if req.images:
        raise ApiError(400, f"{req.model} does not support images")
    if not req.prompt:
        reason = await server.load_or_unload(name, manifest, keep_alive, opts)
        return Generation.ready(t.GenerateResponse(model=req.model, created_at=now_rfc3339(), done=True,
                                                   done_reason=reason))
    template = req.template or manifest.template or DEFAULT_TEMPLATE
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
        prompt = build_prompt(template, msgs, think=think and grammar is None, is_think_set=think_set,
                              prompt=req.prompt if req.suffix else "", suffix=req.suffix)
    job = Job(name, manifest, prompt, opts, keep_alive, grammar, think=think and grammar is None,
              context=req.context, top_logprobs=top_logprobs)

    def chunk(event: Event) -> t.GenerateResponse:
        base = {"model": req.model, "created_at": now_rfc3339(), "logprobs": event.logprobs or None}
        if isinstance(event, Done):
            context = None if req.raw else event.stats.tokens
            return t.GenerateResponse(**base, done=True, context=context, **final_metrics(event.stats))
        if isinstance(event, Thinking):
            return t.GenerateResponse(**base, thinking=event.text, done=False)
        text = event.text if isinstance(event, Content) else json.dumps(event.calls)
        return t.GenerateResponse(**base, response=text, done=False)

    return await Generation.start(server.engine, job, chunk, _disconnected(request))


def merge_generate(chunks: list[t.GenerateResponse]) -> t.GenerateResponse:
    """One answer from a generation's chunks: the last one, with every chunk's text, thinking and logprobs."""
    final = chunks[-1].model_copy()
    final.response = "".join(c.response for c in chunks)
    final.thinking = "".join(c.thinking or "" for c in chunks) or None
    final.logprobs = _all_logprobs(chunks)
    return final


async def generate(req: t.GenerateRequest, server: Server, request: Request | None = None) -> Response:
    return await _answer(await start_generate(req, server, request), req.stream, merge_generate)


async def start_chat(req: t.ChatRequest, server: Server,
                     request: Request | None = None) -> Generation[t.ChatResponse]:
    """/api/chat's generation (and /v1/chat/completions'): checks, prompt, job; started, shaped as Ollama's chunks."""
    name, manifest = server.manifest(req.model)
    opts = server.options_for(manifest, req.options)
    keep_alive = server.keep_alive(req.keep_alive)
    if not req.messages:
        reason = await server.load_or_unload(name, manifest, keep_alive, opts)
        return Generation.ready(t.ChatResponse(model=req.model, created_at=now_rfc3339(),
                                               message=t.ChatMessageOut(), done=True, done_reason=reason))
    if req.tools and "tools" not in capabilities(manifest):
        raise ApiError(400, f"{req.model} does not support tools")
    if any(m.images for m in req.messages):
        raise ApiError(400, f"{req.model} does not support images")
    think, think_set = resolve_think(req.model, manifest, req.think)
    grammar = grammar_for(req.format)
    think = think and grammar is None  # a format grammar applies from the first token
    top_logprobs = logprobs_request(req.logprobs, req.top_logprobs)
    msgs = chat_messages(manifest, [m.model_dump(exclude_none=True) for m in req.messages])
    prompt = build_prompt(manifest.template or DEFAULT_TEMPLATE, msgs, tools=req.tools or None, think=think,
                          is_think_set=think_set)
    job = Job(name, manifest, prompt, opts, keep_alive, grammar, think=think, tools=req.tools or None,
              top_logprobs=top_logprobs)

    def chunk(event: Event) -> t.ChatResponse:
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

    return await Generation.start(server.engine, job, chunk, _disconnected(request))


def merge_chat(chunks: list[t.ChatResponse]) -> t.ChatResponse:
    """One answer from a chat's chunks: the last one, with every chunk's content, thinking, tool calls, logprobs."""
    final = chunks[-1].model_copy(deep=True)
    final.message.content = "".join(c.message.content for c in chunks)
    final.message.thinking = "".join(c.message.thinking or "" for c in chunks) or None
    final.message.tool_calls = [call for c in chunks for call in c.message.tool_calls or []] or None
    final.logprobs = _all_logprobs(chunks)
    return final


async def chat(req: t.ChatRequest, server: Server, request: Request | None = None) -> Response:
    return await _answer(await start_chat(req, server, request), req.stream, merge_chat)


# ---------------------------------------------------------------------------------------- embeddings

async def embed(req: t.EmbedRequest, server: Server) -> t.EmbedResponse:
    name, manifest = server.manifest(req.model)
    inputs = [req.input] if isinstance(req.input, str) else list(req.input)
    inputs = [text for text in inputs if text]
    if not inputs:
        return t.EmbedResponse(model=req.model, embeddings=[])
    if req.dimensions is not None and req.dimensions < 1:
        raise ApiError(400, "dimensions must be positive")
    vectors, count, load, total = await server.embed(name, manifest, req.options, req.keep_alive, inputs,
                                                     req.truncate)
    if req.dimensions:
        vectors = [normalize(v[:req.dimensions]) for v in vectors]
    return t.EmbedResponse(model=req.model, embeddings=vectors, total_duration=total, load_duration=load or None,
                           prompt_eval_count=count)


async def embeddings(req: t.EmbeddingsRequest, server: Server) -> t.EmbeddingsResponse:
    name, manifest = server.manifest(req.model)
    if not req.prompt:
        return t.EmbeddingsResponse(embedding=[])
    vectors, *_ = await server.embed(name, manifest, req.options, req.keep_alive, [req.prompt], True)
    return t.EmbeddingsResponse(embedding=vectors[0])


# ---------------------------------------------------------------------------------------- the model store

def _safe_file_name(name: str) -> bool:
    """Go's fs.ValidPath: relative, slash-separated, no `.`/`..`/empty elements, no backslashes."""
    if not name or "\\" in name or name.startswith("/") or ":" in PurePosixPath(name).parts[0]:
        return False
    return all(part not in ("", ".", "..") for part in name.split("/"))


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


def _adapter(store: Store, file_name: str, digest: str) -> str:
    """The digest of an uploaded LoRA adapter, checked: a GGUF of type adapter."""
    if not _safe_file_name(file_name):
        raise ApiError(400, "file path must be relative")
    digest = parse_digest(digest)
    if not store.has_blob(digest):
        raise ApiError(400, f"adapter blob {digest} not found; upload it to /api/blobs first")
    if not gguf_meta.is_gguf(store.blob_path(digest)):
        raise ApiError(400, f"adapter {clip(file_name)} is not GGUF; convert it with `tunesmith export`")
    meta, _ = gguf_meta.read_metadata(store.blob_path(digest))
    if meta.get(Keys.General.TYPE) != "adapter":
        raise ApiError(400, f"adapter {clip(file_name)} is a GGUF model, not a LoRA adapter")
    return digest


async def create(req: t.CreateRequest, server: Server) -> Response:
    store = server.store
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
    for file_name, digest in (req.adapters or {}).items():
        manifest.adapters = [_adapter(store, file_name, digest)]  # llama.cpp applies one LoRA, as Ollama supports one
    if req.template is not None:
        gotemplate.parse(req.template)  # refuse a template that will not render, now
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
                raise ApiError(400, f"unknown parameter '{clip(key)}'")
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
        return JSONResponse(t.ProgressResponse(status="success").wire())

    async def body() -> AsyncIterator[bytes]:
        for status in statuses:
            yield ndjson(t.ProgressResponse(status=status))

    return stream_response(body())


async def head_blob(digest: str, server: Server) -> Response:
    try:
        exists = server.store.has_blob(digest)
    except InvalidDigest as exc:
        raise ApiError(400, exc.message) from exc
    if not exists:
        raise ApiError(404, f'blob "{digest}" not found')
    return Response(status_code=200)


async def post_blob(digest: str, server: Server, request: Request) -> Response:
    parse_digest(digest)
    limit = server.config.max_blob_bytes
    too_large = ApiError(413, f"blob too large (limit {limit} bytes, serve.max_blob_bytes)")
    length = request.headers.get("content-length")
    if length and length.isdigit() and int(length) > limit:
        raise too_large
    size = 0
    with server.store.blob_writer(digest) as writer:
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:  # a chunked upload announces no length: count it as it comes
                raise too_large
            writer.write(chunk)
    return Response(status_code=201 if writer.created else 200)


async def copy(req: t.CopyRequest, server: Server) -> Response:
    if not req.source or not req.destination:
        raise ApiError(400, "source and destination are required")
    source, _ = server.manifest(req.source, not_found=f'model "{req.source}" not found')
    server.store.copy(source, full_name(req.destination))
    return Response(status_code=200)


async def delete(req: t.ModelRequest, server: Server) -> Response:
    name, _ = server.manifest(req.model)
    await server.engine.unload(name)
    server.store.delete(name)
    return Response(status_code=200)


async def pull(req: t.PullRequest, server: Server) -> t.ProgressResponse:
    if req.model:
        with contextlib.suppress(StoreError):
            server.store.read(full_name(req.model))
            # Already here: nothing to pull, which is what Ollama reports for an up-to-date model.
            return t.ProgressResponse(status="success")
    raise ApiError(400, f"cannot pull {clip(repr(req.model))}: tunesmith has no registry; "
                        "create the model with `tunesmith create` or `tunesmith deploy`")


async def push(req: t.PullRequest, server: Server) -> Response:
    raise ApiError(400, f"cannot push {clip(repr(req.model))}: tunesmith has no registry; "
                        "use `tunesmith deploy --to URL` to send a model to an Ollama server")
