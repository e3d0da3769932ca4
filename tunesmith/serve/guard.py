"""Who may talk to the server, checked before any route runs: the Host and Origin policy of Ollama, the API key,
and the size a JSON body may announce.

- Host: a server bound to a loopback address answers only requests addressed to a local name or address
  (localhost, *.localhost, *.local, *.internal, this machine's name, a loopback, private or unspecified IP, or
  one of this machine's own interface addresses), as Ollama's allowedHostsMiddleware does. A web page whose domain an attacker points at 127.0.0.1 (DNS rebinding)
  sends its own name as Host, and gets 403.
- Origin: a browser names the page behind every cross-origin request. Requests without one (curl, the Python
  and JavaScript clients outside a browser) and same-origin ones (the web UI at /ui) pass; other origins must be
  on the allow-list: loopback origins on any port, app/file/tauri/vscode and browser-extension pages, and
  TUNESMITH_ORIGINS (comma-separated, `*` wildcards), as OLLAMA_ORIGINS extends Ollama's. Anything else gets 403,
  including the `text/plain` POSTs a page may send without a CORS preflight. Allowed origins get CORS headers
  (never Access-Control-Allow-Credentials: no page elsewhere reads an answer its cookie opened).
- The web UI's cookie (on a server with an API key) opens only the UI's own requests: see UI_COOKIE.

A pure ASGI middleware, not Starlette's BaseHTTPMiddleware: under that one `request.is_disconnected()` never
turns true, so a client that left while queued was still generated for.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import os
import socket
from collections.abc import Callable, Iterable
from typing import Any
from urllib.parse import urlsplit

import psutil
from starlette.datastructures import Headers
from starlette.requests import Request
from starlette.responses import JSONResponse, RedirectResponse, Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from tunesmith.errors import clip
from tunesmith.serve import api_types as t

ORIGINS_ENV = "TUNESMITH_ORIGINS"
DEFAULT_ORIGINS = (
    *(f"{scheme}://{host}{port}" for host in ("localhost", "127.0.0.1", "[::1]", "0.0.0.0")
      for scheme in ("http", "https") for port in ("", ":*")),
    "app://*", "file://*", "tauri://*", "vscode-webview://*", "vscode-file://*",
    "chrome-extension://*", "moz-extension://*", "safari-extension://*", "safari-web-extension://*",
    "ms-browser-extension://*",
)
LOCAL_SUFFIXES = (".localhost", ".local", ".internal")

# A browser cannot add an Authorization header to page loads, so on a server with an API key the web UI logs
# in once (/ui/login) and gets this cookie: an HMAC of the key, never the key itself; HttpOnly, SameSite=Strict.
# SameSite does not separate ports (a page on localhost:3000 is the same site as localhost:11434, and the browser
# sends it the cookie), so the cookie is honoured only on the UI's own requests: none from another origin, and a
# request that changes anything must also come from the server's own origin and carry CSRF_HEADER, which the
# UI's script copies from its page (a page elsewhere can neither read it nor set a header without a preflight).
UI_COOKIE = "tunesmith_ui"
CSRF_HEADER = "x-tunesmith-csrf"
SAFE_METHODS = ("GET", "HEAD", "OPTIONS")
# Open without a key: the login form, and the UI's CSS and JavaScript (package files, nothing of the user's).
OPEN_PATHS = ("/ui/login", "/ui/static/")


def ui_token(api_key: str) -> str:
    return hmac.new(api_key.encode(), b"tunesmith web UI", hashlib.sha256).hexdigest()


def csrf_token(api_key: str) -> str:
    """What the web UI's pages give their script to send in CSRF_HEADER."""
    return hmac.new(api_key.encode(), b"tunesmith web UI: changes", hashlib.sha256).hexdigest()


def credentials(request: Request, api_key: str) -> str | None:
    """How a request shows it knows the key: "bearer" (Authorization: Bearer KEY), "cookie" (the web UI's), or
    None."""
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() == "bearer" and hmac.compare_digest(token.strip().encode(), api_key.encode()):
        return "bearer"
    cookie = request.cookies.get(UI_COOKIE, "")
    return "cookie" if hmac.compare_digest(cookie.encode(), ui_token(api_key).encode()) else None


def from_the_ui(method: str, headers: Headers, origin: str | None, host: str, api_key: str) -> bool:
    """Whether a request that came with the UI's cookie is the UI's own: no other origin named, and for one that
    changes anything (not GET, HEAD, OPTIONS) the server's own origin and the CSRF token."""
    if origin is not None and not same_origin(origin, host):
        return False
    if method in SAFE_METHODS:
        return True
    return origin is not None and hmac.compare_digest(headers.get(CSRF_HEADER, "").encode(),
                                                      csrf_token(api_key).encode())


ERROR_CHARS = 1000
"""The longest error message sent: values a message echoes are cut where it is written, and this is the bound."""


def error_response(path: str, status: int, message: str) -> JSONResponse:
    """Ollama's `{"error": "..."}`, or OpenAI's error object under /v1/."""
    message = clip(message, ERROR_CHARS)
    body: t.OpenAIErrorResponse | t.ErrorResponse
    if path.startswith("/v1/"):
        kind = {400: "invalid_request_error", 404: "not_found_error"}.get(status, "api_error")
        body = t.OpenAIErrorResponse(error=t.OpenAIErrorDetail(message=message, type=kind))
    else:
        body = t.ErrorResponse(error=message)
    return JSONResponse(body.wire(), status)


def allowed_origins(extra: str | None = None) -> tuple[str, ...]:
    """The origin patterns: TUNESMITH_ORIGINS (or `extra`), then the defaults."""
    value = os.environ.get(ORIGINS_ENV, "") if extra is None else extra
    added = tuple(part.strip().strip("\"'").lower() for part in value.split(",") if part.strip())
    return (*added, *DEFAULT_ORIGINS)


