"""OpenAI-compatible handlers (`/v1/...`), translated onto Ollama's, as Ollama's `openai/openai.go` middleware does.

Each request becomes Ollama's (`/v1/chat/completions` a ChatRequest, `/v1/completions` a GenerateRequest,
`/v1/embeddings` an EmbedRequest), runs through the same function `/api/chat`, `/api/generate` or `/api/embed`
runs (`handlers.start_chat`, `handlers.start_generate`, `handlers.embed`), and Ollama's chunks are translated
back. Streams are server-sent events ending with `data: [DONE]`; errors use OpenAI's `{"error": {...}}`.
"""

from __future__ import annotations

import base64
import json
import random
import struct
import time
from collections.abc import AsyncIterator
from typing import Any

from fastapi import Request
from fastapi.responses import JSONResponse, Response

from tunesmith.errors import TunesmithError
from tunesmith.serve import api_types as t
from tunesmith.serve import handlers, strict_json
from tunesmith.serve.generation import Generation
from tunesmith.serve.http import ApiError, sse, stream_response, validated
from tunesmith.serve.server import Server

# ---------------------------------------------------------------------------------------- requests -> Ollama's


def _request_options(req: t.OpenAIGenerationRequest, max_tokens: int | None) -> dict[str, Any]:
    # Ollama's openai middleware: temperature and top_p default to 1.0, as OpenAI's do.
    opts: dict[str, Any] = {"temperature": 1.0 if req.temperature is None else req.temperature,
                            "top_p": 1.0 if req.top_p is None else req.top_p}
    if max_tokens is not None:
        opts["num_predict"] = max_tokens
    if req.seed is not None:
        opts["seed"] = req.seed
    if req.stop is not None:
        opts["stop"] = [req.stop] if isinstance(req.stop, str) else req.stop
    if req.frequency_penalty is not None:
        opts["frequency_penalty"] = req.frequency_penalty
    if req.presence_penalty is not None:
        opts["presence_penalty"] = req.presence_penalty
    return opts


def _message_text(content: str | list[dict[str, Any]] | None) -> str:
    if content is None or isinstance(content, str):
        return content or ""
    parts = []
    for part in content:
        if part.get("type") == "text":
            parts.append(str(part.get("text", "")))
        elif part.get("type") == "image_url":
            raise ApiError(400, "images are not supported by this model")
    return "\n".join(parts)


def _to_ollama_message(m: t.OpenAIMessage) -> dict[str, Any]:
    message: dict[str, Any] = {"role": m.role, "content": _message_text(m.content)}
    if m.reasoning:
        message["thinking"] = m.reasoning
    if m.tool_calls:
        calls = []
        for call in m.tool_calls:
            fn = call.get("function", {})
            args = fn.get("arguments", "{}")
            if isinstance(args, str):
                try:
                    args = strict_json.loads(args)
                except strict_json.InvalidJSON as exc:
                    raise ApiError(400, f"invalid tool call arguments: {exc}") from exc
            calls.append({"id": call.get("id"), "function": {"name": fn.get("name", ""), "arguments": args}})
        message["tool_calls"] = calls
    if m.role == "tool" and m.name:
        message["tool_name"] = m.name
    return message


def to_chat_request(req: t.ChatCompletionRequest) -> t.ChatRequest:
    """Ollama's chat request for an OpenAI chat completion request (openai.go's fromChatRequest)."""
    if not req.messages:
        raise ApiError(400, "[] is too short - 'messages'")
    fmt: Any = None
    if req.response_format:
        kind = req.response_format.get("type")
        if kind == "json_object":
            fmt = "json"
        elif kind == "json_schema":
            fmt = (req.response_format.get("json_schema") or {}).get("schema") or "json"
    think: bool | None = None if req.reasoning_effort is None else req.reasoning_effort != "none"
    return validated(t.ChatRequest, {
        "model": req.model, "messages": [_to_ollama_message(m) for m in req.messages], "stream": req.stream,
        "format": fmt, "tools": req.tools, "think": think, "logprobs": req.logprobs, "top_logprobs": req.top_logprobs,
        "options": _request_options(req, req.max_completion_tokens or req.max_tokens)})


