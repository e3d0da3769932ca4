"""Each handler of the route table called by name, without HTTP: its typed request, a real `Server` over a store
holding the built-in SmolLM2 GGUF, and the real engine. And the proof that the OpenAI routes run through the very
functions Ollama's run (`start_chat`, `start_generate`, `embed`)."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import struct

import pytest
from fastapi.responses import Response

from tests.serve_fixtures import MODEL, add_smol
from tests.test_serve_api import QUESTION
from tunesmith.config import ServeConfig
from tunesmith.serve import api_types as t
from tunesmith.serve import handlers, openai_compat
from tunesmith.serve.http import ApiError
from tunesmith.serve.routes import ROUTES
from tunesmith.serve.server import Server
from tunesmith.serve.store import Store

SHORT = {"num_predict": 12}


@pytest.fixture(scope="module")
def loop():
    # One loop for the module: the engine's condition and its loaded model belong to the loop that made them.
    loop = asyncio.new_event_loop()
    yield loop
    loop.close()


@pytest.fixture(scope="module")
def server(tmp_path_factory, smollm2_gguf, loop):
    store = Store(tmp_path_factory.mktemp("store"))
    add_smol(store, smollm2_gguf)
    server = Server(ServeConfig(), store)
    loop.run_until_complete(server.engine.start())
    yield server
    loop.run_until_complete(server.engine.stop())


@pytest.fixture
def run(loop):
    return loop.run_until_complete


async def body_of(response: Response) -> bytes:
    """A reply's bytes, streamed ones read to the end (which closes the generation behind them)."""
    if hasattr(response, "body_iterator"):
        return b"".join([part if isinstance(part, bytes) else part.encode() async for part in response.body_iterator])
    return response.body


def json_of(run, response: Response) -> dict:
    return json.loads(run(body_of(response)))


def lines_of(run, response: Response) -> list[dict]:
    return [json.loads(line) for line in run(body_of(response)).splitlines()]


def sse_of(run, response: Response) -> list[str]:
    return [line.removeprefix("data: ") for line in run(body_of(response)).decode().splitlines() if line]


def upload_request(data: bytes):
    """A real Starlette request carrying `data` as its body, as uvicorn hands one to the app."""
    from starlette.requests import Request

    async def receive():
        return {"type": "http.request", "body": data, "more_body": False}

    return Request({"type": "http", "method": "POST", "path": "/api/blobs", "query_string": b"",
                    "headers": [(b"content-length", str(len(data)).encode())]}, receive)


# ---------------------------------------------------------------------------------------- the route table

def test_the_route_table_names_each_handler():
    pairs = [(route.path, method) for route in ROUTES for method in route.methods]
    assert len(pairs) == len(set(pairs)) == 24  # every (path, method) once
    table = {(route.path, method): route.handler for route in ROUTES for method in route.methods}
    assert table[("/api/chat", "POST")] is handlers.chat
    assert table[("/api/generate", "POST")] is handlers.generate
    assert table[("/v1/chat/completions", "POST")] is openai_compat.chat_completions
    assert table[("/v1/embeddings", "POST")] is openai_compat.embeddings
    assert all(route.handler.__module__ in ("tunesmith.serve.handlers", "tunesmith.serve.openai_compat")
               for route in ROUTES)


# ---------------------------------------------------------------------------------------- Ollama's handlers

def test_root_version_tags_show(server, run):
    assert run(body_of(run(handlers.root(server)))) == b"Ollama is running"
    assert run(handlers.version(server)).version == handlers.OLLAMA_API_VERSION
    assert MODEL in [m.name for m in run(handlers.tags(server)).models]
    shown = run(handlers.show(t.ModelRequest(model="smol"), server))
    assert shown.model_info["general.architecture"] == "llama" and "completion" in shown.capabilities
    with pytest.raises(ApiError) as missing:
        run(handlers.show(t.ModelRequest(model="nope"), server))
    assert missing.value.status == 404


