"""The web UI at /ui: a real server on a loopback port, run folders written by tunesmith's own writers, the
built-in SmolLM2 GGUF answering in the chat, and Debian's headless Chromium driving the pages."""

from __future__ import annotations

import json
import os
import re
import shutil
import sys
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from types import SimpleNamespace

import httpcore
import httpx
import pytest

from tests.serve_fixtures import MODEL, add_smol, start_server, start_server_process
from tests.test_serve_api import QUESTION, THINKING_TEMPLATE
from tunesmith.atomic import write_json, write_text
from tunesmith.config import Config, load_config
from tunesmith.evaluate.report import build_report
from tunesmith.export import fidelity
from tunesmith.export.ollama_template import write_modelfile
from tunesmith.run import Run
from tunesmith.scorers import score_all
from tunesmith.serve.known_templates import CHATML
from tunesmith.serve.store import Store
from tunesmith.train.metrics import MetricsLog

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
needs_chromium = pytest.mark.skipif(CHROMIUM is None, reason="Debian's chromium is not installed (make installs it)")
SECRET = "tunesmith-ui-test-secret"


def train_record(step: int) -> dict:
    """A metrics.jsonl training line, with the keys train/loop.py logs."""
    return {"step": step, "loss": round(2.5 / (1 + 0.3 * step), 4), "grad_norm": 0.8,
            "learning_rate": 2e-3 * (1 - step / 100), "epoch": round(step / 40, 2), "tokens_per_second": 430.0,
            "trained_tokens": 512 * step}


def make_run(runs: Path, name: str, steps: int, *, ended: bool, started: datetime | None = None,
             trained: bool | None = None) -> Path:
    """run.json, metrics.jsonl and, when training `ended` (unless `trained` says otherwise), the adapter, as
    training writes them (Run's record writers, MetricsLog, a PEFT adapter's weights file)."""
    import numpy as np
    from safetensors.numpy import save_file

    run = runs / name
    started_at = (started or datetime.now(UTC)).isoformat(timespec="seconds")
    final = {"steps": steps, "train_loss": train_record(steps)["loss"], "eval_loss": 0.61, "train_seconds": 60.0,
             "trained_tokens": 512 * steps, "trained_tokens_per_second": 430.0} if ended else None
    Run(run).start_record(Config(name=name, runs_dir=str(runs)), "cpu", {"train": 96, "eval": 8})
    Run(run).write_record(Run(run).read_record() | {"started_at": started_at})
    if ended if trained is None else trained:  # training saves the adapter, then writes ended_at
        Run(run).adapter.mkdir()
        save_file({"base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight": np.zeros((4, 8), np.float32)},
                  str(Run(run).adapter / "adapter_model.safetensors"))
    if final is not None:
        Run(run).finish_record(final)
    log = MetricsLog(Run(run).metrics, Run(run).tensorboard, 0)
    for step in range(1, steps + 1):
        log.write(train_record(step))
        if step % 5 == 0:  # the eval record's keys as the loop writes them with train.eval_accuracy on
            log.write({"step": step, "eval_loss": round(2.6 / (1 + 0.25 * step), 4),
                       "eval_exact_match": round(min(1.0, step / 40), 4), "eval_edit_similarity": 0.5})
    log.close()
    return run


