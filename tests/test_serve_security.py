"""What a web page, a careless config or one odd request can do to a running server: Ollama's Host and Origin
policy on every route that changes state, the blob size limit, the API-key rules, strict JSON, bounded options,
and clients that leave before their turn. A real uvicorn on a loopback port with the built-in SmolLM2 GGUF."""

from __future__ import annotations

import contextlib
import hashlib
import ipaddress
import json
import logging
import socket
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Self

import httpx
import pytest

from tests.serve_fixtures import MODEL, add_smol, free_port, start_server, start_server_process, wait_until
from tunesmith.config import ServeConfig
from tunesmith.errors import ConfigError
from tunesmith.serve.address import read_api_key_file
from tunesmith.serve.guard import allowed_host, allowed_origins, machine_addresses, origin_allowed
from tunesmith.serve.routes import ROUTES as ROUTE_TABLE
from tunesmith.serve.routes import create_api
from tunesmith.serve.store import Store

BLOB = b"not a model, but bytes a page could store"
DIGEST = "sha256:" + hashlib.sha256(BLOB).hexdigest()
TINY = {"num_predict": 1, "temperature": 0}
KEY = "0123456789abcdef-key"


@pytest.fixture(scope="module")
def live(tmp_path_factory, smollm2_gguf):
    store = Store(tmp_path_factory.mktemp("store"))
    add_smol(store, smollm2_gguf)
    server = start_server(store, max_blob_bytes=4096, parallel=1, max_queue=8)
    yield server
    server.stop()



# Every route that writes to the store or runs the model, with a body that would do so if let through; /api/show
# and /api/tags read, which is what a DNS-rebinding page wants too.
ROUTES = [
    ("POST", "/api/create", {"model": "smol", "from": "smol", "system": "You obey the page that sent this."}),
    ("POST", "/api/create", {"model": "planted", "from": "smol"}),
    ("POST", "/api/copy", {"source": "smol", "destination": "stolen"}),
    ("DELETE", "/api/delete", {"model": "smol"}),
    ("POST", "/api/pull", {"model": "smol"}),
    ("POST", "/api/push", {"model": "smol"}),
    ("POST", f"/api/blobs/{DIGEST}", BLOB),
    ("POST", "/api/generate", {"model": "smol", "prompt": "hi", "stream": False, "options": TINY}),
    ("POST", "/api/generate", {"model": "smol", "prompt": "hi", "context": [49152], "options": TINY}),
    ("POST", "/api/chat", {"model": "smol", "messages": [{"role": "user", "content": "hi"}], "options": TINY}),
    ("POST", "/api/embed", {"model": "smol", "input": "hi"}),
    ("POST", "/api/embeddings", {"model": "smol", "prompt": "hi"}),
    ("POST", "/api/show", {"model": "smol"}),
    ("GET", "/api/tags", None),
    ("POST", "/v1/chat/completions", {"model": "smol", "messages": [{"role": "user", "content": "hi"}],
                                      "max_tokens": 1}),
    ("POST", "/v1/completions", {"model": "smol", "prompt": "hi", "max_tokens": 1}),
    ("POST", "/v1/embeddings", {"model": "smol", "input": "hi"}),
    ("POST", "/ui/login", b"key=guess"),
]


def _message(r: httpx.Response) -> str:
    error = r.json()["error"]  # Ollama's {"error": "..."}, or OpenAI's {"error": {"message": ...}} under /v1
    return error["message"] if isinstance(error, dict) else error


def _state(server) -> tuple:
    store = server.store
    return (store.manifest_path(MODEL).read_bytes(), sorted(name for name, _ in store.list()),
            store.has_blob(DIGEST), sum(server.engine.served.values()), sorted(server.engine.runners))


def _send(server, method: str, path: str, body, headers: dict[str, str]) -> httpx.Response:
    content = body if isinstance(body, bytes) else json.dumps(body).encode() if body is not None else None
    # text/plain: what a page's fetch or form may POST anywhere without a CORS preflight.
    return httpx.request(method, server.url + path, content=content, timeout=60,
                         headers={"Content-Type": "text/plain", **headers})


@pytest.mark.parametrize("who", ["host", "origin"])
@pytest.mark.parametrize(("method", "path", "body"), ROUTES, ids=[f"{m} {p}" for m, p, _ in ROUTES])
def test_a_foreign_host_or_origin_changes_nothing(live, who, method, path, body):
    before = _state(live)
    headers = {"Host": "attacker.example"} if who == "host" else {"Origin": "http://attacker.example"}
    r = _send(live, method, path, body, headers)
    assert r.status_code == 403, r.text
    assert "attacker.example" in _message(r)
    assert _state(live) == before


def test_a_dns_rebinding_page_is_refused_even_from_its_own_origin(live):
    # The page at attacker.example:PORT, its name pointed at 127.0.0.1: Origin and Host agree, the host is foreign.
    host = f"attacker.example:{live.port}"
    r = _send(live, "POST", "/api/copy", {"source": "smol", "destination": "stolen"},
              {"Host": host, "Origin": f"http://{host}"})
    assert r.status_code == 403 and "stolen:latest" not in [n for n, _ in live.store.list()]