def test_generate_answers_and_streams(server, run):
    answer = json_of(run, run(handlers.generate(
        t.GenerateRequest(model="smol", prompt=QUESTION, stream=False, options=SHORT), server)))
    assert answer["done"] is True and "Paris" in answer["response"] and answer["context"]
    chunks = lines_of(run, run(handlers.generate(t.GenerateRequest(model="smol", prompt=QUESTION, options=SHORT),
                                                 server)))
    assert "Paris" in "".join(c["response"] for c in chunks) and chunks[-1]["done"] is True
    assert [c["done"] for c in chunks].count(True) == 1


def test_generate_without_a_prompt_loads_and_ps_shows_it(server, run):
    loaded = json_of(run, run(handlers.generate(t.GenerateRequest(model="smol"), server)))
    assert loaded["done_reason"] == "load"
    assert [m.name for m in run(handlers.ps(server)).models] == [MODEL]


def test_chat_answers_and_streams(server, run):
    messages = [t.Message(role="user", content=QUESTION)]
    answer = json_of(run, run(handlers.chat(t.ChatRequest(model="smol", messages=messages, stream=False,
                                                          options=SHORT), server)))
    assert answer["message"]["role"] == "assistant" and "Paris" in answer["message"]["content"]
    chunks = lines_of(run, run(handlers.chat(t.ChatRequest(model="smol", messages=messages, options=SHORT), server)))
    assert "Paris" in "".join(c["message"]["content"] for c in chunks) and chunks[-1]["done"] is True
    with pytest.raises(ApiError, match="does not support tools"):
        run(handlers.chat(t.ChatRequest(model="smol", messages=messages, tools=[{"type": "function"}]), server))


def test_embed_and_embeddings(server, run):
    embedded = run(handlers.embed(t.EmbedRequest(model="smol", input=["hello", "world"]), server))
    assert len(embedded.embeddings) == 2 and len(embedded.embeddings[0]) == 576 and embedded.prompt_eval_count
    assert abs(sum(x * x for x in embedded.embeddings[0]) - 1) < 1e-4
    short = run(handlers.embed(t.EmbedRequest(model="smol", input="hello", dimensions=8), server))
    assert len(short.embeddings[0]) == 8
    single = run(handlers.embeddings(t.EmbeddingsRequest(model="smol", prompt="hello"), server))
    assert single.embedding == pytest.approx(embedded.embeddings[0], abs=1e-5)


def test_create_copy_delete(server, run):
    progress = lines_of(run, run(handlers.create(t.CreateRequest(model="brief", from_="smol", system="Be brief."),
                                                 server)))
    assert progress[-1] == {"status": "success"}
    assert server.store.read("brief:latest").system == "Be brief."
    assert run(handlers.copy(t.CopyRequest(source="brief", destination="brief2"), server)).status_code == 200
    assert {"brief:latest", "brief2:latest"} <= {m.name for m in run(handlers.tags(server)).models}
    for name in ("brief", "brief2"):
        assert run(handlers.delete(t.ModelRequest(model=name), server)).status_code == 200
    assert "brief:latest" not in {m.name for m in run(handlers.tags(server)).models}
    with pytest.raises(ApiError, match="neither 'from' or 'files'"):
        run(handlers.create(t.CreateRequest(model="x"), server))


def test_blobs_head_and_post(server, run):
    data = b"some bytes of a blob"
    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    with pytest.raises(ApiError) as missing:
        run(handlers.head_blob(digest, server))
    assert missing.value.status == 404
    assert run(handlers.post_blob(digest, server, upload_request(data))).status_code == 201
    assert run(handlers.head_blob(digest, server)).status_code == 200
    assert run(handlers.post_blob(digest, server, upload_request(data))).status_code == 200  # already there


def test_pull_and_push(server, run):
    assert run(handlers.pull(t.PullRequest(model="smol"), server)).status == "success"
    with pytest.raises(ApiError, match="no registry"):
        run(handlers.pull(t.PullRequest(model="llama3.2"), server))
    with pytest.raises(ApiError, match="no registry"):
        run(handlers.push(t.PullRequest(model="smol"), server))


# ---------------------------------------------------------------------------------------- OpenAI's handlers

def test_openai_models(server, run):
    assert MODEL in [m.id for m in run(openai_compat.list_models(server)).data]
    entry = run(openai_compat.get_model(MODEL, server))
    assert (entry.id, entry.object, entry.owned_by) == (MODEL, "model", "library")


