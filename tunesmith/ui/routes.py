"""The web UI's routes, mounted on the API app under /ui: same server, same API-key guard.

    GET /ui                                   the runs in the runs folder, with their state
    GET /ui/runs/<name>                       one run: live loss curves, eval table, export sizes and fidelity
    GET /ui/runs/<name>/report.html           the run's report.html (that one file of that run folder only)
    GET /ui/api/runs/<name>/metrics?after=N   metrics.jsonl records from line N on, and the run's state
    GET /ui/chat                              chat with a model of the store through /api/chat
    GET, POST /ui/login                       on a server with an API key: the key, once, for a cookie
    GET /ui/static/...                        the pages' CSS and JavaScript (package data)

Handlers are plain functions, so FastAPI runs their file reads in its thread pool, off the event loop that
streams tokens.
"""

from __future__ import annotations

import contextlib
import hmac
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs

from fastapi import FastAPI, Query, Request
from fastapi.responses import FileResponse, HTMLResponse, RedirectResponse, Response
from fastapi.staticfiles import StaticFiles

from tunesmith.run import REPORT
from tunesmith.serve.guard import UI_COOKIE, csrf_token, ui_token
from tunesmith.serve.http import ApiError, read_body
from tunesmith.serve.store import Store, StoreError, full_name
from tunesmith.ui import pages, runs

STATIC = Path(__file__).parent / "static"
# The pages load only what this server serves; report.html is one self-contained file with no scripts.
PAGE_POLICY = ("default-src 'self'; img-src 'self' data:; style-src 'self'; script-src 'self'; "
               "connect-src 'self'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'")
REPORT_POLICY = "default-src 'none'; img-src data:; style-src 'unsafe-inline'; frame-ancestors 'none'"
LOGIN_BODY_BYTES = 4096
"""The login form holds one key."""


def install_ui(app: FastAPI, runs_dir: Path, store: Store, api_key: str | None = None) -> None:
    """Add the /ui pages to `app`: runs read from `runs_dir`, chat models from `store`; `api_key` is the
    server's (the guard in serve/guard.py checks every request; the login here hands browsers a cookie)."""
    app.mount("/ui/static", StaticFiles(directory=STATIC), name="ui-static")

    def run_dir(name: str) -> Path:
        try:
            return runs.locate(runs_dir, name)
        except runs.RunError as exc:
            raise ApiError(exc.status, exc.message) from exc

    def page(text: str) -> HTMLResponse:
        return HTMLResponse(text, headers={"Content-Security-Policy": PAGE_POLICY, "Cache-Control": "no-store"})

    @app.get("/ui")
    def runs_list() -> HTMLResponse:
        found = []
        for name in runs.run_names(runs_dir):
            with contextlib.suppress(runs.RunError, OSError):  # a run removed while we list is simply gone
                found.append(runs.summary(runs.locate(runs_dir, name)))
        return page(pages.runs_page(runs_dir, found))

    # `{name:path}` takes slashes too, so that `../` in any spelling reaches the name check (400) instead of
    # depending on how the router happens to match it. The report route comes first: it is the more specific.
    @app.get("/ui/runs/{name:path}/report.html")
    def report(name: str) -> FileResponse:
        path = runs.inside(run_dir(name), REPORT)
        if path is None:
            raise ApiError(404, f"run {name!r} has no report.html yet (`tunesmith report --run ...`)")
        return FileResponse(path, media_type="text/html",
                            headers={"Content-Security-Policy": REPORT_POLICY, "Cache-Control": "no-store"})

    @app.get("/ui/runs/{name:path}")
    def run_view(name: str) -> HTMLResponse:
        folder = run_dir(name)
        keys, rows = runs.eval_table(folder)
        files, fidelity = runs.exports(folder)
        return page(pages.run_page(runs.summary(folder), keys, rows, files, fidelity, _model_of(store, name)))

    @app.get("/ui/api/runs/{name:path}/metrics")
    def metrics(name: str, after: int = Query(0, ge=0)) -> dict[str, Any]:
        folder = run_dir(name)
        records = runs.metrics(folder)
        # Fewer lines than the page has: a resume rewrote the file, so the page starts over.
        reset = after > len(records)
        return {"state": runs.summary(folder, records).state, "count": len(records), "reset": reset,
                "records": records if reset else records[after:]}

    @app.get("/ui/chat")
    def chat(model: str | None = None) -> HTMLResponse:
        return page(pages.chat_page(model, csrf_token(api_key) if api_key is not None else None))

    @app.get("/ui/login", response_model=None)
    def login_form() -> Response:
        if api_key is None:
            return RedirectResponse("/ui", status_code=303)
        return page(pages.login_page(wrong=False))

    @app.post("/ui/login", response_model=None)
    async def login(request: Request) -> Response:
        if api_key is None:
            return RedirectResponse("/ui", status_code=303)
        # a plain urlencoded form: parsed here rather than pulling in python-multipart for one field
        fields = parse_qs((await read_body(request, LOGIN_BODY_BYTES)).decode("utf-8", "replace"))
        given = (fields.get("key") or [""])[0].strip()  # as the server strips the key it reads
        if not hmac.compare_digest(given.encode(), api_key.encode()):
            response = page(pages.login_page(wrong=True))
            response.status_code = 401
            return response
        response = RedirectResponse("/ui", status_code=303)
        response.set_cookie(UI_COOKIE, ui_token(api_key), httponly=True, samesite="strict", path="/")
        return response


def _model_of(store: Store, run_name: str) -> str | None:
    """The store's model made from this run (export names it after the run), if it was created."""
    with contextlib.suppress(StoreError):
        name = full_name(run_name)
        store.read(name)
        return name
    return None