def evaluate_and_export(run: Path) -> None:
    """eval.jsonl, two GGUFs, fidelity.json, the Modelfile and report.html, in the shapes their writers use."""
    ggufs = {quant: run / "gguf" / f"{run.name}.{quant}.gguf" for quant in ("q8_0", "q4_k_m")}
    for quant, path in ggufs.items():
        path.parent.mkdir(exist_ok=True)
        path.write_bytes(b"GGUF" + bytes((3 if quant == "q8_0" else 2) * 2**20))
    references = ["Paris.", "Berlin.", "Rome."]
    answers = {"base": ["I think Lyon.", "Berlin.", "Madrid"], "finetuned": references,
               str(ggufs["q8_0"]): references, str(ggufs["q4_k_m"]): ["Paris.", "Bern.", "Rome."]}
    rows = [{"index": i, "model": model, "prompt": f"capital {i}?", "reference": reference, "answer": answer,
             "scores": score_all(answer, reference, "text", None), "seconds": 1.0}
            for model, model_answers in answers.items()
            for i, (reference, answer) in enumerate(zip(references, model_answers))]
    write_text(run / "eval.jsonl", "".join(json.dumps(row) + "\n" for row in rows))
    checks = [fidelity.QuantFidelity("q8_0", str(ggufs["q8_0"]), 3, 1.0, 1.0, 0.0012, True, 2.0),
              fidelity.QuantFidelity("q4_k_m", str(ggufs["q4_k_m"]), 3, 0.667, 1.0, 0.08, False, 1.5)]
    write_json(run / "fidelity.json", fidelity.report(checks, 4.0, 3, 0.8))
    write_modelfile(run / "Modelfile", f"./gguf/{ggufs['q8_0'].name}", CHATML, None, ["<|im_end|>"],
                    {"temperature": 0.0})
    build_report(Run(run))


@pytest.fixture(scope="module")
def site(tmp_path_factory, smollm2_gguf):
    root = tmp_path_factory.mktemp("ui")
    runs = root / "runs"
    evaluate_and_export(make_run(runs, "demo", 40, ended=True))
    make_run(runs, "live", 15, ended=False)
    crashed = make_run(runs, "crashed", 12, ended=False, started=datetime.now(UTC) - timedelta(hours=3))
    two_hours_ago = time.time() - 7200
    for name in ("run.json", "metrics.jsonl"):
        os.utime(crashed / name, (two_hours_ago, two_hours_ago))
    (runs / "notes").mkdir()  # a folder without run.json is not a run

    # Outside the runs folder: what no URL may reach, through traversal or through a planted symlink.
    secret = root / "secret"
    secret.mkdir()
    (secret / "passwd").write_text(SECRET)
    write_json(secret / "run.json", {"config": {"name": SECRET}, "started_at": SECRET})
    (secret / "report.html").write_text(f"<p>{SECRET}</p>")
    (runs / "evil").symlink_to(secret, target_is_directory=True)
    sneaky = make_run(runs, "sneaky", 3, ended=True)
    (sneaky / "report.html").symlink_to(secret / "report.html")

    store = Store(root / "store")
    add_smol(store, smollm2_gguf)
    add_smol(store, smollm2_gguf, "demo:latest")
    store.write("thinker:latest", store.read(MODEL).model_copy(update={"template": THINKING_TEMPLATE}))
    server = start_server(store, runs_dir=str(runs))
    yield SimpleNamespace(url=server.url, runs=runs, secret=secret, server=server)
    server.stop()


@pytest.fixture(scope="module")
def browser():
    if CHROMIUM is None:
        pytest.skip("Debian's chromium is not installed (make installs it)")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=[
            "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
            "--no-first-run", "--disable-sync"])
        yield browser
        browser.close()


@pytest.fixture
def page(browser, site):
    """A fresh page; afterwards, every request it made must have gone to the tunesmith server."""
    context = browser.new_context(viewport={"width": 1200, "height": 900})
    page = context.new_page()
    requested: list[str] = []
    errors: list[str] = []
    page.on("request", lambda request: requested.append(request.url))
    page.on("pageerror", lambda error: errors.append(str(error)))
    page.on("console", lambda message: errors.append(message.text) if message.type == "error" else None)
    yield page
    context.close()
    assert requested and all(url.startswith((site.url + "/", "data:")) for url in requested), requested
    assert not errors  # no script error, and no Content-Security-Policy violation


def screenshot(page, path: Path) -> None:
    page.screenshot(path=str(path), full_page=True)
    assert path.stat().st_size > 10_000