def origin_allowed(origin: str, patterns: tuple[str, ...]) -> bool:
    """`*` alone allows every origin; one `*` in a pattern stands for any text there (gin-contrib/cors's wildcard)."""
    origin = origin.lower()
    for pattern in patterns:
        if pattern == "*" or pattern == origin:
            return True
        head, star, tail = pattern.partition("*")
        if star and "*" not in tail and len(origin) >= len(head) + len(tail) and origin.startswith(head) \
                and origin.endswith(tail):
            return True
    return False


def host_name(host: str) -> str:
    """The name or address in a Host header, without its port or IPv6 brackets."""
    host = host.strip().lower()
    try:
        parsed = urlsplit("//" + host).hostname
    except ValueError:
        return host
    return parsed if parsed is not None else host


def machine_addresses() -> set[ipaddress.IPv4Address | ipaddress.IPv6Address]:
    """Every address of this machine's network interfaces, read at the time of asking (interfaces come and go)."""
    found = set()
    for addresses in psutil.net_if_addrs().values():
        for entry in addresses:
            if entry.family in (socket.AF_INET, socket.AF_INET6):
                try:
                    found.add(ipaddress.ip_address(entry.address.partition("%")[0]))
                except ValueError:
                    continue
    return found


def allowed_host(host: str, own_addresses: Callable[[], Iterable[Any]] = machine_addresses) -> bool:
    """Whether a loopback-bound server answers a request with this Host header (Ollama's allowedHost and
    isLocalIP: one of this machine's own interface addresses counts as local even when it is public)."""
    name = host_name(host)
    if name in ("", "localhost") or name.endswith(LOCAL_SUFFIXES):
        return True
    try:
        address = ipaddress.ip_address(name)
    except ValueError:
        return name == socket.gethostname().lower()
    if address.is_loopback or address.is_private or address.is_unspecified:
        return True
    return address in set(own_addresses())


def same_origin(origin: str, host: str) -> bool:
    """Not a CORS request at all: the page came from this server (gin-contrib/cors's test)."""
    return origin.lower() in (f"http://{host}".lower(), f"https://{host}".lower())


class Guard:
    """Host, Origin, API key and announced body size, before any route (see the module's docstring)."""

    def __init__(self, app: ASGIApp, *, api_key: str | None, check_host: bool, origins: tuple[str, ...],
                 max_body: int):
        self.app = app
        self.api_key = api_key
        self.check_host = check_host
        self.origins = origins
        self.max_body = max_body

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = Headers(scope=scope)
        path: str = scope["path"]
        method: str = scope["method"]
        host = headers.get("host", "")
        origin = headers.get("origin")
        refusal = self._refusal(path, method, headers, host, origin, scope)
        if refusal is not None:
            await refusal(scope, receive, send)
            return
        if origin is None or same_origin(origin, host):
            await self.app(scope, receive, send)
            return

        async def send_with_cors(message: Message) -> None:
            if message["type"] == "http.response.start":
                response_headers = list(message.get("headers", []))
                response_headers += [(b"access-control-allow-origin", origin.encode("latin-1")),
                                     (b"vary", b"Origin")]
                message = {**message, "headers": response_headers}
            await send(message)

        await self.app(scope, receive, send_with_cors)

    def _refusal(self, path: str, method: str, headers: Headers, host: str, origin: str | None,
                 scope: Scope) -> Response | None:
        """The answer that stops this request here, or None to let it through."""
        if self.check_host and not allowed_host(host):
            return error_response(path, 403, f"forbidden: host {clip(repr(host_name(host)))} is not a local name "
                                             "of this server (it listens on a loopback address)")
        cross = origin is not None and not same_origin(origin, host)
        if cross and not origin_allowed(origin, self.origins):
            return error_response(path, 403, f"forbidden: origin {clip(repr(origin))} is not allowed; add it to "
                                             f"{ORIGINS_ENV} to let its pages use this server")
        if cross and method == "OPTIONS" and "access-control-request-method" in headers:
            return _preflight(origin or "", headers)
        if self.api_key is not None and not path.startswith(OPEN_PATHS):
            how = credentials(Request(scope), self.api_key)
            if how is None:
                if method == "GET" and (path == "/ui" or path.startswith("/ui/")) and "/api/" not in path:
                    return RedirectResponse("/ui/login", status_code=303)  # a person at a browser: ask for the key
                return error_response(path, 401, "unauthorized: missing or wrong API key")
            if how == "cookie" and not from_the_ui(method, headers, origin, host, self.api_key):
                return error_response(path, 403, "forbidden: the web UI's cookie opens only the UI's own requests "
                                                 "(other pages and scripts send Authorization: Bearer KEY)")
        if not path.startswith("/api/blobs/"):
            length = headers.get("content-length")
            if length and length.isdigit() and int(length) > self.max_body:
                return error_response(path, 413, f"request body too large (limit {self.max_body:,} bytes)")
        return None


def _preflight(origin: str, headers: Headers) -> Response:
    """The answer to an allowed origin's CORS preflight: what it may send (gin-contrib/cors's defaults)."""
    allow: dict[str, Any] = {
        "access-control-allow-origin": origin,
        "access-control-allow-methods": "GET, POST, PUT, PATCH, DELETE, HEAD, OPTIONS",
        "access-control-max-age": "43200",
        "vary": "Origin",
    }
    requested = headers.get("access-control-request-headers")
    if requested:
        allow["access-control-allow-headers"] = requested
    return Response(status_code=204, headers=allow)
