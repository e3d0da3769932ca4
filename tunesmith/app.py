"""The whole server tunesmith runs: the API app (serve/) with the web UI (ui/) mounted on it, and its start.

It lives above both packages so that the server package never imports the web UI: `tunesmith serve`,
`python -m tunesmith.app` (what `tunesmith run` and the pipeline start in the background: local_server.py, beside
this module) and the tests build the app here.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from fastapi import FastAPI

from tunesmith.config import ServeConfig, load_config
from tunesmith.errors import TunesmithError
from tunesmith.serve.address import server_settings
from tunesmith.serve.routes import create_api
from tunesmith.serve.store import Store
from tunesmith.ui import install_ui


def create_app(config: ServeConfig, store: Store | None = None) -> FastAPI:
    """The API for `config` with the web UI at /ui (runs from `config.runs_dir`)."""
    app = create_api(config, store)
    server = app.state.server
    install_ui(app, Path(config.runs_dir), server.store, server.api_key)
    return app


def serve(config: ServeConfig) -> None:
    """Run the server with uvicorn until interrupted."""
    import uvicorn

    from tunesmith.serve.timeouts import uvicorn_config

    app = create_app(config)
    uvicorn.Server(uvicorn_config(app, host=config.host, port=config.port, read_timeout=config.read_timeout,
                                  timeout_graceful_shutdown=5)).run()


def main(argv: list[str] | None = None) -> None:
    """`python -m tunesmith.app [--config FILE] [--set serve.KEY=VALUE] [--host H] [--port P]`: the server alone."""
    parser = argparse.ArgumentParser(prog="python -m tunesmith.app")
    parser.add_argument("--config", default=None, help="a tunesmith YAML config; its serve section is used")
    parser.add_argument("--set", dest="overrides", action="append", default=[], help="key.path=value")
    parser.add_argument("--host", default=None)
    parser.add_argument("--port", type=int, default=None)
    parser.add_argument("--api-key", default=None)
    args = parser.parse_args(argv)
    try:
        serve(server_settings(load_config(args.config, args.overrides).serve, host=args.host, port=args.port,
                              api_key=args.api_key))
    except TunesmithError as exc:
        raise SystemExit(f"error: {exc}") from None


if __name__ == "__main__":
    main()
