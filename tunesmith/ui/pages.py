"""The web UI's HTML: the runs list, one run's page and the chat page, rendered on the server.

Every value that comes from a run's files is escaped here; the scripts in static/ put data on the page with
`textContent` only. Pages load nothing but /ui/static/ (the server sends a Content-Security-Policy saying so).
"""

from __future__ import annotations

from html import escape
from pathlib import Path
from typing import Any
from urllib.parse import quote

from tunesmith.ui.runs import ExportedFile, RunSummary


def layout(title: str, body: str, *, script: str | None = None, refresh: int | None = None,
           csrf: str | None = None) -> str:
    """A page; `csrf` is the token its script sends with requests that change something (serve/guard.py)."""
    head = f'<meta http-equiv="refresh" content="{refresh}">' if refresh else ""
    head += f'<meta name="tunesmith-csrf" content="{escape(csrf)}">' if csrf else ""
    tail = f'<script src="/ui/static/{script}"></script>' if script else ""
    return (
        '<!doctype html><html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        # An empty icon: otherwise the browser asks for /favicon.ico, which is not the UI's to answer.
        f'<title>{escape(title)} · tunesmith</title><link rel="icon" href="data:,">'
        f'<link rel="stylesheet" href="/ui/static/ui.css">{head}</head>'
        '<body><header><a class="brand" href="/ui">tunesmith</a>'
        '<nav><a href="/ui">Runs</a><a href="/ui/chat">Chat</a></nav></header>'
        f"<main>{body}</main>{tail}</body></html>"
    )


def _cell(value: Any) -> str:
    if value is None:
        return '<td class="muted">–</td>'
    if isinstance(value, bool):
        return f"<td>{'yes' if value else 'no'}</td>"
    if isinstance(value, float):
        return f'<td class="num">{value:.4g}</td>' if abs(value) < 1e-3 and value else f'<td class="num">{value:.3f}</td>'
    if isinstance(value, int):
        return f'<td class="num">{value}</td>'
    return f"<td>{escape(str(value))}</td>"


def _table(table_id: str, headers: list[str], rows: list[str]) -> str:
    head = "".join(f"<th>{escape(h)}</th>" for h in headers)
    return f'<table id="{table_id}"><thead><tr>{head}</tr></thead><tbody>{"".join(rows)}</tbody></table>'


def _state(state: str, element_id: str | None = None) -> str:
    hint = {"failed": "stopped before finishing (killed or crashed); `tunesmith train --resume` continues it",
            "training": "still writing its files", "done": "training finished"}.get(state, "")
    id_attr = f' id="{element_id}"' if element_id else ""
    return f'<span{id_attr} class="state state-{escape(state)}" title="{escape(hint)}">{escape(state)}</span>'


def _when(value: str | None) -> str:
    # ISO 8601 from run.json, shown to the minute: the seconds and the offset only make the table wide.
    return value.replace("T", " ")[:16] if value else ""


def runs_page(runs_dir: Path, runs: list[RunSummary]) -> str:
    if not runs:
        body = (f"<h1>Runs</h1><p class=\"muted\">No runs in <code>{escape(str(runs_dir))}</code> yet: "
                "<code>tunesmith train --config FILE</code> makes one (<code>tunesmith serve --runs DIR</code> "
                "shows another folder).</p>")
        return layout("Runs", body)
    rows = []
    for run in runs:
        stages = " ".join(label for label, present in (("evaluated", run.evaluated), ("exported", run.exported),
                                                        ("report", run.has_report)) if present)
        rows.append(
            f'<tr data-run="{escape(run.name)}"><td><a href="/ui/runs/{quote(run.name)}">{escape(run.name)}</a></td>'
            f"<td>{_state(run.state)}</td>{_cell(run.base)}{_cell(run.step)}{_cell(run.loss)}{_cell(run.eval_loss)}"
            f"{_cell(_when(run.started_at) or None)}{_cell(_when(run.ended_at) or None)}{_cell(stages or None)}</tr>")
    table = _table("runs", ["run", "state", "base model", "step", "loss", "eval loss", "started", "ended",
                            "stages"], rows)
    body = f'<h1>Runs</h1><p class="muted">in <code>{escape(str(runs_dir))}</code></p>{table}'
    # While something trains the list reloads itself; a finished list stays still.
    return layout("Runs", body, refresh=10 if any(run.state == "training" for run in runs) else None)