@needs_chromium
def test_runs_list_shows_each_run_and_its_state(site, page, tmp_path):
    page.goto(site.url + "/ui")
    rows = page.eval_on_selector_all(
        "#runs tbody tr", "rows => rows.map(r => [r.dataset.run, r.querySelector('.state').textContent])")
    assert dict(rows) == {"demo": "done", "live": "training", "crashed": "failed", "sneaky": "done"}
    demo = page.inner_text('#runs tr[data-run="demo"]')
    assert "builtin:smollm2-135m" in demo and "40" in demo and "evaluated exported report" in demo
    assert "report" not in page.inner_text('#runs tr[data-run="sneaky"]')  # its report.html points outside
    assert SECRET not in page.content()
    screenshot(page, tmp_path / "runs.png")


def test_the_runs_page_and_run_complete_agree_on_every_stage(tmp_path):
    """Each stage the runs page shows as done (state `done`, `evaluated`, `exported`) is `Run.complete`'s answer,
    the one the pipeline skips the stage on: the page once called a run with a Modelfile but no fidelity.json
    exported, and one whose run.json said it ended done, adapter or not."""
    runs = tmp_path / "runs"
    hours_ago = datetime.now(UTC) - timedelta(hours=3)
    evaluate_and_export(make_run(runs, "complete", 8, ended=True))
    make_run(runs, "trained", 8, ended=True)
    make_run(runs, "no-adapter", 8, ended=True, trained=False)  # ended_at written, adapter gone
    make_run(runs, "no-end", 8, ended=False, started=hours_ago, trained=True)  # killed after saving the adapter
    make_run(runs, "killed", 8, ended=False, started=hours_ago)
    half = make_run(runs, "half-exported", 8, ended=True)
    evaluate_and_export(half)
    Run(half).fidelity.unlink()  # an export killed between its two markers
    evaluated = make_run(runs, "evaluated", 8, ended=True)
    evaluate_and_export(evaluated)
    for path in (Run(evaluated).modelfile, Run(evaluated).fidelity):
        path.unlink()
    for name in ("no-end", "killed"):
        for path in (runs / name).iterdir():
            os.utime(path, (hours_ago.timestamp(), hours_ago.timestamp()))

    server = start_server(Store(tmp_path / "store"), runs_dir=str(runs))
    try:
        page = httpx.get(server.url + "/ui").text
    finally:
        server.stop()
    shown = {}
    for name, state, stages in re.findall(r'<tr data-run="([^"]+)">.*?class="state state-(\w+)".*?<td[^>]*>([^<]*)</td></tr>',
                                          page):
        shown[name] = {"train": state == "done", "eval": "evaluated" in stages, "export": "exported" in stages}
    complete = {name: {stage: Run(runs / name).complete(stage) for stage in ("train", "eval", "export")}
                for name in shown}
    assert len(shown) == 7 and shown == complete
    assert complete["half-exported"]["export"] is False and complete["no-end"]["train"] is True