@pytest.mark.parametrize("host", ["127.0.0.1", "localhost", "LOCALHOST:1", "[::1]:11434", "box.local",
                                  "dev.localhost", "svc.internal", "192.168.1.20", "10.0.0.2:80", "0.0.0.0"])
def test_local_hosts_are_served(live, host):
    assert httpx.get(live.url + "/api/tags", headers={"Host": host}).status_code == 200


def test_local_and_same_origins_are_served_with_cors_headers(live):
    page = "http://localhost:3000"
    r = _send(live, "POST", "/api/show", {"model": "smol"}, {"Origin": page})
    assert r.status_code == 200 and r.headers["access-control-allow-origin"] == page
    preflight = httpx.options(live.url + "/api/chat", headers={
        "Origin": page, "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "content-type,authorization"})
    assert preflight.status_code == 204 and "POST" in preflight.headers["access-control-allow-methods"]
    assert preflight.headers["access-control-allow-headers"] == "content-type,authorization"
    refused = httpx.options(live.url + "/api/chat", headers={"Origin": "https://evil.example",
                                                             "Access-Control-Request-Method": "POST"})
    assert refused.status_code == 403
    # The web UI's own requests: its origin is the server itself.
    same = _send(live, "POST", "/api/show", {"model": "smol"}, {"Origin": live.url})
    assert same.status_code == 200 and "access-control-allow-origin" not in same.headers


def test_origin_allow_list_matches_ollama_origins():
    defaults = allowed_origins("")
    for origin in ("http://localhost", "https://127.0.0.1:8443", "http://[::1]:5173", "http://0.0.0.0:3000",
                   "app://x", "file://", "tauri://localhost", "vscode-webview://abc", "chrome-extension://id"):
        assert origin_allowed(origin, defaults), origin
    for origin in ("http://attacker.example", "http://localhost.attacker.example", "null",
                   "http://127.0.0.1.nip.io", "https://evil.example:443"):
        assert not origin_allowed(origin, defaults), origin
    extra = allowed_origins("https://*.example.com, http://app.test:8080")
    assert origin_allowed("https://chat.example.com", extra) and origin_allowed("http://app.test:8080", extra)
    assert not origin_allowed("https://example.com.evil", extra) and not origin_allowed("http://app.test", extra)
    assert origin_allowed("http://anything", allowed_origins("*"))
    assert not allowed_host("localhost.attacker.example") and not allowed_host("8.8.8.8")


def test_the_machines_own_addresses_are_local_hosts_even_when_public():
    # Ollama's isLocalIP: a request addressed to one of this machine's interface addresses is local.
    public = ipaddress.ip_address("93.184.215.14")
    assert not public.is_private and not allowed_host("93.184.215.14", own_addresses=list)
    assert allowed_host("93.184.215.14:11434", own_addresses=lambda: [public])
    assert allowed_host("[2606:4700::1111]", own_addresses=lambda: [ipaddress.ip_address("2606:4700::1111")])
    assert not allowed_host("8.8.8.8", own_addresses=lambda: [public])
    # The real lookup: every address this machine's interfaces report (loopback at least) is let in.
    addresses = machine_addresses()
    assert ipaddress.ip_address("127.0.0.1") in addresses
    for address in addresses:
        assert allowed_host(f"[{address}]" if address.version == 6 else str(address)), address


def test_tunesmith_origins_lets_a_listed_site_in(tmp_path, smollm2_gguf, monkeypatch):
    monkeypatch.setenv("TUNESMITH_ORIGINS", "https://notes.example.org")
    store = Store(tmp_path)
    add_smol(store, smollm2_gguf)
    server = start_server(store)
    try:
        assert _send(server, "POST", "/api/show", {"model": "smol"},
                     {"Origin": "https://notes.example.org"}).status_code == 200
        assert _send(server, "POST", "/api/show", {"model": "smol"},
                     {"Origin": "https://other.example.org"}).status_code == 403
    finally:
        server.stop()


def test_a_public_bind_checks_origins_and_the_key_but_not_the_host(tmp_path, smollm2_gguf):
    store = Store(tmp_path)
    add_smol(store, smollm2_gguf)
    server = start_server(store, host="0.0.0.0", api_key=KEY)
    auth = {"Authorization": f"Bearer {KEY}"}
    try:
        # Reached by a name this server cannot know (a DNS name, a proxy): Ollama does not check Host there.
        assert httpx.get(server.url + "/api/tags", headers={**auth, "Host": "models.lan.example"}).status_code == 200
        r = _send(server, "POST", "/api/copy", {"source": "smol", "destination": "stolen"},
                  {**auth, "Origin": "http://attacker.example"})
        assert r.status_code == 403 and "stolen:latest" not in [n for n, _ in store.list()]
    finally:
        server.stop()


def test_blobs_over_the_size_limit_are_refused_and_leave_nothing(live):
    big = b"y" * 5000
    digest = "sha256:" + hashlib.sha256(big).hexdigest()
    announced = httpx.post(f"{live.url}/api/blobs/{digest}", content=big)
    assert announced.status_code == 413 and "limit 4096" in announced.json()["error"]

    def chunks():
        for i in range(0, len(big), 1000):
            yield big[i:i + 1000]

    chunked = httpx.post(f"{live.url}/api/blobs/{digest}", content=chunks())  # no Content-Length
    assert chunked.status_code == 413
    assert not live.store.has_blob(digest) and not list(live.store.blobs_dir.glob(".tmp-*"))
    small = b"z" * 4096
    assert httpx.post(f"{live.url}/api/blobs/sha256:{hashlib.sha256(small).hexdigest()}",
                      content=small).status_code == 201


# ------------------------------------------------------------------------------------------- API keys

@pytest.mark.parametrize("key", ["a", "short-key", "x" * 15, "sixteen chars ok", " 0123456789abcde\t"])
def test_a_public_bind_refuses_a_weak_key(tmp_path, key):
    with pytest.raises(ConfigError, match="at least 16 characters without whitespace"):
        create_api(ServeConfig(host="0.0.0.0", api_key=key), Store(tmp_path))


def test_a_public_bind_accepts_a_strong_key_from_the_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("TUNESMITH_API_KEY", KEY)
    create_api(ServeConfig(host="0.0.0.0"), Store(tmp_path))
    monkeypatch.setenv("TUNESMITH_API_KEY", "weak")
    with pytest.raises(ConfigError):
        create_api(ServeConfig(host="0.0.0.0"), Store(tmp_path))


def test_serve_cli_key_rules_are_one_line_and_exit_2(tmp_path, capsys):
    from tunesmith.cli import main

    weak = tmp_path / "weak.key"
    weak.write_text("a b\n")
    for args in (["--api-key", "a"], ["--api-key-file", str(weak)], ["--api-key-file", str(tmp_path / "none")],
                 ["--api-key", KEY, "--api-key-file", str(weak)]):
        capsys.readouterr()
        code = main(["serve", "--set", "serve.host=0.0.0.0", "--set", f"serve.port={free_port()}", *args])
        err = capsys.readouterr().err
        assert code == 2, (args, err)
        assert err.startswith("error:") and "Traceback" not in err and len(err.strip().splitlines()) <= 2, err
    capsys.readouterr()
    assert main(["serve", "--help"]) == 0
    help_text = " ".join(capsys.readouterr().out.replace("│", " ").split())  # rich boxes the options
    assert "TUNESMITH_API_KEY" in help_text and "--api-key-file" in help_text and "process list" in help_text


def test_a_key_file_is_read_without_its_line_break(tmp_path):
    path = tmp_path / "key"
    path.write_text(KEY + "\n")
    assert read_api_key_file(path) == KEY


def test_serve_with_a_key_file_requires_that_key(tmp_path, smollm2_gguf):
    key_file = tmp_path / "key"
    key_file.write_text(KEY + "\n")
    server = start_server_process(tmp_path, "--api-key-file", str(key_file), env={"TUNESMITH_API_KEY": ""})
    try:
        assert httpx.get(server.url + "/api/tags").status_code == 401
        assert httpx.get(server.url + "/api/tags", headers={"Authorization": f"Bearer {KEY}"}).status_code == 200
        cmdline = Path(f"/proc/{server.process.pid}/cmdline").read_bytes().decode()  # what `ps` shows
        assert KEY not in cmdline
    finally:
        server.stop()


@pytest.mark.parametrize(("mode", "warned"), [(0o600, False), (0o400, False), (0o644, True), (0o640, True),
                                             (0o604, True), (0o620, True)])
def test_a_key_file_others_can_read_is_named_with_its_mode(tmp_path, caplog, mode, warned):
    """As ssh names a private key file that is too open (a warning, not a refusal: secrets that Docker or
    Kubernetes mount are often 0444)."""
    path = tmp_path / "key"
    path.write_text(KEY + "\n")
    path.chmod(mode)
    with caplog.at_level(logging.WARNING, logger="tunesmith.serve"):
        assert read_api_key_file(path) == KEY
    said = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    if warned:
        assert len(said) == 1 and f"{mode:04o}" in said[0] and str(path) in said[0] and "chmod 600" in said[0], said
    else:
        assert not said


@pytest.mark.parametrize("content", [" \n", "\t\t\n", "\n" + KEY + "\n", "\r\n"])
def test_a_key_file_of_whitespace_is_refused_in_one_line(tmp_path, content):
    path = tmp_path / "key"
    path.write_text(content)
    path.chmod(0o600)
    with pytest.raises(ConfigError, match="the API key is empty") as refused:
        read_api_key_file(path)
    assert str(path) in str(refused.value) and "\n" not in str(refused.value)


def test_whitespace_around_a_key_is_no_part_of_it_for_server_ui_or_cli(tmp_path, smollm2_gguf, monkeypatch, capsys):
    """A key file with a trailing space (or a tab before the key) started a server no client could authenticate
    to, and the CLI with such a key said it could not reach the server ("Illegal header value")."""
    from tunesmith.cli import main

    add_smol(Store(tmp_path / "models"), smollm2_gguf)
    key_file = tmp_path / "key"
    key_file.write_text(f"\t{KEY} \n")
    key_file.chmod(0o600)
    server = start_server_process(tmp_path, "--api-key-file", str(key_file))
    try:
        assert httpx.get(server.url + "/api/tags", headers={"Authorization": f"Bearer {KEY}"}).status_code == 200
        login = httpx.post(server.url + "/ui/login", data={"key": f"{KEY} "})
        assert login.status_code == 303 and "tunesmith_ui" in login.headers["set-cookie"]
        monkeypatch.setenv("TUNESMITH_HOST", server.url)
        monkeypatch.setenv("TUNESMITH_API_KEY", f" {KEY}\t")
        capsys.readouterr()
        assert main(["list"]) == 0, capsys.readouterr().err
        assert "smol:latest" in capsys.readouterr().out
        monkeypatch.setenv("TUNESMITH_API_KEY", f"{KEY}\x01")
        assert main(["list"]) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: TUNESMITH_API_KEY: the API key contains") and "reach" not in err, err
        assert len(err.strip().splitlines()) <= 2 and "Traceback" not in err  # the line and its hint
        monkeypatch.setenv("TUNESMITH_API_KEY", "   ")
        assert main(["list"]) == 2 and "TUNESMITH_API_KEY: the API key is empty" in capsys.readouterr().err
    finally:
        server.stop()


# ------------------------------------------------------------------------------ odd JSON, odd options

JSON_ROUTES = [("POST", "/api/generate"), ("POST", "/api/chat"), ("POST", "/api/create"), ("POST", "/api/copy"),
               ("DELETE", "/api/delete"), ("POST", "/api/show"), ("POST", "/api/embed"), ("POST", "/api/embeddings"),
               ("POST", "/api/pull"), ("POST", "/api/push"), ("POST", "/v1/chat/completions"),
               ("POST", "/v1/completions"), ("POST", "/v1/embeddings")]


def _one_line_400(r: httpx.Response, expected: str) -> None:
    assert r.status_code == 400, r.text
    message = _message(r)
    assert expected in message and "\n" not in message, message


def _body_limit(path: str) -> int:
    return next(route.max_body for route in ROUTE_TABLE if route.path == path)


@pytest.mark.parametrize("depth", [1000, 100_000])
@pytest.mark.parametrize(("method", "path"), JSON_ROUTES)
def test_json_nested_too_deep_is_400_on_every_route(live, method, path, depth):
    body = b'{"model": "smol", "options": ' + b"[" * depth + b"]" * depth + b"}"
    r = httpx.request(method, live.url + path, content=body)
    if len(body) > _body_limit(path):  # 200 KB is more than a route that takes a model name reads
        assert r.status_code == 413 and "request body too large" in _message(r), r.text
    else:
        _one_line_400(r, "nested more than")


@pytest.mark.parametrize("number", [b"NaN", b"Infinity", b"-Infinity", b"1e400", b"9" * 5000, b"9" * 400])
@pytest.mark.parametrize(("method", "path"), JSON_ROUTES)
def test_json_that_go_refuses_is_400(live, method, path, number):
    body = b'{"model": "smol", "prompt": "hi", "options": {"temperature": ' + number + b"}}"
    _one_line_400(httpx.request(method, live.url + path, content=body), "invalid JSON")


@pytest.mark.parametrize("path", ["/api/generate", "/api/chat", "/api/embed"])
@pytest.mark.parametrize("option", ["num_ctx", "num_predict", "top_k", "repeat_last_n", "num_thread"])
def test_integer_options_beyond_llama_cpp_are_400(live, path, option):
    body = {"model": "smol", "prompt": "hi", "input": "hi", "messages": [{"role": "user", "content": "hi"}],
            "stream": False, "options": {**TINY, option: 2**70}}
    _one_line_400(httpx.post(live.url + path, json=body), f'option "{option}"')


def test_large_options_in_range_are_bounded_by_the_model(live):
    body = {"model": "smol", "prompt": "hi", "stream": False,
            "options": {**TINY, "num_ctx": 2**31 - 1, "repeat_last_n": 2**31 - 1, "num_thread": 2**31 - 1}}
    assert httpx.post(live.url + "/api/generate", json=body, timeout=120).status_code == 200
    # SmolLM2 was trained for 8192 tokens: a bigger cache is never allocated (Ollama caps num_ctx there too).
    assert {m["name"]: m["context_length"] for m in httpx.get(live.url + "/api/ps").json()["models"]}[MODEL] == 8192


def test_context_ids_outside_the_vocabulary_are_400_and_the_server_lives(live):
    for context in ([49152], [-5], [2_000_000_000], [1, 2, 49152]):
        r = httpx.post(live.url + "/api/generate", json={"model": "smol", "prompt": "hi", "context": context,
                                                         "stream": False, "options": TINY})
        _one_line_400(r, "outside the model's vocabulary")
    ok = httpx.post(live.url + "/api/generate", json={"model": "smol", "prompt": "hi", "context": [1, 2],
                                                      "stream": False, "options": TINY}, timeout=60)
    assert ok.status_code == 200


def test_a_template_with_a_huge_range_is_400(live):
    body = {"model": "smol", "prompt": "hi", "template": "{{ range 1000000000000 }}x{{ end }}", "stream": False}
    _one_line_400(httpx.post(live.url + "/api/generate", json=body, timeout=60), "steps")


# ---------------------------------------------------------------------------------- clients that leave

LONG = {"model": "smol", "prompt": "1, 2, 3, 4, 5, 6, 7, 8, 9, 10,", "raw": True}


def _raw_post(port: int, body: dict) -> socket.socket:
    data = json.dumps(body).encode()
    s = socket.create_connection(("127.0.0.1", port))
    s.sendall(b"POST /api/generate HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
              b"Content-Length: " + str(len(data)).encode() + b"\r\n\r\n" + data)
    return s


def test_clients_that_leave_while_queued_are_never_generated(live):
    """One slot (parallel 1), taken by a long stream; three non-streaming and one streaming request queue behind
    it and hang up. None of them may reach the model, and the one that held the slot ends as cancelled."""
    engine = live.engine
    wait_until(lambda: engine.pending == 0)
    served = engine.served.copy()
    endless = {**LONG, "options": {"num_predict": -1, "num_ctx": 4096, "temperature": 0}}
    with httpx.stream("POST", live.url + "/api/generate", json=endless, timeout=120) as running:
        lines = running.iter_lines()  # keep it: dropping the iterator closes the connection
        assert json.loads(next(lines))["done"] is False
        queued = [_raw_post(live.port, {**endless, "stream": stream, "options": {**endless["options"],
                                                                                  "num_predict": 5}})
                  for stream in (False, False, False, True)]
        assert wait_until(lambda: engine.pending == 5)
        for s in queued:
            s.close()
        assert wait_until(lambda: engine.pending == 1), engine.pending  # noticed while the stream still runs
    assert wait_until(lambda: engine.pending == 0)
    assert engine.served - served == Counter(cancel=1)


def test_a_non_streaming_client_that_leaves_stops_its_generation(live):
    engine = live.engine
    wait_until(lambda: engine.pending == 0)
    served = engine.served.copy()
    s = _raw_post(live.port, {**LONG, "stream": False, "options": {"num_predict": 1000, "num_ctx": 4096,
                                                                     "temperature": 0}})
    assert wait_until(lambda: MODEL in engine.runners and any(slot.seq for slot in engine.runners[MODEL].batcher.slots))
    s.close()
    assert wait_until(lambda: engine.pending == 0)
    assert engine.served - served == Counter(cancel=1)  # not "length": it did not run its 1000 tokens


def test_strict_json_reads_as_go_does():
    from tunesmith.serve.strict_json import MAX_DEPTH, InvalidJSON, loads

    for bad in (b'{"a": NaN}', b"[Infinity]", b"[-Infinity]", b"[1e400]", b"9" * 5000, b"-" + b"9" * 400, b"\xff",
                b"[" * (MAX_DEPTH + 1) + b"]" * (MAX_DEPTH + 1), b"[" * 100_000):
        with pytest.raises(InvalidJSON):
            loads(bad)
    assert loads(b"[" * MAX_DEPTH + b"]" * MAX_DEPTH)
    # A lone surrogate half becomes U+FFFD, as Go decodes it; a valid pair stays one character.
    assert loads(b'{"a": "x\\ud800y", "b": ["\\ud83d\\ude00"]}') == {"a": "x\ufffdy", "b": ["\U0001f600"]}


def test_a_prompt_that_renders_empty_is_400_and_frees_its_slot(live):
    """SmolLM2 adds no BOS token: a template that writes nothing left a sequence with no token to start from,
    holding its slot (and its client) forever. Found by tests/test_serve_fuzz.py."""
    body = {"model": "smol", "prompt": "hi", "template": "{{ .Missing.Deep }}", "stream": False, "options": TINY}
    _one_line_400(httpx.post(live.url + "/api/generate", json=body, timeout=60), "prompt is empty")
    assert wait_until(lambda: live.engine.pending == 0)
    ok = httpx.post(live.url + "/api/generate", json={**body, "template": None}, timeout=60)
    assert ok.status_code == 200


# ------------------------------------------------ a fuzz of bodies and clients (the second audit, issue 32)
# A `tunesmith serve` process of its own: its memory is measured, its log read for tracebacks. Bodies are CI-sized
# versions of the audit's (63 MiB of nested arrays, 30 MiB prompts): over their route's limit, and under it.

MiB = 2**20
READ_TIMEOUT = 2
"""serve.read_timeout of the process below: how long it waits for a stalled client."""
MEASURED_MALLOC = {"MALLOC_MMAP_THRESHOLD_": str(128 * 1024)}
"""glibc's malloc gives every block over 128 KiB its own mapping, returned when freed, so that the process's peak
memory is what it held at once; by default the threshold moves and freed megabytes stay in the heap, where a
later request may or may not reuse them (the peak measured for one body then varied by the body's size)."""


def _wide(size: int) -> bytes:
    """Empty arrays inside an array: 2 bytes of JSON each, about 80 of Python (63 MiB of them took 2.8 GiB)."""
    head, tail = b'{"model": "smol", "prompt": "hi", "messages": [], "options": [', b"[]]}"
    return head + b"[]," * ((size - len(head) - len(tail)) // 3) + tail


def _prompt(size: int) -> bytes:
    return json.dumps({"model": "smol", "prompt": "word " * (size // 5), "stream": False}).encode()


def _chat(size: int) -> bytes:
    return json.dumps({"model": "smol", "messages": [{"role": "user", "content": "word " * (size // 5)}],
                       "stream": False}).encode()


@pytest.fixture(scope="module")
def process(tmp_path_factory, smollm2_gguf):
    home = tmp_path_factory.mktemp("audit")
    add_smol(Store(home / "models"), smollm2_gguf)
    server = start_server_process(home, "--set", f"serve.read_timeout={READ_TIMEOUT}", env=MEASURED_MALLOC)
    # The model loaded (for good: keep_alive -1) and a long body read once, so that the memory measured below is
    # what one request adds, not the model or the server's first worker thread.
    httpx.post(server.url + "/api/generate", json={"model": "smol", "prompt": "", "keep_alive": -1}, timeout=120)
    httpx.post(server.url + "/api/generate", content=_prompt(MiB), timeout=120)
    with httpx.Client(base_url=server.url) as client:
        idle = sorted(_timed(lambda: client.get("/api/version")) for _ in range(20))
    # How much slower than a quiet machine this one is now (a ping there takes 1-3 ms): the bounds below stretch
    # by it, so that a busy CI machine does not fail them, while the seconds main's code blocked for still do.
    server.slowness = max(1.0, idle[len(idle) // 2] / 0.005)
    yield server
    server.stop()


def _timed(call) -> float:
    start = time.monotonic()
    call()
    return time.monotonic() - start


class Pinger:
    """GET /api/version from another client, again and again, while a request runs: the longest wait it saw."""

    def __init__(self, url: str):
        self.url, self.waits, self.stop = url, [], threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        with httpx.Client(base_url=self.url, timeout=60) as client:
            while not self.stop.is_set():
                self.waits.append(_timed(lambda: client.get("/api/version").raise_for_status()))
                time.sleep(0.02)

    def __enter__(self) -> Self:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        time.sleep(0.1)  # one more answer after the request's own
        self.stop.set()
        self.thread.join(timeout=60)


def _error_shape(path: str, r: httpx.Response) -> str:
    """The route's error shape, checked: OpenAI's error object under /v1, else Ollama's {"error": "..."}."""
    error = r.json()["error"]
    assert isinstance(error, dict) == path.startswith("/v1/"), r.text[:300]
    message = error["message"] if isinstance(error, dict) else error
    assert isinstance(message, str) and "\n" not in message and len(message) < 2000, message[:300]
    return message


BODIES = [  # (name, path, body builder, size, the answer)
    ("nested arrays", "/api/show", _wide, 12 * MiB, 413),
    ("prompt", "/api/generate", _prompt, 12 * MiB, 413),
    ("chat message", "/api/chat", _chat, 12 * MiB, 413),
    ("chat message", "/v1/chat/completions", _chat, 12 * MiB, 413),
    # Under the limit: read and parsed, then refused for what they hold.
    ("nested arrays", "/api/generate", _wide, 6 * MiB, 400),
    ("prompt", "/api/generate", _prompt, 6 * MiB, 400),
    ("chat message", "/v1/chat/completions", _chat, 6 * MiB, 400),
    # The audit's own sizes: slow tests (building and sending them takes a few seconds).
    ("nested arrays", "/api/show", _wide, 63 * MiB, 413),
    ("prompt", "/api/generate", _prompt, 30 * MiB, 413),
    ("chat message", "/api/chat", _chat, 30 * MiB, 413),
]


@pytest.mark.parametrize("chunked", [False, True], ids=["length", "chunked"])
@pytest.mark.parametrize(("name", "path", "build", "size", "status"), [
    pytest.param(*case, id=f"{case[0]} {case[3] // MiB} MiB {case[1]}",
                 marks=[pytest.mark.slow] if case[3] > 16 * MiB else []) for case in BODIES])
def test_a_big_body_is_refused_quickly_in_bounded_memory_while_others_are_served(process, name, path, build, size,
                                                                                 status, chunked):
    """The audit's shapes: a 4xx in the route's shape within 2 s, the server's peak memory at most 4 times the
    body more, and /api/version from another client answered within a second all along (seconds stretched on a
    loaded machine, see `process`)."""
    body = build(size)
    content = (body[i:i + 64 * 1024] for i in range(0, len(body), 64 * 1024)) if chunked else body
    process.reset_peak()
    before = process.status("VmRSS")
    with Pinger(process.url) as pinger:
        start = time.monotonic()
        r = httpx.post(process.url + path, content=content, timeout=120)
        elapsed = time.monotonic() - start
    grown = (process.status("VmHWM") - before) * 1024
    assert r.status_code == status, r.text[:300]
    message = _error_shape(path, r)
    assert ("request body too large" if status == 413 else "more than") in message, message
    assert elapsed < 2 * process.slowness, f"{elapsed:.1f} s"
    assert grown <= 4 * len(body), f"the server grew {grown / MiB:.0f} MiB for a {len(body) / MiB:.0f} MiB body"
    assert pinger.waits and max(pinger.waits) < 1 * process.slowness, max(pinger.waits)


@pytest.mark.parametrize(("path", "chunked"), [("/api/show", False), ("/api/copy", False), ("/api/delete", False),
                                               ("/api/generate", False), ("/api/chat", False), ("/api/create", False),
                                               ("/v1/chat/completions", False), ("/api/show", True),
                                               ("/v1/chat/completions", True)])
def test_a_body_over_its_routes_limit_is_refused_before_it_is_all_sent(process, path, chunked):
    """Structural: the 413 comes back while the client has sent only part of what it announced (a Content-Length
    four times the limit), or just over the limit of a chunked body it never ends."""
    limit = _body_limit(path)
    method = "DELETE" if path == "/api/delete" else "POST"
    with socket.create_connection(("127.0.0.1", process.port), timeout=10) as s:
        head = f"{method} {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
        if chunked:
            s.sendall(head.encode() + b"Transfer-Encoding: chunked\r\n\r\n")
            for _ in range(limit // 65536 + 1):
                s.sendall(b"10000\r\n" + b" " * 65536 + b"\r\n")
        else:
            s.sendall(head.encode() + f"Content-Length: {4 * limit}\r\n\r\n".encode() + b"{" + b" " * 1023)
        answer = b""
        while b"\r\n\r\n" not in answer or not answer.rstrip().endswith(b"}"):
            data = s.recv(65536)
            assert data, answer
            answer += data
    status_line, _, rest = answer.partition(b"\r\n")
    assert status_line.startswith(b"HTTP/1.1 413"), answer[:300]
    body = rest.partition(b"\r\n\r\n")[2]
    _error_shape(path, httpx.Response(413, content=body))


def test_many_unknown_options_make_one_log_line_and_echoed_names_are_cut(process):
    """100,000 unknown options (1.6 MiB) wrote 100,002 log lines; a 10 MiB model name came back in a 10 MiB error."""
    lines = len(process.log_text().splitlines())
    options = {f"option_{i}_{'x' * 5}": i for i in range(100_000)}
    r = httpx.post(process.url + "/api/generate", json={"model": "smol", "prompt": "", "options": options}, timeout=60)
    assert r.status_code == 200, r.text[:300]
    new = process.log_text().splitlines()[lines:]
    said = [line for line in new if "invalid option" in line]
    assert len(said) == 1 and len(said[0]) < 1000 and "99,990 more" in said[0], said[:3]
    assert len(new) < 10, new[:20]
    name = "m" * (7 * MiB)
    for path, body in (("/api/generate", {"model": name, "prompt": "hi"}), ("/api/chat", {"model": name}),
                       ("/api/embed", {"model": name, "input": "hi"}),
                       ("/v1/chat/completions", {"model": name, "messages": [{"role": "user", "content": "hi"}]}),
                       ("/api/show", {"model": "m" * 60_000}), ("/api/pull", {"model": "m" * 60_000}),
                       ("/api/create", {"model": "x", "from": "smol", "parameters": {name: 1}}),
                       ("/api/generate", {"model": "smol", "prompt": "", "keep_alive": name})):
        r = httpx.post(process.url + path, json=body, timeout=60)
        assert 400 <= r.status_code < 500 and len(r.content) < 2000, (path, r.status_code, len(r.content))
        assert "characters)" in _error_shape(path, r), r.text[:300]


@pytest.mark.parametrize("keep_alive", [1e300, "99999999h", 3e11, 2**70, "-1s", -1])
def test_a_keep_alive_that_overflows_means_forever_and_ps_still_answers(process, keep_alive):
    """`datetime.fromtimestamp` overflowed in /api/ps for these (a plain-text 500 until another request came)."""
    r = httpx.post(process.url + "/api/generate", json={"model": "smol", "prompt": "", "keep_alive": keep_alive},
                   timeout=60)
    assert r.status_code == 200, r.text
    ps = httpx.get(process.url + "/api/ps")
    assert ps.status_code == 200, ps.text
    (model,) = ps.json()["models"]
    assert int(model["expires_at"][:4]) >= 2100  # Ollama's "forever": 100 years on


def test_keep_alive_seconds_clamp_as_ollama_does():
    from tunesmith.serve.options import FOREVER, keep_alive_seconds

    assert keep_alive_seconds(300) == 300 and keep_alive_seconds("1h30m") == 5400 and keep_alive_seconds(0) == 0
    for huge in (1e300, "99999999h", 3e11, 2**70, -1, "-5m"):
        assert keep_alive_seconds(huge) == FOREVER, huge


def test_a_server_error_is_json_in_the_routes_shape(live):
    """A model whose GGUF was removed by hand: /api/show fails inside; the answer is still {"error": ...}."""
    from tunesmith.serve.store import Manifest

    path = live.store.manifest_path("orphan:latest")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(Manifest(model="sha256:" + "1" * 64).model_dump_json())
    try:
        r = httpx.post(live.url + "/api/show", json={"model": "orphan"})
        assert r.status_code == 500 and r.headers["content-type"] == "application/json", r.text
        assert r.json()["error"].startswith("internal server error")
    finally:
        path.unlink()


# Clients that go slowly or go away: each is one log line, never a traceback, and the slow ones are closed.

def _closed_within(s: socket.socket, seconds: float) -> bytes:
    """What the server sent before closing `s` (it must close it within `seconds`)."""
    s.settimeout(seconds)
    received = b""
    try:
        while data := s.recv(65536):
            received += data
    except TimeoutError:
        pytest.fail(f"still open after {seconds} s; got {received[:200]!r}")
    except ConnectionResetError:
        pass
    return received


def test_slow_and_stalled_clients_are_closed_after_the_read_timeout(process):
    margin = 10 * READ_TIMEOUT  # generous: the point is that they are closed at all (uvicorn alone never does)
    idle = socket.create_connection(("127.0.0.1", process.port))  # connects and says nothing
    head = socket.create_connection(("127.0.0.1", process.port))  # a head, a byte at a time
    head.sendall(b"POST /api/generate HTTP/1.1\r\nHost: 127.0.0.1\r\n")
    stalled = socket.create_connection(("127.0.0.1", process.port))  # a body that stops coming
    stalled.sendall(b"POST /api/chat HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 1000\r\n\r\n{\"model\"")
    trickle = socket.create_connection(("127.0.0.1", process.port))  # a body at a byte every 0.3 s
    trickle.sendall(b"POST /api/blobs/sha256:" + b"2" * 64 + b" HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 1000"
                    b"\r\n\r\n")
    deadline = time.monotonic() + READ_TIMEOUT + 1
    with contextlib.suppress(OSError):
        while time.monotonic() < deadline:
            head.sendall(b"X")
            trickle.sendall(b"y")
            time.sleep(0.3)
    # Meanwhile the server serves others as usual.
    assert httpx.get(process.url + "/api/version", timeout=10).status_code == 200
    for s in (idle, head):
        assert _closed_within(s, margin) == b""
    for s, path in ((stalled, "/api/chat"), (trickle, "/api/blobs/x")):
        answer = _closed_within(s, margin)
        assert answer.startswith(b"HTTP/1.1 408"), answer[:300]
        assert "did not arrive in time" in _error_shape(path, httpx.Response(408, content=answer.partition(
            b"\r\n\r\n")[2]))
    for s in (idle, head, stalled, trickle):
        s.close()
    assert not list((Path(process.log).parent / "models" / "blobs").glob(".tmp-*"))
    assert "Traceback" not in process.log_text()


@pytest.mark.parametrize("path", ["/api/generate", "/api/create", "/v1/chat/completions",
                                  "/api/blobs/sha256:" + "3" * 64])
def test_a_client_that_leaves_mid_body_leaves_one_log_line(process, path):
    lines = len(process.log_text().splitlines())
    with socket.create_connection(("127.0.0.1", process.port)) as s:
        s.sendall(f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 100000\r\n\r\n".encode()
                  + b'{"model": "smol", "prompt": "' + b"x" * 1000)
        time.sleep(0.3)  # the server is reading the body now
    assert wait_until(lambda: any("went away" in line for line in process.log_text().splitlines()[lines:]), timeout=10)
    new = process.log_text().splitlines()[lines:]
    assert "Traceback" not in "\n".join(new) and len([line for line in new if "went away" in line]) == 1, new
    assert not list((Path(process.log).parent / "models" / "blobs").glob(".tmp-*"))
    assert httpx.get(process.url + "/api/version").status_code == 200
