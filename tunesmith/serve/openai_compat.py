"""OpenAI-compatible routes (`/v1/...`), translated onto the same jobs as Ollama's, as Ollama's `openai/` does.

Streams are server-sent events ending with `data: [DONE]`; errors use OpenAI's `{"error": {"message", "type"}}`.
"""

from __future__ import annotations

import base64
import json
import random
import struct
import time
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response

from tunesmith.errors import TunesmithError
from tunesmith.serve import api_types as t
from tunesmith.serve import strict_json, templates
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

if TYPE_CHECKING:
    from tunesmith.serve.app import Server


def _sse(data: dict[str, Any] | str) -> bytes:
    payload = data if isinstance(data, str) else json.dumps(data, ensure_ascii=True, separators=(",", ":"))
    return f"data: {payload}\n\n".encode()


def _request_options(req: t.ChatCompletionRequest | t.CompletionRequest, max_tokens: int | None) -> dict[str, Any]:
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
            from tunesmith.serve.app import ApiError

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
                    from tunesmith.serve.app import ApiError

                    raise ApiError(400, f"invalid tool call arguments: {exc}") from exc
            calls.append({"id": call.get("id"), "function": {"name": fn.get("name", ""), "arguments": args}})
        message["tool_calls"] = calls
    if m.role == "tool" and m.name:
        message["tool_name"] = m.name
    return message