@needs_chromium
def test_loss_curve_has_a_point_per_step_and_grows_while_training(site, page, tmp_path):
    run = site.runs / "live"
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    steps = [r["step"] for r in records if "loss" in r]
    evals = [r["step"] for r in records if "eval_loss" in r]
    page.goto(site.url + "/ui/runs/live")
    points = "n => document.querySelector('#loss-plot polyline.train')?.points.numberOfItems === n"
    page.wait_for_function(points, arg=len(steps))
    assert page.eval_on_selector_all("#loss-plot circle.eval-point", "c => c.length") == len(evals)
    assert page.inner_text("#run-state") == "training"
    page.evaluate("window.notReloaded = true")

    # Training logs two more steps, as the loop does: append, flush, while the page keeps polling.
    log = MetricsLog(Run(run).metrics, Run(run).tensorboard, steps[-1])
    for step in (steps[-1] + 1, steps[-1] + 2):
        log.write(train_record(step))
    log.write({"step": steps[-1] + 2, "eval_loss": 0.5, "eval_exact_match": 0.875,
               "eval_recall:gear_start": 0.25, "eval_precision:gear_start": 1.0})
    log.close()
    page.wait_for_function(points, arg=len(steps) + 2, timeout=10_000)
    # Validation by rule: the new eval step's column, the rule not learned yet visible at a glance.
    detail = page.inner_text("#detail-table")
    assert f"step {steps[-1] + 2}" in detail and "recall:gear_start" in detail and "0.25" in detail
    assert page.eval_on_selector_all("#loss-plot circle.eval-point", "c => c.length") == len(evals) + 1
    # Answers right during training: a point per eval step on the accuracy axis, the latest in the status line.
    assert page.eval_on_selector_all("#loss-plot circle.accuracy-point", "c => c.length") == len(evals) + 1
    assert "exact match 88%" in page.inner_text("#loss-latest")
    assert f"step {steps[-1] + 2}" in page.inner_text("#loss-latest")
    assert page.evaluate("window.notReloaded") is True
    screenshot(page, tmp_path / "run-training.png")


@needs_chromium
def test_run_page_shows_eval_export_fidelity_and_serves_the_report(site, page, tmp_path):
    page.goto(site.url + "/ui/runs/demo")
    page.wait_for_function("document.querySelector('#loss-plot polyline.train')?.points.numberOfItems === 40")
    assert page.inner_text("#run-state") == "done"
    rows = page.eval_on_selector_all("#eval-table tbody tr", "rows => rows.map(r => r.innerText.split('\\t'))")
    assert [row[0] for row in rows] == ["base", "finetuned", "demo.q8_0.gguf", "demo.q4_k_m.gguf"]
    headers = page.eval_on_selector_all("#eval-table th", "cells => cells.map(c => c.innerText)")
    exact = headers.index("exact_match")
    assert [row[exact] for row in rows] == ["0.333", "1.000", "1.000", "0.667"]
    export = page.eval_on_selector_all("#export-table tbody tr", "rows => rows.map(r => r.innerText.split('\\t'))")
    assert {row[0]: (row[1], row[-1]) for row in export} == {
        "demo.q4_k_m.gguf": ("2.0 MiB", "FAIL"), "demo.q8_0.gguf": ("3.0 MiB", "pass")}
    assert page.get_attribute("#chat-link", "href") == "/ui/chat?model=demo%3Alatest"
    screenshot(page, tmp_path / "run-done.png")

    page.click("#report-link")
    page.wait_for_load_state()
    assert page.url == site.url + "/ui/runs/demo/report.html" and page.title() == "tunesmith: demo"
    assert page.eval_on_selector("#loss-plot", "img => img.complete ? img.naturalWidth : 0") > 300
    screenshot(page, tmp_path / "report.png")


