"""Where the server is and which API key it takes, from flags, the config and the environment, for both sides.

The server (`server_settings`): TUNESMITH_HOST (`host`, `host:port`, `:port`, a URL: as OLLAMA_HOST), and the key
from --api-key, --api-key-file, the config's serve.api_key or TUNESMITH_API_KEY, in that order.
The clients (`host_url`, `client_api_key`): TUNESMITH_HOST, else the config's serve section, else 127.0.0.1:11434;
the key given, else TUNESMITH_API_KEY, else OLLAMA_API_KEY (as Ollama's own client reads it).
"""

from __future__ import annotations

import ipaddress
import logging
import os
import stat
from pathlib import Path
from typing import Any
from urllib.parse import SplitResult, urlsplit

from tunesmith.config import ServeConfig
from tunesmith.errors import ConfigError

log = logging.getLogger("tunesmith.serve")

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

def api_key_value(key: str, source: str) -> str:
    """`key` without the whitespace around it (the line break `echo` adds, a stray space or tab): a Bearer token
    cannot carry it, HTTP clients refuse to send it, and a server that kept it could never be authenticated to.
    ConfigError naming `source` for a key that is then empty, or holds what no HTTP header can carry."""
    stripped = key.strip()
    if not stripped:
        raise ConfigError(f"{source}: the API key is empty (whitespace only)", "e.g. `openssl rand -hex 16`")
    bad = next((c for c in stripped if not (" " <= c <= "~" or c == "\t")), None)
    if bad is not None:
        raise ConfigError(f"{source}: the API key contains {bad!r}, which an HTTP header cannot carry",
                          "use letters, digits and punctuation, e.g. `openssl rand -hex 16`")
    return stripped


def read_api_key_file(path: str | Path) -> str:
    """The key in a key file: its first line, without the whitespace around it. A file that other users may read
    or write gets a warning naming it and its mode, as ssh names a private key's (it is not refused: secrets
    mounted by Docker or Kubernetes are often 0444)."""
    try:
        text = Path(path).read_text(encoding="utf-8")
        mode = stat.S_IMODE(os.stat(path).st_mode)
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: cannot read the API key file ({exc.__class__.__name__}: {exc})",
                          "pass a readable file holding the key on its first line") from exc
    if mode & 0o077:
        log.warning("warning: %s: permissions %04o are too open: other users can read the API key (chmod 600 %s)",
                    path, mode, path)
    lines = text.splitlines()
    return api_key_value(lines[0] if lines else "", f"{path} (first line)")


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
    """The key a server built from `config` requires (None: none), without the whitespace around it."""
    if config.api_key:
        return api_key_value(config.api_key, "serve.api_key (or --api-key)")
    if os.environ.get(API_KEY_ENV):
        return api_key_value(os.environ[API_KEY_ENV], API_KEY_ENV)
    return None


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
    """The key a client sends: the one given, else TUNESMITH_API_KEY, else OLLAMA_API_KEY; without the whitespace
    around it, and ConfigError naming where it came from when no HTTP header can carry it."""
    for source, value in (("serve.api_key", api_key), (API_KEY_ENV, os.environ.get(API_KEY_ENV)),
                          (OLLAMA_API_KEY_ENV, os.environ.get(OLLAMA_API_KEY_ENV))):
        if value:
            return api_key_value(value, source)
    return None