def to_generate_request(req: t.CompletionRequest) -> t.GenerateRequest:
    """Ollama's generate request for an OpenAI (legacy) completion request (openai.go's fromCompleteRequest)."""
    if req.logprobs is not None and not 0 <= req.logprobs <= 5:
        raise ApiError(400, "logprobs must be between 0 and 5")  # OpenAI's limit for this legacy API
    return validated(t.GenerateRequest, {
        "model": req.model, "prompt": req.prompt, "suffix": req.suffix or "", "stream": req.stream,
        "logprobs": req.logprobs is not None, "top_logprobs": req.logprobs or 0,
        "options": _request_options(req, req.max_tokens)})


def to_embed_request(req: t.OpenAIEmbeddingRequest) -> t.EmbedRequest:
    inputs = [req.input] if isinstance(req.input, str) else list(req.input)
    if not inputs or not all(inputs):
        raise ApiError(400, "invalid input: empty string")
    return t.EmbedRequest(model=req.model, input=inputs, dimensions=req.dimensions or None)


# ---------------------------------------------------------------------------------------- Ollama's -> OpenAI's

def _openai_tool_calls(calls: list[t.ToolCall]) -> list[t.OpenAIToolCall]:
    return [t.OpenAIToolCall(id=f"call_{random.getrandbits(32):08x}",
                             index=i if c.function.index is None else c.function.index,
                             function=t.OpenAIFunctionCall(name=c.function.name,
                                                           arguments=json.dumps(c.function.arguments)))
            for i, c in enumerate(calls)]


def _openai_logprobs(entries: list[t.Logprob]) -> t.ChoiceLogprobs:
    """Ollama's log probabilities in OpenAI's shape, which always has `bytes` and `top_logprobs` (maybe [])."""
    return t.ChoiceLogprobs(content=[
        t.OpenAILogprob(token=e.token, logprob=e.logprob, bytes=e.bytes, top_logprobs=[
            t.OpenAITopLogprob(token=a.token, logprob=a.logprob, bytes=a.bytes) for a in e.top_logprobs or []])
        for e in entries])


def _legacy_logprobs(entries: list[t.Logprob], offset: int) -> t.LegacyLogprobs:
    """The legacy shape, each token's character offset counted from `offset`."""
    offsets = []
    for e in entries:
        offsets.append(offset)
        offset += len(e.token)
    return t.LegacyLogprobs(tokens=[e.token for e in entries], token_logprobs=[e.logprob for e in entries],
                            top_logprobs=[{a.token: a.logprob for a in e.top_logprobs or []} for e in entries],
                            text_offset=offsets)


def _usage(final: t.Metrics) -> t.Usage:
    prompt, completion = final.prompt_eval_count or 0, final.eval_count or 0
    return t.Usage(prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion)


def _finish_reason(done_reason: str | None, tool_calls: bool) -> str:
    if tool_calls:
        return "tool_calls"
    return "length" if done_reason == "length" else "stop"


def _sse_stream(events: AsyncIterator[t.OpenAIResponse], generation: Generation[Any]) -> Response:
    async def body() -> AsyncIterator[bytes]:
        try:
            async for event in events:
                yield sse(event)
            yield sse("[DONE]")
        except TunesmithError as exc:
            yield sse(t.OpenAIErrorResponse(error=t.OpenAIErrorDetail(message=exc.message)))
        finally:
            await generation.aclose()

    return stream_response(body(), media_type="text/event-stream")


# ---------------------------------------------------------------------------------------- handlers

def _model_entry(server: Server, name: str) -> t.OpenAIModel:
    namespace = name.split("/")[0] if "/" in name else "library"
    return t.OpenAIModel(id=name, created=int(server.store.modified_at(name).timestamp()), owned_by=namespace)


async def list_models(server: Server) -> t.OpenAIModelList:
    return t.OpenAIModelList(data=[_model_entry(server, name) for name, _ in server.store.list()])


async def get_model(model: str, server: Server) -> t.OpenAIModel:
    name, _ = server.manifest(model)
    return _model_entry(server, name)