@needs_chromium
def test_chat_streams_the_answer_token_by_token_and_shows_thinking_apart(site, page, tmp_path):
    page.goto(site.url + f"/ui/chat?model={MODEL}")
    page.wait_for_function("document.querySelectorAll('#model option').length === 3")
    assert sorted(page.eval_on_selector_all("#model option", "o => o.map(x => x.value)")) == [
        "demo:latest", "smol:latest", "thinker:latest"]
    assert page.input_value("#model") == MODEL
    page.fill("#system", "Answer in one short sentence.")
    page.fill("#temperature", "0")
    page.fill("#num-predict", "16")
    # Every text the answer shows while it streams, to prove it arrives piece by piece.
    page.evaluate("""() => { window.seen = [];
        new MutationObserver(() => { const a = document.querySelector('.msg.assistant .content');
            if (a) window.seen.push(a.textContent); })
          .observe(document.getElementById('conversation'), {subtree: true, childList: true, characterData: true});
    }""")
    page.fill("#prompt", QUESTION)
    with page.expect_request(lambda request: request.url.endswith("/api/chat")) as sent:
        page.press("#prompt", "Enter")
    body = json.loads(sent.value.post_data)
    assert body == {"model": MODEL, "stream": True, "options": {"temperature": 0, "num_predict": 16},
                    "messages": [{"role": "system", "content": "Answer in one short sentence."},
                                 {"role": "user", "content": QUESTION}]}
    page.wait_for_selector('.msg.assistant[data-done="true"]', timeout=60_000)
    answer = page.inner_text(".msg.assistant .content")
    assert "Paris" in answer
    partial = [text for text in dict.fromkeys(page.evaluate("window.seen")) if text]
    assert len(partial) >= 3 and all(answer.startswith(text.strip()) for text in partial)
    assert "tokens/s" in page.inner_text(".msg.assistant .stats")
    assert page.is_hidden(".msg.assistant details.thinking")  # this model has no thinking to show
    screenshot(page, tmp_path / "chat.png")

    # A model whose template opens <think>: the server sends message.thinking, shown apart from the answer.
    page.click("#clear")
    page.select_option("#model", "thinker:latest")
    page.fill("#prompt", QUESTION)
    page.press("#prompt", "Enter")
    page.wait_for_selector('.msg.assistant[data-done="true"]', timeout=60_000)
    assert page.is_visible(".msg.assistant details.thinking")
    assert "Paris" in page.inner_text(".msg.assistant .thinking-text")
    assert page.inner_text(".msg.assistant .content").strip() == ""
    screenshot(page, tmp_path / "chat-thinking.png")

    # Thinking written inline in the content, and NDJSON lines split across network reads.
    split = page.evaluate("""() => [splitThink('<think>hmm</think>\\nParis'), splitThink('<think>still'),
                                     splitThink('opened by the template</think>Rome'), splitThink('Bern')]""")
    assert split == [{"thinking": "hmm", "content": "Paris"}, {"thinking": "still", "content": ""},
                     {"thinking": "opened by the template", "content": "Rome"}, {"thinking": "", "content": "Bern"}]
    chunks = page.evaluate("""async () => {
        const bytes = (s) => new TextEncoder().encode(s);
        const body = new ReadableStream({start(c) {
            c.enqueue(bytes('{"a":1}\\n{"b"')); c.enqueue(bytes(':"é"}\\n{"c":3}')); c.close(); }});
        const out = []; await readNdjson(new Response(body), (chunk) => out.push(chunk)); return out; }""")
    assert chunks == [{"a": 1}, {"b": "é"}, {"c": 3}]


def _raw_get(port: int, target: bytes) -> tuple[int, bytes]:
    """GET with the request target sent as written: httpx (rightly) removes `..` segments from URLs."""
    with httpcore.ConnectionPool() as pool:
        response = pool.request("GET", httpcore.URL(scheme=b"http", host=b"127.0.0.1", port=port, target=target))
        return response.status, response.content


TRAVERSALS = [
    "/ui/runs/..%2F..%2Fetc", "/ui/runs/..%2F..%2Fetc%2Fpasswd", "/ui/runs/%2e%2e%2f%2e%2e%2fsecret%2fpasswd",
    "/ui/runs/%2E%2E", "/ui/runs/..%252F..%252Fsecret", "/ui/runs/..%5C..%5Csecret", "/ui/runs/.hidden",
    "/ui/runs/%2e%2e/report.html", "/ui/runs/..%2Fsecret/report.html", "/ui/runs/demo%2F..%2F..%2Fsecret",
    "/ui/runs/evil", "/ui/runs/evil/report.html", "/ui/runs/sneaky/report.html", "/ui/runs/demo%00/report.html",
    "/ui/api/runs/..%2Fsecret/metrics", "/ui/api/runs/evil/metrics", "/ui/api/runs/%2e%2e/metrics",
    "/ui/static/..%2F..%2F..%2Fconfig.py", "/ui/static/%2e%2e/runs.py", "/ui/..%2F..%2Fsecret%2Fpasswd",
]
RAW_TRAVERSALS = [b"/ui/runs/../../etc/passwd", b"/ui/runs/../../secret/passwd", b"/ui/runs/../secret/report.html",
                  b"/ui/runs/demo/../../secret/run.json", b"/ui/api/runs/../secret/metrics",
                  b"/ui/static/../../../config.py", b"/ui/runs/./../secret"]


