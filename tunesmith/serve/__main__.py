"""`python -m tunesmith.serve --host H --port P`: the API server alone (what `tunesmith run` starts in the background)."""

from __future__ import annotations

import argparse

from tunesmith.config import ServeConfig
from tunesmith.serve.app import serve


def main() -> None:
    defaults = ServeConfig()
    parser = argparse.ArgumentParser(prog="python -m tunesmith.serve")
    parser.add_argument("--host", default=defaults.host)
    parser.add_argument("--port", type=int, default=defaults.port)
    parser.add_argument("--api-key", default=None)
    args = parser.parse_args()
    serve(ServeConfig(host=args.host, port=args.port, api_key=args.api_key))


if __name__ == "__main__":
    main()
