"""A bounded fuzz of every request field that reaches llama.cpp, against a real `tunesmith serve` process.

The server runs in its own process: a request that crashes llama.cpp (an abort, a segfault) must show as a
dead server here, not take pytest with it. Every answer must be a success or a 4xx with a one-line error, and
the server must still answer afterwards.
"""

from __future__ import annotations

import json
from typing import Any

import httpx
import pytest

from tests.serve_fixtures import add_smol, start_server_process
from tunesmith.serve.store import Store

# Small numbers keep each generation to a few tokens of a short context.
BASE_OPTIONS = {"num_predict": 2, "num_ctx": 128, "temperature": 0}
# Edges of what llama.cpp takes (int32, int64, float32), beyond them, and the wrong types.
INTS: list[Any] = [-2**63, -2**31 - 1, -1, 0, 1, 2**31 - 1, 2**31, 2**70, 1.5, "1", True, None]
FLOATS: list[Any] = [-1e308, -1.0, 0.0, 1e38, 1e308, "0.5", None]
STRINGS: list[Any] = ["", "\x00", "\ud800", "<|im_start|>", "<|im_end|>", "{{ .Prompt }}", "\u2028é😀", "x" * 5000,
                      5, None, [], {}]
TOKEN_LISTS: list[Any] = [[-5], [49152], [2_000_000_000], [2**31], [2**63], [-2**63], [2**70], [0], [1, 2, 3],
                          ["a"], [1.5], [None], [True], "1", 5]
FORMATS: list[Any] = ["json", "yaml", {}, {"type": "string", "maxLength": 0}, {"enum": []},
                      {"type": "integer", "minimum": 5, "maximum": 1}, {"$ref": "#/nope"},
                      {"type": "array", "minItems": 100_000, "items": {"type": "string"}},
                      {"type": "object", "properties": {"a": {"type": "nonsense"}}}, 5, [], None]
OPTION_VALUES = {
    **{name: INTS for name in ("num_ctx", "num_predict", "num_keep", "num_thread", "num_batch", "seed", "top_k",
                               "repeat_last_n")},
    **{name: FLOATS for name in ("temperature", "top_p", "min_p", "typical_p", "repeat_penalty",
                                 "presence_penalty", "frequency_penalty")},
    "stop": ["", [""], ["\x00"], ["\ud800"], [5], "x" * 5000, 5, None],
}
TOOLS: list[Any] = [[], [{}], [{"type": "function"}], [{"type": "function", "function": {"name": 5}}], "x", 5,
                    [{"type": "function", "function": {"name": "f", "parameters": {"type": "nonsense"}}}]]


@pytest.fixture(scope="module")
def server(tmp_path_factory, smollm2_gguf):
    home = tmp_path_factory.mktemp("fuzz")
    store = Store(home / "models")
    add_smol(store, smollm2_gguf)
    # serve.num_ctx 128: requests that leave the length open (OpenAI's max_tokens unset) end within 128 tokens.
    server = start_server_process(home, "--set", "serve.parallel=2", "--set", "serve.num_ctx=128")
    yield server.process, server.url, server.log
    server.stop()


def _probe(server, path: str, body: dict[str, Any], label: str) -> None:
    process, url, log = server
    try:
        r = httpx.post(url + path, content=json.dumps(body, allow_nan=False).encode(), timeout=120)
    except httpx.HTTPError as exc:
        pytest.fail(f"{label}: no answer ({exc!r}); server exit code {process.poll()}; "
                    f"log: {log.read_text(errors='replace')[-1500:]}")
    assert process.poll() is None, f"{label}: the server died ({process.returncode}): {log.read_text()[-1500:]}"
    assert r.status_code in (200, 400, 404), f"{label}: {r.status_code} {r.text[:500]}"
    if r.status_code != 200:
        error = r.json()["error"]
        message = error["message"] if isinstance(error, dict) else error
        assert isinstance(message, str) and message and "\n" not in message, f"{label}: {message!r}"
        assert "Traceback" not in r.text
    elif path in ("/api/generate", "/api/chat") and not body.get("stream", True):
        assert r.json()["done"] is True, label


def _fields(base: dict[str, Any], fields: dict[str, list[Any]]):
    for field, values in fields.items():
        for value in values:
            yield field, value, {**base, field: value}


def _option_cases(base: dict[str, Any]):
    for name, values in OPTION_VALUES.items():
        for value in values:
            yield f"options.{name}", value, {**base, "options": {**BASE_OPTIONS, name: value}}
    for value in (None, [], "x", 5, {"num_ctx": {"a": 1}}):
        yield "options", value, {**base, "options": value}


