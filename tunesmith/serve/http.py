"""HTTP plumbing the handlers share (and the web UI mounted on the same app): the error a handler raises and the
bodies errors get, reading a JSON body as Go does, and streaming NDJSON or server-sent events."""

from __future__ import annotations

import datetime
import json
from collections.abc import AsyncIterator
from typing import Any, TypeVar

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from pydantic import BaseModel, ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from tunesmith.errors import DiskFull, TunesmithError
from tunesmith.serve import api_types as t
from tunesmith.serve import gguf_meta, modelfile, strict_json
from tunesmith.serve.engine import EngineError
from tunesmith.serve.gotemplate import TemplateError
from tunesmith.serve.guard import error_response
from tunesmith.serve.options import OptionError
from tunesmith.serve.store import BlobNotFound, DigestMismatch, InvalidDigest, InvalidName, ModelNotFound

MAX_BODY_BYTES = 64 * 1024 * 1024
"""JSON bodies (prompts, base64 images) above this are refused; blob uploads have serve.max_blob_bytes."""

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
        where = ".".join(str(p) for p in err["loc"]) or "body"
        raise ApiError(400, f"invalid request: {where}: {err['msg']}") from exc


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

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> Response:
        # Unknown routes and methods answer as Ollama's gin router does: plain text.
        if exc.status_code == 404:
            return PlainTextResponse("404 page not found", 404)
        if exc.status_code == 405:
            return PlainTextResponse("405 method not allowed", 405)
        return error_response(request.url.path, exc.status_code, str(exc.detail))
