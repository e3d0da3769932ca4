"""How long a client may take to send its request, so that slow and stalled clients (slowloris) cannot hold
connections forever: uvicorn has no read timeout of its own.

- The head (request line and headers) must arrive within `serve.read_timeout` seconds of its first byte, or of
  the connection's start: `H11Protocol`, uvicorn's HTTP/1.1 protocol with that one deadline added.
- The body must arrive within `serve.read_timeout` seconds plus one second for every MIN_RATE bytes received,
  as Apache's mod_reqtimeout counts (`body=20,MinRate=500`): a large upload that keeps moving goes on, a client
  that stalls or trickles gets 408 and its connection closed (`BodyTimeout`, an ASGI middleware).
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

import uvicorn
from starlette.types import ASGIApp, Message, Receive, Scope, Send
from uvicorn.protocols.http import h11_impl

log = logging.getLogger("tunesmith.serve")

MIN_RATE = 500
"""Bytes a second a body must keep arriving at once its first `read_timeout` seconds are spent."""


class RequestTimeout(Exception):
    """The client did not send its request body in time (answered 408, connection closed)."""


class BodyTimeout:
    """Each request's body within `seconds` plus one second per MIN_RATE bytes received, else RequestTimeout
    out of `receive` (the app answers it 408). Once the body is complete, `receive` is left as it is: it then only
    tells a streaming response that the client left."""

    def __init__(self, app: ASGIApp, *, seconds: float):
        self.app = app
        self.seconds = seconds

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.monotonic()
        received = 0
        complete = False

        async def timed_receive() -> Message:
            nonlocal received, complete
            if complete:
                return await receive()
            remaining = start + self.seconds + received / MIN_RATE - time.monotonic()
            try:
                async with asyncio.timeout(max(remaining, 0.0)):
                    message = await receive()
            except TimeoutError:
                raise RequestTimeout(f"the request body did not arrive in time ({self.seconds:g} s, then at least "
                                     f"{MIN_RATE} bytes a second)") from None
            received += len(message.get("body", b""))
            complete = message["type"] != "http.request" or not message.get("more_body", False)
            return message

        await self.app(scope, timed_receive, send)


class H11Protocol(h11_impl.H11Protocol):
    """uvicorn's HTTP/1.1 protocol, with a deadline for each request's head: uvicorn itself waits forever for a
    connection's first request, and for the rest of a head once its first bytes came (its keep-alive timer stops
    at the first byte)."""

    head_timeout: float = 20.0

    def connection_made(self, transport: Any) -> None:
        self._head_deadline: asyncio.TimerHandle | None = None
        super().connection_made(transport)
        self._watch_head()

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        self._watch_head()

    def connection_lost(self, exc: Exception | None) -> None:
        self._stop_watching()
        super().connection_lost(exc)

    def _watch_head(self) -> None:
        """Between requests (none yet, or the last one answered): the next head has until the deadline. Inside a
        request the body has its own (BodyTimeout)."""
        waiting = self.cycle is None or self.cycle.response_complete
        if not waiting:
            self._stop_watching()
        elif self._head_deadline is None and not self.transport.is_closing():
            self._head_deadline = self.loop.call_later(self.head_timeout, self._head_timed_out)

    def _stop_watching(self) -> None:
        if self._head_deadline is not None:
            self._head_deadline.cancel()
            self._head_deadline = None

    def _head_timed_out(self) -> None:
        self._head_deadline = None
        if (self.cycle is None or self.cycle.response_complete) and not self.transport.is_closing():
            client = "{}:{}".format(*self.client) if self.client else "a client"
            log.info("closed the connection of %s: no complete request within %g s", client, self.head_timeout)
            self.transport.close()


def uvicorn_config(app: Any, *, host: str, port: int, read_timeout: float, log_level: str = "info",
                   **settings: Any) -> uvicorn.Config:
    """uvicorn's settings for tunesmith's server (the CLI's and the tests'): HTTP/1.1 through `H11Protocol`, the
    head deadline `read_timeout`."""
    protocol = type("H11Protocol", (H11Protocol,), {"head_timeout": read_timeout})
    return uvicorn.Config(app, host=host, port=port, log_level=log_level, http=protocol, **settings)