def test_path_traversal_gets_a_4xx_and_reads_nothing(site):
    opened: list[str] = []

    def audit(event: str, args: tuple) -> None:  # every file the process opens or lists, server threads included
        if event in ("open", "os.listdir", "os.scandir") and args and isinstance(args[0], str | bytes | Path):
            opened.append(os.fsdecode(args[0]))

    sys.addaudithook(audit)  # hooks cannot be removed; this one only appends to a list that goes away
    answers = {path: httpx.get(site.url + path) for path in TRAVERSALS}
    answers.update({target.decode(): _raw_get(site.server.port, target) for target in RAW_TRAVERSALS})
    for path, answer in answers.items():
        status, content = (answer.status_code, answer.content) if isinstance(answer, httpx.Response) else answer
        assert 400 <= status < 500, (path, status)
        assert SECRET.encode() not in content and b"root:" not in content, path
    assert answers["/ui/runs/..%2F..%2Fetc"].status_code == 400  # the name check answered, not the router
    assert answers["/ui/runs/evil"].status_code == 404  # a valid name whose folder resolves outside
    secret = str(site.secret.resolve())
    assert not [path for path in opened if path.startswith(secret) or path == "/etc/passwd"]
    # The same routes answer a real run, and the hook does see the server's reads.
    assert httpx.get(site.url + "/ui/runs/demo").status_code == 200
    assert any(path.endswith("/demo/run.json") for path in opened)


def test_api_key_guards_the_ui_as_it_guards_the_api(site, tmp_path):
    server = start_server(Store(tmp_path / "store"), api_key="s3cret", runs_dir=str(site.runs))
    try:
        refused = httpx.get(server.url + "/api/tags")
        assert refused.status_code == 401
        pages = ("/ui", "/ui/runs/demo", "/ui/runs/demo/report.html", "/ui/chat")
        for path in (*pages, "/ui/api/runs/live/metrics"):
            for headers, cookies in (({}, {}), ({"Authorization": "Bearer wrong"}, {}), ({}, {"tunesmith_ui": "s3cret"})):
                answer = httpx.get(server.url + path, headers=headers, cookies=cookies)
                if path in pages:  # a browser is sent to the login form, and nothing of the page comes back
                    assert (answer.status_code, answer.headers["location"]) == (303, "/ui/login"), path
                    assert not answer.content, path
                else:
                    assert (answer.status_code, answer.json()) == (401, refused.json()), path
            assert httpx.get(server.url + path, headers={"Authorization": "Bearer s3cret"}).status_code == 200, path
        # The login form and the UI's own CSS/JS (package files) load without the key; nothing else does.
        assert httpx.get(server.url + "/ui/login").status_code == 200
        assert httpx.get(server.url + "/ui/static/chat.js").status_code == 200
        # A wrong key: 401 and no cookie. The right one: a cookie that is not the key, and that opens the UI and
        # the API (the chat page's fetches) but not for a forged value.
        wrong = httpx.post(server.url + "/ui/login", data={"key": "nope"})
        assert wrong.status_code == 401 and "set-cookie" not in wrong.headers
        with httpx.Client(base_url=server.url) as browser:
            login = browser.post("/ui/login", data={"key": "s3cret"})
            assert (login.status_code, login.headers["location"]) == (303, "/ui")
            cookie = login.headers["set-cookie"]
            assert "s3cret" not in cookie and "HttpOnly" in cookie and "SameSite=strict" in cookie
            assert browser.get("/ui/runs/demo").status_code == 200
            assert browser.get("/api/tags").status_code == 200
        assert httpx.get(server.url + "/api/tags", cookies={"tunesmith_ui": "0" * 64}).status_code == 401
    finally:
        server.stop()