def test_openai_chat_completions(server, run):
    messages = [t.OpenAIMessage(role="user", content=QUESTION)]
    answer = json_of(run, run(openai_compat.chat_completions(
        t.ChatCompletionRequest(model="smol", messages=messages, max_tokens=12, temperature=0), server)))
    assert answer["object"] == "chat.completion" and "Paris" in answer["choices"][0]["message"]["content"]
    assert answer["choices"][0]["finish_reason"] in ("stop", "length") and "logprobs" not in answer["choices"][0]
    assert answer["usage"]["total_tokens"] == answer["usage"]["prompt_tokens"] + answer["usage"]["completion_tokens"]
    events = sse_of(run, run(openai_compat.chat_completions(t.ChatCompletionRequest(
        model="smol", messages=messages, max_tokens=12, temperature=0, stream=True,
        stream_options=t.StreamOptions(include_usage=True)), server)))
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert "Paris" in "".join(c["choices"][0]["delta"]["content"] for c in chunks if c["choices"])
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] > 0
    assert chunks[-2]["choices"][0]["finish_reason"] in ("stop", "length")
    with pytest.raises(ApiError, match="too short"):
        run(openai_compat.chat_completions(t.ChatCompletionRequest(model="smol"), server))


def test_openai_completions(server, run):
    answer = json_of(run, run(openai_compat.completions(
        t.CompletionRequest(model="smol", prompt=QUESTION, max_tokens=12, temperature=0, logprobs=2), server)))
    choice = answer["choices"][0]
    assert answer["object"] == "text_completion" and "Paris" in choice["text"]
    assert len(choice["logprobs"]["tokens"]) == answer["usage"]["completion_tokens"]
    assert "".join(choice["logprobs"]["tokens"]) == choice["text"]
    events = sse_of(run, run(openai_compat.completions(
        t.CompletionRequest(model="smol", prompt=QUESTION, max_tokens=12, temperature=0, stream=True), server)))
    assert events[-1] == "[DONE]"
    assert "Paris" in "".join(json.loads(e)["choices"][0]["text"] for e in events[:-1])


def test_openai_embeddings(server, run):
    floats = run(openai_compat.embeddings(t.OpenAIEmbeddingRequest(model="smol", input=["hello", "world"]), server))
    assert [e.index for e in floats.data] == [0, 1] and floats.usage.prompt_tokens > 0
    packed = run(openai_compat.embeddings(
        t.OpenAIEmbeddingRequest(model="smol", input="hello", encoding_format="base64"), server))
    raw = base64.b64decode(packed.data[0].embedding)
    assert list(struct.unpack(f"<{len(raw) // 4}f", raw)) == pytest.approx(floats.data[0].embedding, abs=1e-6)


# ---------------------------------------------------------------------------------------- one generation path

def test_openai_and_ollama_routes_share_one_generation_path(server, run, monkeypatch):
    calls: list[str] = []

    def counted(name):
        real = getattr(handlers, name)

        async def wrapper(req, *args, **kwargs):
            calls.append(f"{name}:{type(req).__name__}")
            return await real(req, *args, **kwargs)

        monkeypatch.setattr(handlers, name, wrapper)

    for name in ("start_chat", "start_generate", "embed"):
        counted(name)
    chat = [t.Message(role="user", content=QUESTION)]
    run(body_of(run(handlers.chat(t.ChatRequest(model="smol", messages=chat, stream=False, options=SHORT), server))))
    run(body_of(run(openai_compat.chat_completions(t.ChatCompletionRequest(
        model="smol", messages=[t.OpenAIMessage(role="user", content=QUESTION)], max_tokens=4), server))))
    run(body_of(run(handlers.generate(t.GenerateRequest(model="smol", prompt=QUESTION, stream=False, options=SHORT),
                                      server))))
    run(body_of(run(openai_compat.completions(t.CompletionRequest(model="smol", prompt=QUESTION, max_tokens=4),
                                              server))))
    run(handlers.embed(t.EmbedRequest(model="smol", input="hi"), server))
    run(openai_compat.embeddings(t.OpenAIEmbeddingRequest(model="smol", input="hi"), server))
    assert calls == ["start_chat:ChatRequest"] * 2 + ["start_generate:GenerateRequest"] * 2 + ["embed:EmbedRequest"] * 2
