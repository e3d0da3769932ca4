"""HTTP plumbing the handlers share (and the web UI mounted on the same app): the error a handler raises and the
bodies errors get, reading a JSON body as Go does, and streaming NDJSON or server-sent events."""

from __future__ import annotations

import asyncio
import datetime
import json
import logging
from collections.abc import AsyncIterator
from typing import Any, TypeVar

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from pydantic import BaseModel, ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from tunesmith.errors import DiskFull, TunesmithError, clip
from tunesmith.serve import api_types as t
from tunesmith.serve import gguf_meta, modelfile, strict_json
from tunesmith.serve.engine import EngineError
from tunesmith.serve.gotemplate import TemplateError
from tunesmith.serve.guard import error_response
from tunesmith.serve.options import OptionError
from tunesmith.serve.store import BlobNotFound, DigestMismatch, InvalidDigest, InvalidName, ModelNotFound
from tunesmith.serve.timeouts import RequestTimeout

log = logging.getLogger("tunesmith.serve")

NAME_BODY_BYTES = 64 * 1024
"""show, copy, delete, pull, push: a model name or two and a few flags."""
PROMPT_BODY_BYTES = 8 * 1024 * 1024
"""generate, chat, embed, create and the OpenAI routes: a prompt, a conversation, a template; a million tokens
of text fits (images are not supported here)."""
MAX_BODY_BYTES = PROMPT_BODY_BYTES
"""The largest JSON body of any route: the guard refuses a longer one before it reaches a route. Blob uploads
have serve.max_blob_bytes."""
OFF_LOOP_BYTES = 64 * 1024
"""Bodies longer than this are parsed in a worker thread; shorter ones take microseconds, less than the hop."""

M = TypeVar("M", bound=BaseModel)


class ApiError(Exception):
    """An error reply: status code and Ollama's one-line message."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status
        self.message = message


def now_rfc3339() -> str:
    return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def validated(model: type[M], data: Any) -> M:
    """`data` as `model`; 400 with a one-line reason for wrong types."""
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        err = exc.errors()[0]
        where = ".".join(str(p) for p in err["loc"]) or "body"  # a dict's keys are the client's: cut them
        raise ApiError(400, f"invalid request: {clip(where)}: {clip(err['msg'], 200)}") from exc


def too_large(limit: int) -> ApiError:
    return ApiError(413, f"request body too large (limit {limit:,} bytes)")


async def read_body(request: Request, limit: int) -> bytearray:
    """The request's body, refused (413) once it is over `limit`: before a byte is read when its Content-Length
    says so (uvicorn then discards what the client still sends), else as it arrives (a chunked body)."""
    length = request.headers.get("content-length")
    if length and length.isdigit() and int(length) > limit:
        raise too_large(limit)
    body = bytearray()
    async for part in request.stream():
        if len(body) + len(part) > limit:
            raise too_large(limit)
        body += part
    return body


async def read_json(request: Request, model: type[M], limit: int = MAX_BODY_BYTES) -> M:
    """The body as `model`, at most `limit` bytes (413 beyond); 400 with a one-line reason for an empty body, bad
    JSON or wrong types. A long body is parsed and validated in a worker thread: the event loop goes on serving
    other clients (and streaming their tokens) meanwhile."""
    try:
        body = strict_json.text(await read_body(request, limit))  # the bytes go at once: a body is held once
    except strict_json.InvalidJSON as exc:
        raise ApiError(400, f"invalid JSON: {exc}") from exc
    if len(body) > OFF_LOOP_BYTES:
        return await asyncio.to_thread(parse_json, body, model)
    return parse_json(body, model)


def parse_json(body: str, model: type[M]) -> M:
    if not body or body.isspace():
        raise ApiError(400, "missing request body")
    try:
        data = strict_json.loads(body)
    except strict_json.InvalidJSON as exc:
        raise ApiError(400, f"invalid JSON: {exc}") from exc
    if not isinstance(data, dict):
        raise ApiError(400, f"invalid request: expected a JSON object, got {type(data).__name__}")
    return validated(model, data)


def _json_line(data: dict[str, Any]) -> str:
    # ensure_ascii: httpx splits lines on \u2028 and friends, so never send them raw.
    return json.dumps(data, ensure_ascii=True, separators=(",", ":"))


def ndjson(obj: t.Response) -> bytes:
    """One line of an Ollama stream."""
    return (_json_line(obj.wire()) + "\n").encode()


def sse(obj: t.OpenAIResponse | str) -> bytes:
    """One server-sent event of an OpenAI stream (`[DONE]` ends it)."""
    return f"data: {obj if isinstance(obj, str) else _json_line(obj.wire())}\n\n".encode()


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


_STATUS = {DiskFull: 507, ModelNotFound: 404, BlobNotFound: 400, InvalidName: 400, InvalidDigest: 400, DigestMismatch: 400,
           OptionError: 400, TemplateError: 400, modelfile.ModelfileError: 400, gguf_meta.GGUFError: 400}


def install_errors(app: FastAPI) -> None:
    """Every error as Ollama's `{"error": ...}` with its status (OpenAI's error object under /v1/)."""

    @app.exception_handler(ApiError)
    async def api_error(request: Request, exc: ApiError) -> JSONResponse:
        return error_response(request.url.path, exc.status, exc.message)

    @app.exception_handler(TunesmithError)
    async def tunesmith_error(request: Request, exc: TunesmithError) -> JSONResponse:
        status = exc.status_code if isinstance(exc, EngineError) else next(
            (code for kind, code in _STATUS.items() if isinstance(exc, kind)), 500)
        return error_response(request.url.path, status, exc.message)

    @app.exception_handler(ClientDisconnect)
    async def client_gone(request: Request, exc: ClientDisconnect) -> Response:
        # A normal event (a client that gave up, a cut connection): one line, and nobody left to answer.
        log.info("%s %s: the client went away before its request body was complete", request.method,
                 clip(request.url.path))
        return Response(status_code=400)

    @app.exception_handler(RequestTimeout)
    async def timed_out(request: Request, exc: RequestTimeout) -> Response:
        log.info("%s %s: %s; connection closed", request.method, clip(request.url.path), exc)
        response = error_response(request.url.path, 408, str(exc))
        response.headers["connection"] = "close"  # uvicorn closes it once this is sent
        return response

    @app.exception_handler(Exception)
    async def bug(request: Request, exc: Exception) -> Response:
        # A bug: Starlette logs its traceback after this answer; the client still gets the route's error shape.
        return error_response(request.url.path, 500, f"internal server error: {clip(type(exc).__name__)}")

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> Response:
        # Unknown routes and methods answer as Ollama's gin router does: plain text.
        if exc.status_code == 404:
            return PlainTextResponse("404 page not found", 404)
        if exc.status_code == 405:
            return PlainTextResponse("405 method not allowed", 405)
        return error_response(request.url.path, exc.status_code, str(exc.detail))