def run_page(run: RunSummary, eval_keys: list[str], eval_rows: list[list[Any]], files: list[ExportedFile],
             fidelity: dict[str, Any] | None, chat_model: str | None) -> str:
    record = run.record
    name = quote(run.name)
    facts = [f"base <code>{escape(str(run.base or '?'))}</code>", f"device {escape(str(record.get('device', '?')))}",
             f"started {escape(_when(run.started_at) or '?')}"]
    if run.ended_at:
        facts.append(f"ended {escape(_when(run.ended_at))}")
    links = []
    if run.has_report:
        links.append(f'<a id="report-link" href="/ui/runs/{name}/report.html">report.html</a>')
    if chat_model:
        links.append(f'<a id="chat-link" href="/ui/chat?model={quote(chat_model)}">chat with {escape(chat_model)}</a>')
    parts = [
        f"<h1>{escape(run.name)} {_state(run.state, 'run-state')}</h1>",
        f'<p class="muted">{" · ".join(facts)}</p>',
        f'<p class="links">{" ".join(links)}</p>' if links else "",
        "<h2>Loss</h2>",
        (f'<div id="loss" data-metrics="/ui/api/runs/{name}/metrics"><div id="loss-plot"></div>'
         '<p id="loss-latest" class="muted"></p></div>'),
        "<h2>Validation by rule, field or label</h2>",
        '<div id="detail"></div>',
        "<h2>Evaluation</h2>",
        _eval_section(eval_keys, eval_rows),
        "<h2>Export</h2>",
        _export_section(files, fidelity),
    ]
    return layout(run.name, "".join(parts), script="loss.js")


def _eval_section(keys: list[str], rows: list[list[Any]]) -> str:
    if not rows:
        return '<p class="muted">not evaluated yet (<code>tunesmith eval</code>)</p>'
    return _table("eval-table", ["model", "n", *keys], [f"<tr>{''.join(_cell(v) for v in row)}</tr>" for row in rows])


def _export_section(files: list[ExportedFile], fidelity: dict[str, Any] | None) -> str:
    if not files:
        return '<p class="muted">not exported yet (<code>tunesmith export</code>)</p>'
    rows = []
    for file in files:
        check = file.fidelity or {}
        passed = check.get("passed")
        verdict = ('<td class="good">pass</td>' if passed else '<td class="bad">FAIL</td>') if file.fidelity else (
            _cell(None))
        rows.append(f"<tr>{_cell(file.name)}<td class=\"num\">{file.size / 2**20:.1f} MiB</td>"
                    f"{_cell(check.get('exact'))}{_cell(check.get('first_token'))}{_cell(check.get('loglik_gap'))}"
                    f"{verdict}</tr>")
    table = _table("export-table", ["file", "size", "exact agreement", "first token", "loglik gap", "fidelity"], rows)
    if not isinstance(fidelity, dict):
        note = "no fidelity.json: the export did not finish its check"
    elif fidelity.get("skipped"):
        note = f"fidelity check skipped: {fidelity['skipped']}"
    else:
        note = (f"fidelity: greedy answers of each GGUF vs the merged model on {fidelity.get('prompts', '?')} "
                f"held-out prompts; pass at exact agreement ≥ {fidelity.get('min_agreement', '?')}")
    return f'{table}<p class="muted">{escape(note)}</p>'


def chat_page(model: str | None, csrf: str | None = None) -> str:
    body = f"""<h1>Chat</h1>
<form id="chat-settings" class="settings">
<label>model <select id="model" data-selected="{escape(model or '')}"></select></label>
<label>temperature <input id="temperature" type="number" step="0.1" min="0" max="2" placeholder="model's"></label>
<label>max tokens <input id="num-predict" type="number" min="1" value="256"></label>
<label class="wide">system prompt <textarea id="system" rows="2" placeholder="the model's own"></textarea></label>
</form>
<div id="conversation"></div>
<form id="ask" class="ask">
<textarea id="prompt" rows="3" placeholder="Message (Enter sends, Shift+Enter for a new line)"></textarea>
<div class="buttons"><button type="submit" id="send">Send</button>
<button type="button" id="stop" disabled>Stop</button><button type="button" id="clear">New chat</button></div>
</form>
<p id="chat-status" class="muted"></p>"""
    return layout("Chat", body, script="chat.js", csrf=csrf)


def login_page(wrong: bool) -> str:
    note = '<p class="error">That is not this server\'s API key.</p>' if wrong else ""
    body = f"""<h1>API key</h1>
<p>This server was started with an API key (<code>--api-key</code> or <code>TUNESMITH_API_KEY</code>). Enter it once;
the browser keeps a cookie for this server.</p>{note}
<form method="post" action="/ui/login" class="settings">
<label class="wide">key <input id="key" name="key" type="password" autocomplete="current-password" autofocus></label>
<div class="buttons"><button type="submit" id="login">Log in</button></div>
</form>"""
    return layout("Log in", body)