@pytest.mark.slow
def test_generate_fields_never_crash_the_server(server):
    base = {"model": "smol", "prompt": "Hi", "stream": False, "options": BASE_OPTIONS}
    fields = {"context": TOKEN_LISTS, "prompt": STRINGS, "suffix": STRINGS, "system": STRINGS, "raw": [True, 5],
              "template": STRINGS + ["{{ range 3 }}{{ . }}{{ end }}", "{{ .Missing.Deep }}", "{{ if }}",
                                     "{{ range 1000000000000 }}{{ end }}"],
              "format": FORMATS, "keep_alive": [-1, 0.0001, "1x", "-5m", 2**70, 1e308, [], True],
              "think": [True, "max", "none", 5], "logprobs": [True, 5], "top_logprobs": INTS,
              "images": [["aGk="], "x", [5]], "stream": [True, 5], "model": ["", "../x", "x" * 300, 5, None]}
    for field, value, body in [*_fields(base, fields), *_option_cases(base)]:
        _probe(server, "/api/generate", body, f"generate {field}={value!r:.60}")
    # A raw prompt with the context of an earlier answer, out-of-range ids in the middle of valid ones.
    _probe(server, "/api/generate", {**base, "context": [1, 2, 49152, 3]}, "generate context with one bad id")


@pytest.mark.slow
def test_chat_fields_never_crash_the_server(server):
    base = {"model": "smol", "messages": [{"role": "user", "content": "Hi"}], "stream": False,
            "options": BASE_OPTIONS}
    messages = [[{"role": "user", "content": s}] for s in STRINGS] + [
        [{"role": r, "content": "x"}] for r in ("", "system", "assistant", "tool", "\x00", 5, None)] + [
        [{"role": "assistant", "content": "", "tool_calls": [{"function": {"name": "f", "arguments": {"a": 1}}}]}],
        [{"role": "user"}], [{}], [5], "x", {}, None]
    fields = {"messages": messages, "format": FORMATS, "tools": TOOLS, "think": [True, "high", 5],
              "logprobs": [True], "top_logprobs": INTS, "keep_alive": [-1, "1x", 2**70]}
    # Options take the same path as generate's, fuzzed there.
    for field, value, body in _fields(base, fields):
        _probe(server, "/api/chat", body, f"chat {field}={value!r:.60}")


@pytest.mark.slow
def test_embed_and_openai_fields_never_crash_the_server(server):
    embed = {"model": "smol", "input": "Hi", "options": BASE_OPTIONS}
    for field, value, body in _fields(embed, {"input": STRINGS + [["a", ""], ["\ud800"]], "truncate": [False, 5],
                                              "dimensions": INTS, "options": [{"num_ctx": v} for v in INTS]}):
        _probe(server, "/api/embed", body, f"embed {field}={value!r:.60}")
    for value in STRINGS:
        _probe(server, "/api/embeddings", {"model": "smol", "prompt": value}, f"embeddings prompt={value!r:.60}")
    chat = {"model": "smol", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2, "temperature": 0}
    fields = {"max_tokens": INTS, "max_completion_tokens": INTS, "seed": INTS, "temperature": FLOATS,
              "top_p": FLOATS, "frequency_penalty": FLOATS, "presence_penalty": FLOATS,
              "stop": OPTION_VALUES["stop"], "logprobs": [True, 5], "top_logprobs": INTS,
              "response_format": [{"type": "json_object"}, {"type": "nonsense"}, "x"] + [
                  {"type": "json_schema", "json_schema": {"schema": f}} for f in FORMATS if isinstance(f, dict)],
              "tools": TOOLS, "reasoning_effort": ["high", 5],
              "logit_bias": [{"49152": 100}, {"-5": -100}, {"x": 1}],
              "messages": [[{"role": "user", "content": [{"type": "text", "text": "Hi"}, {"type": "image_url"}]}],
                           [{"role": "assistant", "tool_calls": [{"function": {"name": "f", "arguments": a}}]}
                            for a in ("{", "[" * 5000, "5", "{\"a\": NaN}")]]}
    for field, value, body in _fields(chat, fields):
        _probe(server, "/v1/chat/completions", body, f"openai chat {field}={value!r:.60}")
    completion = {"model": "smol", "prompt": "Hi", "max_tokens": 2, "temperature": 0}
    for field, value, body in _fields(completion, {"prompt": STRINGS, "suffix": STRINGS, "logprobs": INTS,
                                                   "max_tokens": INTS, "seed": INTS}):
        _probe(server, "/v1/completions", body, f"openai completion {field}={value!r:.60}")
    for field, value, body in _fields({"model": "smol", "input": "Hi"}, {"input": STRINGS, "dimensions": INTS,
                                                                         "encoding_format": ["base64", "x"]}):
        _probe(server, "/v1/embeddings", body, f"openai embeddings {field}={value!r:.60}")
    # Still serving after all of that.
    _, url, _ = server
    r = httpx.post(url + "/api/generate", json={"model": "smol", "prompt": "What is the capital of France?",
                                                "stream": False, "options": {"num_predict": 12, "temperature": 0}},
                   timeout=120)
    assert r.status_code == 200 and "Paris" in r.json()["response"]
