"""`python -m tunesmith.serve [--config FILE] [--set serve.KEY=VALUE] [--host H] [--port P]`: the API server alone.

This is what `tunesmith run` starts in the background when no server answers.
"""

from __future__ import annotations

import argparse

from tunesmith.config import load_config
from tunesmith.errors import TunesmithError
from tunesmith.serve.app import apply_env, serve


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m tunesmith.serve")
    parser.add_argument("--config", default=None, help="a tunesmith YAML config; its serve section is used")
    parser.add_argument("--set", dest="overrides", action="append", default=[], help="key.path=value")
    parser.add_argument("--host", default=None)
    parser.add_argument("--port", type=int, default=None)
    parser.add_argument("--api-key", default=None)
    args = parser.parse_args()
    try:
        config = apply_env(load_config(args.config, args.overrides).serve)
        update = {k: v for k, v in (("host", args.host), ("port", args.port), ("api_key", args.api_key)) if v}
        serve(config.model_copy(update=update))
    except TunesmithError as exc:
        raise SystemExit(f"error: {exc}") from None


if __name__ == "__main__":
    main()
