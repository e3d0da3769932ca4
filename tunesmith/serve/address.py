"""Where the server is and which API key it takes, from flags, the config and the environment, for both sides.

The server (`server_settings`): TUNESMITH_HOST (`host`, `host:port`, `:port`, a URL: as OLLAMA_HOST), and the key
from --api-key, --api-key-file, the config's serve.api_key or TUNESMITH_API_KEY, in that order.
The clients (`host_url`, `client_api_key`): TUNESMITH_HOST, else the config's serve section, else 127.0.0.1:11434;
the key given, else TUNESMITH_API_KEY, else OLLAMA_API_KEY (as Ollama's own client reads it).
"""

from __future__ import annotations

import ipaddress
import os
from pathlib import Path
from typing import Any
from urllib.parse import SplitResult, urlsplit

from tunesmith.config import ServeConfig
from tunesmith.errors import ConfigError

DEFAULT_PORT = 11434
HOST_ENV = "TUNESMITH_HOST"
API_KEY_ENV = "TUNESMITH_API_KEY"
OLLAMA_API_KEY_ENV = "OLLAMA_API_KEY"
MIN_API_KEY = 16


def _split(value: str) -> tuple[SplitResult, bool]:
    """OLLAMA_HOST's forms as a URL, and whether the value named its scheme."""
    had_scheme = "://" in value
    return urlsplit(value if had_scheme else "http://" + value), had_scheme


def is_loopback(host: str) -> bool:
    if host in ("localhost", ""):
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


# ---------------------------------------------------------------------------------------- the server side

def read_api_key_file(path: str | Path) -> str:
    """The key in a key file: its first line, without the line break editors and `echo` add."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: cannot read the API key file ({exc.__class__.__name__}: {exc})",
                          "pass a readable file holding the key on its first line") from exc
    lines = text.splitlines()
    key = lines[0].strip("\r\n") if lines else ""
    if not key:
        raise ConfigError(f"{path}: the API key file is empty", "write the key on its first line")
    return key


def server_settings(config: ServeConfig, *, host: str | None = None, port: int | None = None,
                    api_key: str | None = None, api_key_file: str | Path | None = None) -> ServeConfig:
    """The serve section a server starts with: `config`, then TUNESMITH_HOST and TUNESMITH_API_KEY (the key only
    when the config has none), then the flags."""
    if api_key and api_key_file:
        raise ConfigError("--api-key and --api-key-file both given", "give one of them")
    update: dict[str, Any] = {}
    value = os.environ.get(HOST_ENV, "").strip()
    if value:
        parts, _ = _split(value)
        if parts.hostname:
            update["host"] = parts.hostname
        if parts.port:
            update["port"] = parts.port
    if os.environ.get(API_KEY_ENV) and not config.api_key:
        update["api_key"] = os.environ[API_KEY_ENV]
    if api_key_file:
        api_key = read_api_key_file(api_key_file)
    update.update({k: v for k, v in (("host", host), ("port", port), ("api_key", api_key)) if v})
    return config.model_copy(update=update) if update else config


def server_api_key(config: ServeConfig) -> str | None:
    """The key a server built from `config` requires (None: none)."""
    return config.api_key or os.environ.get(API_KEY_ENV) or None


def check_api_key(host: str, api_key: str | None) -> None:
    """A server others can reach needs a key they cannot guess: at least MIN_API_KEY characters, no whitespace
    (a stray space or tab from a shell or a file is not a key)."""
    if is_loopback(host):
        return
    hint = (f"set {API_KEY_ENV} or pass --api-key-file FILE (--api-key shows in the process list); "
            "e.g. `openssl rand -hex 16`; clients send Authorization: Bearer KEY")
    if not api_key:
        raise ConfigError(f"serve.host {host} is not a loopback address and no API key is set", hint)
    if len(api_key) < MIN_API_KEY or any(c.isspace() for c in api_key):
        raise ConfigError(f"serve.host {host} is not a loopback address and its API key is too weak: it must be "
                          f"at least {MIN_API_KEY} characters without whitespace", hint)


# ---------------------------------------------------------------------------------------- the client side

def client_host(settings: ServeConfig | None) -> str | None:
    """Where client commands talk: None when TUNESMITH_HOST is set or no config was given (`host_url` then reads
    the environment or takes the default), else the config's serve.host:serve.port."""
    if os.environ.get(HOST_ENV) or settings is None:
        return None
    return f"http://{settings.host}:{settings.port}"


def host_url(host: str | None = None) -> str:
    """The base URL for `host` (or $TUNESMITH_HOST), parsed like OLLAMA_HOST: `host`, `host:port`, `:port`, URL."""
    value = (host or os.environ.get(HOST_ENV) or "").strip()
    if not value:
        return f"http://127.0.0.1:{DEFAULT_PORT}"
    parts, had_scheme = _split(value)
    hostname = parts.hostname or "127.0.0.1"
    if hostname == "0.0.0.0":
        hostname = "127.0.0.1"  # a server bound to all interfaces answers on loopback
    if ":" in hostname:
        hostname = f"[{hostname}]"
    # As OLLAMA_HOST: no scheme means port 11434; an explicit scheme means its usual port.
    port = parts.port or (DEFAULT_PORT if not had_scheme else {"http": 80, "https": 443}.get(parts.scheme, 80))
    return f"{parts.scheme}://{hostname}:{port}{parts.path.rstrip('/')}"


def client_api_key(api_key: str | None = None) -> str | None:
    """The key a client sends: the one given, else TUNESMITH_API_KEY, else OLLAMA_API_KEY."""
    return api_key or os.environ.get(API_KEY_ENV) or os.environ.get(OLLAMA_API_KEY_ENV) or None
