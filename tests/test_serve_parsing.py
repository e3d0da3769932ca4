"""Small pure pieces of the server: think splitting, tool-call parsing, options, keep_alive, host URLs, `run`."""

from __future__ import annotations

import pytest

from tunesmith.serve import address, client, options, thinking, tools
from tunesmith.serve.options import FOREVER, OptionError


def _split(pieces: list[str], **kwargs) -> tuple[str, str]:
    parser = thinking.ThinkingParser(**kwargs)
    thought = content = ""
    for piece in pieces:
        th, ct = parser.add(piece)
        thought, content = thought + th, content + ct
    th, ct = parser.flush()
    return thought + th, content + ct


@pytest.mark.parametrize(("pieces", "expected"), [
    (["<think>", "let me see", "</think>", "\n\nParis"], ("let me see", "Paris")),
    (["<th", "ink>\nhm", "m</th", "ink>Par", "is"], ("hmm", "Paris")),
    (["Paris", " is the capital"], ("", "Paris is the capital")),
    (["  <", "b>bold</b>"], ("", "  <b>bold</b>")),
    (["<think>", "never closed"], ("never closed", "")),
    (["<think></think>", "\n\n", "Paris"], ("", "Paris")),
])
def test_thinking_parser(pieces, expected):
    assert _split(pieces) == expected


def test_thinking_parser_when_the_prompt_opened_the_block():
    assert _split(["still thinking", "</think>", "answer"], started=True) == ("still thinking", "answer")


def test_tool_calls_are_parsed_with_object_arguments():
    text = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'
    assert tools.parse_tool_calls(text) == [
        {"function": {"index": 0, "name": "get_weather", "arguments": {"city": "Paris"}}}]
    bare = '{"name": "get_weather", "arguments": "{\\"city\\": \\"Rome\\"}"}'
    assert tools.parse_tool_calls(bare)[0]["function"]["arguments"] == {"city": "Rome"}
    assert tools.parse_tool_calls(text, {"other"}) == []
    assert tools.parse_tool_calls("Paris is the capital.") == []
    assert tools.may_be_tool_call("<tool") and tools.may_be_tool_call(' {"na')
    assert not tools.may_be_tool_call("Paris")


def test_options_layering_and_types():
    opts = options.resolve(2048, {"temperature": 0.0, "stop": ["a"]}, {"num_predict": 5.0, "stop": "b", "bogus": 1})
    assert (opts.temperature, opts.num_predict, opts.stop, opts.num_ctx) == (0.0, 5, ["b"], 2048)
    with pytest.raises(OptionError, match="top_k"):
        options.resolve(2048, {"top_k": "many"})
    with pytest.raises(OptionError):
        options.resolve(2048, {"num_ctx": 1.5})


@pytest.mark.parametrize(("value", "seconds"), [
    (None, 300.0), ("5m", 300.0), ("1h30m", 5400.0), ("0", 0.0), (0, 0.0), (0.0, 0.0), (10, 10.0),
    ("-1m", FOREVER), (-1, FOREVER), ("1.5s", 1.5), ("300ms", 0.3),
])
def test_keep_alive(value, seconds):
    assert options.keep_alive_seconds(value) == pytest.approx(seconds)


@pytest.mark.parametrize("value", ["10", "-1", "5 minutes", "m", True])
def test_bad_keep_alive(value):
    with pytest.raises(OptionError):
        options.keep_alive_seconds(value)


@pytest.mark.parametrize(("value", "url"), [
    (None, "http://127.0.0.1:11434"),
    ("0.0.0.0", "http://127.0.0.1:11434"),
    ("example.com:8080", "http://example.com:8080"),
    (":9000", "http://127.0.0.1:9000"),
    ("https://models.example.com", "https://models.example.com:443"),
    ("http://[::1]:11434", "http://[::1]:11434"),
])
def test_host_url_parses_like_ollama_host(value, url, monkeypatch):
    monkeypatch.delenv(address.HOST_ENV, raising=False)
    assert client.host_url(value) == url


def test_host_url_reads_tunesmith_host(monkeypatch):
    monkeypatch.setenv(address.HOST_ENV, "127.0.0.1:5555")
    assert client.host_url() == "http://127.0.0.1:5555"


def test_serve_config_from_tunesmith_host(monkeypatch):
    from tunesmith.config import ServeConfig
    from tunesmith.serve.address import server_settings as apply_env

    monkeypatch.setenv("TUNESMITH_HOST", "0.0.0.0:8080")
    monkeypatch.setenv("TUNESMITH_API_KEY", "k")
    config = apply_env(ServeConfig())
    assert (config.host, config.port, config.api_key) == ("0.0.0.0", 8080, "k")
    monkeypatch.setenv("TUNESMITH_HOST", ":9000")
    assert apply_env(ServeConfig(api_key="mine")).model_dump(include={"host", "port", "api_key"}) == {
        "host": "127.0.0.1", "port": 9000, "api_key": "mine"}