def test_runs_folder_comes_from_runs_dir_or_serve_runs(site, tmp_path):
    assert load_config().serve.runs_dir == "runs"
    assert load_config(None, ["runs_dir=elsewhere"]).serve.runs_dir == "elsewhere"
    assert load_config(None, ["runs_dir=elsewhere", "serve.runs_dir=mine"]).serve.runs_dir == "mine"
    server = start_server_process(tmp_path, "--runs", str(site.runs))
    try:
        page = httpx.get(server.url + "/ui", timeout=10)
        assert page.status_code == 200 and 'data-run="demo"' in page.text
    finally:
        server.stop()


# ------------------------------------------------------------------- the cookie, seen from another origin

KEY = "tunesmith-ui-test-key-0123456789"
# What a page on another port of the same machine can make a browser send, the cookie included (SameSite does
# not separate ports): no-cors POSTs with a text/plain body, a form posted to a hidden frame, and CORS requests
# with the CSRF header guessed. Each records what it saw; the test then checks the store.
ATTACK = """<!doctype html><html><body><iframe name="sink"></iframe>
<form id="form" method="post" enctype="text/plain" target="sink" action="SERVER/api/copy">
<input name='{"source": "smol", "destination": "by-form", "x": "' value='"}'></form>
<script>
const server = "SERVER", seen = {};
async function attempt(name, path, init) {
  try {
    const r = await fetch(server + path, {credentials: "include", ...init});
    seen[name] = r.type === "opaque" ? "opaque" : r.status + " " + (await r.text()).slice(0, 200);
  } catch (e) { seen[name] = "blocked: " + e; }
}
const text = (body) => ({method: "POST", mode: "no-cors", headers: {"Content-Type": "text/plain"},
                         body: JSON.stringify(body)});
const guessed = {"Content-Type": "application/json", "X-Tunesmith-CSRF": "0".repeat(64)};
(async () => {
  await attempt("copy", "/api/copy", text({source: "smol", destination: "stolen"}));
  await attempt("create", "/api/create", text({model: "planted", from: "smol"}));
  await attempt("push", "/api/push", text({model: "smol"}));
  await attempt("blob", "/api/blobs/sha256:" + "0".repeat(64), {method: "POST", mode: "no-cors", body: "x"});
  await attempt("delete", "/api/delete", {method: "DELETE", headers: guessed, body: '{"model": "smol"}'});
  await attempt("copy-cors", "/api/copy", {method: "POST", headers: guessed,
                                           body: '{"source": "smol", "destination": "stolen-cors"}'});
  await attempt("read-chat-page", "/ui/chat", {});
  document.getElementById("form").submit();
  await new Promise((resolve) => document.querySelector("iframe").onload = resolve);
  window.seen = seen;
})();
</script></body></html>"""


@pytest.fixture
def attacker_site():
    """A second web server on loopback, another port: the page of some other local app, or a dev server."""
    import http.server
    import threading

    page: dict[str, bytes] = {}

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(200)
            self.send_header("Content-Type", "text/html")
            self.end_headers()
            self.wfile.write(page["html"])

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server.server_address[1], page
    server.shutdown()
    server.server_close()


