"""The API: the route table (path, methods, handler, request type) over the handlers, behind the guard, and
`create_api`, the FastAPI app that serves it (Ollama's server/routes.go).

Ollama's handlers are in `handlers.py`, OpenAI's in `openai_compat.py`, the state they share in `server.py`.
The web UI is not mounted here: `tunesmith/app.py`, above both, adds it to this app (`create_app`).
"""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel

from tunesmith.config import ServeConfig
from tunesmith.serve import api_types as t
from tunesmith.serve import handlers, openai_compat
from tunesmith.serve.address import check_api_key, is_loopback, server_api_key
from tunesmith.serve.guard import Guard, allowed_origins
from tunesmith.serve.http import MAX_BODY_BYTES, NAME_BODY_BYTES, PROMPT_BODY_BYTES, install_errors, read_json
from tunesmith.serve.server import Server
from tunesmith.serve.store import Store
from tunesmith.serve.timeouts import BodyTimeout


@dataclass(frozen=True)
class Route:
    methods: tuple[str, ...]
    path: str
    handler: Callable[..., Awaitable[Any]]
    body: type[BaseModel] | None = None
    """The JSON request type the handler takes as `req` (None: the route reads no JSON body)."""
    max_body: int = PROMPT_BODY_BYTES
    """The longest JSON body the route reads (413 beyond, before any of it is read)."""


GET, HEAD, POST, DELETE = ("GET",), ("HEAD",), ("POST",), ("DELETE",)

ROUTES: tuple[Route, ...] = (
    Route(GET + HEAD, "/", handlers.root),
    Route(GET + HEAD, "/api/version", handlers.version),
    Route(GET + HEAD, "/api/tags", handlers.tags),
    Route(POST, "/api/show", handlers.show, t.ModelRequest, NAME_BODY_BYTES),
    Route(GET, "/api/ps", handlers.ps),
    Route(POST, "/api/generate", handlers.generate, t.GenerateRequest),
    Route(POST, "/api/chat", handlers.chat, t.ChatRequest),
    Route(POST, "/api/create", handlers.create, t.CreateRequest),
    Route(HEAD, "/api/blobs/{digest}", handlers.head_blob),
    Route(POST, "/api/blobs/{digest}", handlers.post_blob),
    Route(POST, "/api/copy", handlers.copy, t.CopyRequest, NAME_BODY_BYTES),
    Route(DELETE, "/api/delete", handlers.delete, t.ModelRequest, NAME_BODY_BYTES),
    Route(POST, "/api/embed", handlers.embed, t.EmbedRequest),
    Route(POST, "/api/embeddings", handlers.embeddings, t.EmbeddingsRequest),
    Route(POST, "/api/pull", handlers.pull, t.PullRequest, NAME_BODY_BYTES),
    Route(POST, "/api/push", handlers.push, t.PullRequest, NAME_BODY_BYTES),
    Route(GET, "/v1/models", openai_compat.list_models),
    Route(GET, "/v1/models/{model:path}", openai_compat.get_model),
    Route(POST, "/v1/chat/completions", openai_compat.chat_completions, t.ChatCompletionRequest),
    Route(POST, "/v1/completions", openai_compat.completions, t.CompletionRequest),
    Route(POST, "/v1/embeddings", openai_compat.embeddings, t.OpenAIEmbeddingRequest),
)


def _endpoint(route: Route, server: Server) -> Callable[[Request], Awaitable[Response]]:
    """The HTTP endpoint for `route`: read its typed request, call the handler, send a typed reply as JSON."""
    wants_request = "request" in inspect.signature(route.handler).parameters

    async def endpoint(request: Request) -> Response:
        kwargs: dict[str, Any] = {**request.path_params, "server": server}
        if route.body is not None:
            kwargs["req"] = await read_json(request, route.body, route.max_body)
        if wants_request:
            kwargs["request"] = request
        reply = await route.handler(**kwargs)
        return reply if isinstance(reply, Response) else JSONResponse(reply.wire())

    endpoint.__name__ = route.handler.__name__
    return endpoint


def create_api(config: ServeConfig, store: Store | None = None) -> FastAPI:
    """The API app for `config` (its `Server` in `app.state.server`). Refuses a non-loopback host without a
    strong API key."""
    check_api_key(config.host, server_api_key(config))
    server = Server(config, store)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        server.store.prune_temporaries()  # what killed uploads left behind, as Ollama prunes at start
        await server.engine.start()
        yield
        await server.engine.stop()

    app = FastAPI(title="tunesmith", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.server = server
    app.add_middleware(Guard, api_key=server.api_key, check_host=is_loopback(config.host), origins=allowed_origins(),
                       max_body=MAX_BODY_BYTES)
    app.add_middleware(BodyTimeout, seconds=config.read_timeout)
    install_errors(app)
    for route in ROUTES:
        app.add_api_route(route.path, _endpoint(route, server), methods=list(route.methods), include_in_schema=False)
    return app