async def chat_completions(req: t.ChatCompletionRequest, server: Server, request: Request | None = None) -> Response:
    generation = await handlers.start_chat(to_chat_request(req), server, request)
    base = {"id": f"chatcmpl-{random.randrange(999)}", "created": int(time.time()), "model": req.model}
    if not req.stream:
        final = handlers.merge_chat(await generation.collect())
        calls = final.message.tool_calls or []
        message = t.ChatCompletionMessage(content=final.message.content, reasoning=final.message.thinking or None,
                                          tool_calls=_openai_tool_calls(calls) or None)
        choice = t.ChatCompletionChoice(message=message, finish_reason=_finish_reason(final.done_reason, bool(calls)),
                                        logprobs=_openai_logprobs(final.logprobs or []) if req.logprobs else None)
        return JSONResponse(t.ChatCompletion(**base, choices=[choice], usage=_usage(final)).wire())

    include_usage = bool(req.stream_options and req.stream_options.include_usage)

    def chunk(delta: t.ChatCompletionMessage, finish: str | None,
              logprobs: list[t.Logprob] | None) -> t.ChatCompletionChunk:
        choice = t.ChunkChoice(delta=delta, finish_reason=finish,
                               logprobs=_openai_logprobs(logprobs) if logprobs else None)
        return t.ChatCompletionChunk(**base, choices=[choice])

    async def events() -> AsyncIterator[t.OpenAIResponse]:
        saw_calls = False
        async for c in generation.chunks():
            if c.done:
                yield chunk(t.ChatCompletionMessage(), _finish_reason(c.done_reason, saw_calls), c.logprobs)
                if include_usage:
                    yield t.ChatCompletionChunk(**base, choices=[], usage=_usage(c))
                return
            if c.message.thinking:
                yield chunk(t.ChatCompletionMessage(reasoning=c.message.thinking), None, c.logprobs)
            elif c.message.tool_calls:
                saw_calls = True
                yield chunk(t.ChatCompletionMessage(tool_calls=_openai_tool_calls(c.message.tool_calls)), None,
                            c.logprobs)
            else:
                yield chunk(t.ChatCompletionMessage(content=c.message.content), None, c.logprobs)

    return _sse_stream(events(), generation)


async def completions(req: t.CompletionRequest, server: Server, request: Request | None = None) -> Response:
    generation = await handlers.start_generate(to_generate_request(req), server, request)
    base = {"id": f"cmpl-{random.randrange(999)}", "created": int(time.time()), "model": req.model}
    if not req.stream:
        final = handlers.merge_generate(await generation.collect())
        logprobs = None if req.logprobs is None else _legacy_logprobs(final.logprobs or [], 0)
        choice = t.CompletionChoice(text=final.response, logprobs=logprobs,
                                    finish_reason=_finish_reason(final.done_reason, False))
        return JSONResponse(t.Completion(**base, choices=[choice], usage=_usage(final)).wire())

    include_usage = bool(req.stream_options and req.stream_options.include_usage)

    async def events() -> AsyncIterator[t.OpenAIResponse]:
        offset = 0

        def legacy(entries: list[t.Logprob] | None) -> t.LegacyLogprobs | None:
            nonlocal offset
            if req.logprobs is None:
                return None
            shaped = _legacy_logprobs(entries or [], offset)
            offset += sum(len(e.token) for e in entries or [])
            return shaped

        async for c in generation.chunks():
            if c.done:
                yield t.Completion(**base, choices=[t.CompletionChoice(
                    text="", logprobs=legacy(c.logprobs), finish_reason=_finish_reason(c.done_reason, False))])
                if include_usage:
                    yield t.Completion(**base, choices=[], usage=_usage(c))
                return
            if c.response:
                yield t.Completion(**base, choices=[t.CompletionChoice(text=c.response, logprobs=legacy(c.logprobs))])

    return _sse_stream(events(), generation)


async def embeddings(req: t.OpenAIEmbeddingRequest, server: Server) -> t.OpenAIEmbeddingList:
    answer = await handlers.embed(to_embed_request(req), server)
    data = []
    for i, vector in enumerate(answer.embeddings):
        embedding: list[float] | str = vector
        if req.encoding_format == "base64":
            embedding = base64.b64encode(struct.pack(f"<{len(vector)}f", *vector)).decode()
        data.append(t.OpenAIEmbedding(embedding=embedding, index=i))
    count = answer.prompt_eval_count or 0
    return t.OpenAIEmbeddingList(data=data, model=req.model,
                                 usage=t.EmbeddingUsage(prompt_tokens=count, total_tokens=count))