@needs_chromium
@pytest.mark.parametrize("host", ["127.0.0.1", "localhost"])
def test_a_page_on_another_local_origin_cannot_use_the_ui_cookie(browser, site, smollm2_gguf, attacker_site, host,
                                                                 tmp_path):
    store = Store(tmp_path / "store")
    add_smol(store, smollm2_gguf)
    server = start_server(store, api_key=KEY, runs_dir=str(site.runs))
    attacker_port, attacker_page = attacker_site
    own = f"http://{host}:{server.port}"
    attacker_page["html"] = ATTACK.replace("SERVER", own).encode()
    before = (sorted(name for name, _ in store.list()), store.manifest_path(MODEL).read_bytes())
    context = browser.new_context()
    try:
        page = context.new_page()
        page.goto(own + "/ui/login")
        page.fill("#key", KEY)
        page.click("#login")
        page.wait_for_url(own + "/ui")
        assert [c["name"] for c in context.cookies(own)] == ["tunesmith_ui"]

        attack = context.new_page()
        attack.goto(f"http://{host}:{attacker_port}/")
        seen = attack.wait_for_function("window.seen", timeout=30_000).json_value()
        assert (sorted(name for name, _ in store.list()), store.manifest_path(MODEL).read_bytes()) == before, seen
        assert not store.has_blob("sha256:" + "0" * 64)
        # The cross-origin requests a page can read never get through either: the CSRF token stays unread.
        assert seen["delete"].startswith("blocked") and seen["copy-cors"].startswith("blocked"), seen
        assert seen["read-chat-page"].startswith("blocked"), seen

        # The UI itself still works with the same cookie: its chat posts to /api/chat and answers.
        page.goto(own + f"/ui/chat?model={MODEL}")
        page.wait_for_function("document.querySelectorAll('#model option').length === 1")
        page.fill("#num-predict", "8")
        page.fill("#prompt", QUESTION)
        page.press("#prompt", "Enter")
        page.wait_for_selector('.msg.assistant[data-done="true"]', timeout=60_000)
        assert "Paris" in page.inner_text(".msg.assistant .content")
    finally:
        context.close()
        server.stop()


def test_the_ui_cookie_opens_only_the_uis_own_requests(site, smollm2_gguf, tmp_path):
    """The rule behind the browser test above, request by request: the cookie opens reads from the UI's own origin
    (or none, as page loads send), and a change only from that origin with the page's CSRF token."""
    from tunesmith.serve.guard import CSRF_HEADER, csrf_token, ui_token

    store = Store(tmp_path / "store")
    add_smol(store, smollm2_gguf)
    server = start_server(store, api_key=KEY, runs_dir=str(site.runs))
    own = server.url
    copy = json.dumps({"source": "smol", "destination": "copied"})
    try:
        with httpx.Client(base_url=own, cookies={"tunesmith_ui": ui_token(KEY)}) as browser:
            assert browser.get("/api/tags").status_code == 200
            assert browser.get("/api/tags", headers={"Origin": own}).status_code == 200
            for origin in ("http://localhost:3000", f"http://127.0.0.1:{server.port + 1}", "http://[::1]:8080"):
                refused = browser.get("/api/tags", headers={"Origin": origin})
                assert refused.status_code == 403 and "cookie" in refused.json()["error"], origin
            for headers in ({}, {"Origin": own}, {CSRF_HEADER: csrf_token(KEY)}, {"Origin": own, CSRF_HEADER: "0" * 64},
                            {"Origin": "http://localhost:3000", CSRF_HEADER: csrf_token(KEY)}):
                refused = browser.post("/api/copy", content=copy, headers={"Content-Type": "text/plain", **headers})
                assert refused.status_code == 403, headers
            assert "copied:latest" not in [name for name, _ in store.list()]
            token = browser.get("/ui/chat").text.split('name="tunesmith-csrf" content="')[1].split('"')[0]
            assert token == csrf_token(KEY) and KEY not in browser.get("/ui/chat").text
            assert browser.post("/api/copy", content=copy, headers={"Origin": own, CSRF_HEADER: token}).status_code == 200
            assert "copied:latest" in [name for name, _ in store.list()]
        # Scripts with the key itself are not the UI: Bearer needs no token, from any allowed origin.
        bearer = {"Authorization": f"Bearer {KEY}", "Origin": "http://localhost:3000"}
        deleted = httpx.request("DELETE", own + "/api/delete", content=b'{"model": "copied"}', headers=bearer)
        assert deleted.status_code == 200
    finally:
        server.stop()
