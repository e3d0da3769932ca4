"""The state every handler shares (`Server`): config, API key, model store, engine, and the lookups handlers repeat."""

from __future__ import annotations

import logging
import time
from typing import Any

from gguf import Keys

from tunesmith.config import ServeConfig
from tunesmith.serve import api_types as t
from tunesmith.serve import gguf_meta, options
from tunesmith.serve.address import server_api_key
from tunesmith.serve.engine import Engine
from tunesmith.serve.http import ApiError
from tunesmith.serve.store import InvalidName, Manifest, ModelNotFound, Store, full_name

log = logging.getLogger("tunesmith.serve")


class Server:
    """The state every handler shares: config, API key, store, engine."""

    def __init__(self, config: ServeConfig, store: Store | None = None):
        self.config = config
        self.api_key = server_api_key(config)
        self.store = store or Store()
        self.engine = Engine(self.store, config)
        self._context_lengths: dict[str, int | None] = {}

    def manifest(self, name: str, *, not_found: str | None = None) -> tuple[str, Manifest]:
        if not name:
            raise ApiError(400, "model is required")
        try:
            full = full_name(name)
            return full, self.store.read(full)
        except InvalidName as exc:
            raise ApiError(400, exc.message) from exc
        except ModelNotFound as exc:
            raise ApiError(404, not_found or f"model '{name}' not found") from exc

    def options_for(self, manifest: Manifest, request_options: dict[str, Any] | None) -> options.Options:
        ignored = sorted(options.CPU_IGNORED & set(request_options or {}))
        if ignored:
            log.info("options %s ignored: %s", ", ".join(ignored), options.CPU_IGNORED_REASON)
        opts = options.resolve(self.config.num_ctx, manifest.parameters, request_options)
        return options.fit(opts, self.context_length(manifest))

    def context_length(self, manifest: Manifest) -> int | None:
        """The context the model was trained for (GGUF `<arch>.context_length`), read once per blob."""
        if manifest.model not in self._context_lengths:
            try:
                meta, _ = gguf_meta.read_metadata(self.store.blob_path(manifest.model))
            except (OSError, gguf_meta.GGUFError):
                return None  # loading it will say what is wrong
            value = meta.get(f"{meta.get(Keys.General.ARCHITECTURE)}.context_length")
            self._context_lengths[manifest.model] = value if isinstance(value, int) and value > 0 else None
        return self._context_lengths[manifest.model]

    def keep_alive(self, value: Any) -> float:
        return options.keep_alive_seconds(value, self.config.keep_alive)

    async def load_or_unload(self, name: str, manifest: Manifest, keep_alive: float, opts: options.Options) -> str:
        """An empty prompt loads the model (or unloads it with keep_alive 0), as Ollama does."""
        if keep_alive == 0:
            await self.engine.unload(name)
            return "unload"
        lease = await self.engine.acquire(name, manifest, opts, keep_alive)
        await self.engine.finish(lease)
        return "load"

    async def embed(self, name: str, manifest: Manifest, request_options: dict[str, Any] | None,
                    keep_alive_value: Any, inputs: list[str], truncate: bool) -> tuple[list[list[float]], int, int, int]:
        """(vectors, tokens read, load duration, total duration) for `inputs`."""
        started = time.perf_counter_ns()
        opts = self.options_for(manifest, request_options)
        keep_alive = self.keep_alive(keep_alive_value)
        lease = await self.engine.acquire(name, manifest, opts, keep_alive)
        try:
            vectors, count = await self.engine.embed(lease, inputs, truncate)
            await self.engine.finish(lease)
        finally:
            self.engine.release(lease)
        return vectors, count, lease.load_duration, time.perf_counter_ns() - started

    def details(self, manifest: Manifest) -> t.ModelDetails:
        return t.ModelDetails(**manifest.details) if manifest.details else t.ModelDetails(format="gguf")