def _openai_tool_calls(calls: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [{"id": f"call_{random.getrandbits(32):08x}", "index": c["function"].get("index", i), "type": "function",
             "function": {"name": c["function"]["name"], "arguments": json.dumps(c["function"]["arguments"])}}
            for i, c in enumerate(calls)]


def _openai_logprobs(entries: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Ollama's log probabilities in OpenAI's shape, which always has `bytes` and `top_logprobs` (maybe [])."""
    return [{"token": e["token"], "logprob": e["logprob"], "bytes": e.get("bytes"),
             "top_logprobs": [{"token": a["token"], "logprob": a["logprob"], "bytes": a.get("bytes")}
                              for a in e.get("top_logprobs") or []]} for e in entries]


def _legacy_logprobs(entries: list[dict[str, Any]], offset: int) -> dict[str, Any]:
    """/v1/completions' older shape: parallel lists of tokens, their log probabilities, the alternatives as
    {token: logprob} maps, and each token's character offset in the text (from `offset`)."""
    offsets = []
    for e in entries:
        offsets.append(offset)
        offset += len(e["token"])
    return {"tokens": [e["token"] for e in entries], "token_logprobs": [e["logprob"] for e in entries],
            "top_logprobs": [{a["token"]: a["logprob"] for a in e.get("top_logprobs") or []} for e in entries],
            "text_offset": offsets}


def _usage(stats: Any) -> dict[str, int]:
    return {"prompt_tokens": stats.prompt_eval_count, "completion_tokens": stats.eval_count,
            "total_tokens": stats.prompt_eval_count + stats.eval_count}


def _finish_reason(stats: Any, tool_calls: bool) -> str:
    if tool_calls:
        return "tool_calls"
    return "length" if stats.done_reason == "length" else "stop"


def install_openai_routes(app: FastAPI, server: Server) -> None:
    from tunesmith.serve.app import ApiError, collect, primed, read_json, stream_response

    store, engine = server.store, server.engine

    def model_entry(name: str) -> dict[str, Any]:
        namespace = name.split("/")[0] if "/" in name else "library"
        return {"id": name, "object": "model", "created": int(store.modified_at(name).timestamp()),
                "owned_by": namespace}

    @app.get("/v1/models")
    async def list_models() -> dict[str, Any]:
        return {"object": "list", "data": [model_entry(name) for name, _ in store.list()]}

    @app.get("/v1/models/{model:path}")
    async def get_model(model: str) -> dict[str, Any]:
        name, _ = server.manifest(model)
        return model_entry(name)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        req = await read_json(request, t.ChatCompletionRequest)
        if not req.messages:
            raise ApiError(400, "[] is too short - 'messages'")
        name, manifest = server.manifest(req.model)
        opts = server.options_for(manifest, _request_options(req, req.max_completion_tokens or req.max_tokens))
        fmt: Any = None
        if req.response_format:
            kind = req.response_format.get("type")
            if kind == "json_object":
                fmt = "json"
            elif kind == "json_schema":
                fmt = (req.response_format.get("json_schema") or {}).get("schema") or "json"
        grammar = grammar_for(fmt)
        think_value: Any = None
        if req.reasoning_effort is not None:
            think_value = req.reasoning_effort != "none"
        think, think_set = resolve_think(req.model, manifest, think_value)
        think = think and grammar is None
        top_logprobs = logprobs_request(req.logprobs, req.top_logprobs)
        if req.tools and "tools" not in capabilities(manifest):
            raise ApiError(400, f"{req.model} does not support tools")
        msgs = chat_messages(manifest, [_to_ollama_message(m) for m in req.messages])
        prompt = templates.build_prompt(manifest.template or "{{ .Prompt }}", msgs, tools=req.tools or None,
                                        think=think, is_think_set=think_set)
        job = Job(name, manifest, prompt, opts, server.keep_alive(None), grammar, think=think, tools=req.tools or None,
                  top_logprobs=top_logprobs)
        ident = f"chatcmpl-{random.randrange(999)}"
        created = int(time.time())
        base = {"id": ident, "created": created, "model": req.model, "system_fingerprint": "fp_ollama"}

        first, events = await primed(request, job, run(engine, job))
        if not req.stream:
            all_events = [first, *await collect(request, job, events)]
            stats = next(e.stats for e in all_events if isinstance(e, Done))
            calls = [c for e in all_events if isinstance(e, ToolCalls) for c in e.calls]
            message: dict[str, Any] = {"role": "assistant",
                                       "content": "".join(e.text for e in all_events if isinstance(e, Content))}
            reasoning = "".join(e.text for e in all_events if isinstance(e, Thinking))
            if reasoning:
                message["reasoning"] = reasoning
            if calls:
                message["tool_calls"] = _openai_tool_calls(calls)
            choice: dict[str, Any] = {"index": 0, "message": message, "finish_reason": _finish_reason(stats, bool(calls))}
            if top_logprobs is not None:
                choice["logprobs"] = {"content": _openai_logprobs([lp for e in all_events for lp in e.logprobs])}
            return JSONResponse({**base, "object": "chat.completion", "choices": [choice], "usage": _usage(stats)})

        include_usage = bool(req.stream_options and req.stream_options.include_usage)

        def chunk(delta: dict[str, Any], finish: str | None, logprobs: list[dict[str, Any]] | None = None) -> bytes:
            choice: dict[str, Any] = {"index": 0, "delta": delta, "finish_reason": finish}
            if logprobs:
                choice["logprobs"] = {"content": _openai_logprobs(logprobs)}
            return _sse({**base, "object": "chat.completion.chunk", "choices": [choice]})

        async def body() -> AsyncIterator[bytes]:
            saw_calls = False
            try:
                pending: list[Any] = [first]
                while True:
                    event = pending.pop() if pending else await anext(events)
                    if isinstance(event, Content):
                        yield chunk({"role": "assistant", "content": event.text}, None, event.logprobs)
                    elif isinstance(event, Thinking):
                        yield chunk({"role": "assistant", "content": "", "reasoning": event.text}, None, event.logprobs)
                    elif isinstance(event, ToolCalls):
                        saw_calls = True
                        yield chunk({"role": "assistant", "content": "",
                                     "tool_calls": _openai_tool_calls(event.calls)}, None, event.logprobs)
                    elif isinstance(event, Done):
                        yield chunk({"role": "assistant", "content": ""}, _finish_reason(event.stats, saw_calls),
                                    event.logprobs)
                        if include_usage:
                            yield _sse({**base, "object": "chat.completion.chunk", "choices": [],
                                        "usage": _usage(event.stats)})
                        break
                yield _sse("[DONE]")
            except TunesmithError as exc:
                yield _sse({"error": {"message": exc.message, "type": "api_error", "param": None, "code": None}})
            finally:
                job.cancel.set()
                await events.aclose()

        return stream_response(body(), media_type="text/event-stream")

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        req = await read_json(request, t.CompletionRequest)
        name, manifest = server.manifest(req.model)
        opts = server.options_for(manifest, _request_options(req, req.max_tokens))
        msgs = chat_messages(manifest, [{"role": "user", "content": req.prompt}])
        prompt = templates.build_prompt(manifest.template or "{{ .Prompt }}", msgs,
                                        prompt=req.prompt if req.suffix else "", suffix=req.suffix or "")
        if req.logprobs is not None and not 0 <= req.logprobs <= 5:
            raise ApiError(400, "logprobs must be between 0 and 5")  # OpenAI's limit for this legacy API
        job = Job(name, manifest, prompt, opts, server.keep_alive(None),
                  top_logprobs=req.logprobs)
        ident = f"cmpl-{random.randrange(999)}"
        base = {"id": ident, "object": "text_completion", "created": int(time.time()), "model": req.model,
                "system_fingerprint": "fp_ollama"}

        first, events = await primed(request, job, run(engine, job))
        if not req.stream:
            all_events = [first, *await collect(request, job, events)]
            stats = next(e.stats for e in all_events if isinstance(e, Done))
            text = "".join(e.text for e in all_events if isinstance(e, Content))
            logprobs = None if req.logprobs is None else _legacy_logprobs(
                [lp for e in all_events for lp in e.logprobs], 0)
            return JSONResponse({**base, "choices": [
                {"text": text, "index": 0, "logprobs": logprobs, "finish_reason": _finish_reason(stats, False)}],
                "usage": _usage(stats)})

        include_usage = bool(req.stream_options and req.stream_options.include_usage)

        async def body() -> AsyncIterator[bytes]:
            offset = 0

            def legacy(entries: list[dict[str, Any]]) -> dict[str, Any] | None:
                nonlocal offset
                if req.logprobs is None:
                    return None
                shaped = _legacy_logprobs(entries, offset)
                offset += sum(len(e["token"]) for e in entries)
                return shaped

            try:
                pending: list[Any] = [first]
                while True:
                    event = pending.pop() if pending else await anext(events)
                    if isinstance(event, Content):
                        yield _sse({**base, "choices": [{"text": event.text, "index": 0, "finish_reason": None,
                                                         "logprobs": legacy(event.logprobs)}]})
                    elif isinstance(event, Done):
                        yield _sse({**base, "choices": [{"text": "", "index": 0, "logprobs": legacy(event.logprobs),
                                                         "finish_reason": _finish_reason(event.stats, False)}]})
                        if include_usage:
                            yield _sse({**base, "choices": [], "usage": _usage(event.stats)})
                        break
                yield _sse("[DONE]")
            except TunesmithError as exc:
                yield _sse({"error": {"message": exc.message, "type": "api_error", "param": None, "code": None}})
            finally:
                job.cancel.set()
                await events.aclose()

        return stream_response(body(), media_type="text/event-stream")

    @app.post("/v1/embeddings")
    async def embeddings(request: Request) -> dict[str, Any]:
        from tunesmith.serve.app import _embed
        from tunesmith.serve.engine import normalize

        req = await read_json(request, t.OpenAIEmbeddingRequest)
        name, manifest = server.manifest(req.model)
        inputs = [req.input] if isinstance(req.input, str) else list(req.input)
        if not inputs or not all(inputs):
            raise ApiError(400, "invalid input: empty string")
        vectors, count, _, _ = await _embed(server, name, manifest, None, None, inputs, True)
        if req.dimensions:
            vectors = [normalize(v[:req.dimensions]) for v in vectors]
        data = []
        for i, vector in enumerate(vectors):
            embedding: Any = vector
            if req.encoding_format == "base64":
                embedding = base64.b64encode(struct.pack(f"<{len(vector)}f", *vector)).decode()
            data.append({"object": "embedding", "embedding": embedding, "index": i})
        return {"object": "list", "data": data, "model": req.model,
                "usage": {"prompt_tokens": count, "total_tokens": count}}
