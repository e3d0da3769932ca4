"""The llama.cpp engine: loads store models, schedules requests onto them, streams their tokens.

One `Runner` per loaded model holds a `Batcher` (llama/batching.py): one llama.cpp context whose cache holds
`serve.parallel` sequences, decoded together by one thread (continuous batching). Requests beyond the free
slots wait inside it; more than `serve.max_queue` pending requests get ServerBusy (503) at once. At most
`serve.max_loaded` models stay loaded; the least recently used idle one unloads to make room, and an idle model
unloads when its keep_alive expires. A request stops within one token when its client goes away.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import math
import threading
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from tunesmith.config import ServeConfig
from tunesmith.llama.batching import MAX_TOP_LOGPROBS, BadRequest, Batcher, Piece, Sequence, Stats
from tunesmith.llama.load import EngineError, default_threads, open_llama
from tunesmith.serve import token_count
from tunesmith.serve.options import FOREVER, Options
from tunesmith.serve.store import Manifest, Store

log = logging.getLogger("tunesmith.serve")

# Names the server's other modules take from here: the engine is their one door to llama.cpp.
__all__ = ["MAX_TOP_LOGPROBS", "BadRequest", "Engine", "EngineError", "Lease", "Piece", "Runner", "ServerBusy",
           "Stats", "normalize"]


class ServerBusy(EngineError):
    status_code = 503

    def __init__(self) -> None:
        super().__init__("server busy, please try again.  maximum pending requests exceeded",
                         "raise serve.max_queue or retry later")


def _close(llama: Any) -> None:
    with contextlib.suppress(Exception):
        llama.close()


@dataclass
class Runner:
    """One loaded model."""

    name: str
    manifest: Manifest
    num_ctx: int
    num_thread: int
    batcher: Batcher
    size: int
    load_duration: int
    active: int = 0
    last_used: float = field(default_factory=time.monotonic)
    keep_alive: float = FOREVER
    """Seconds to stay loaded once idle: the keep_alive of the latest request (Ollama's session duration), or 0
    after an unload request that found the model busy."""
    expires_at: float = FOREVER
    """Wall-clock seconds (time.time) when this idle model unloads."""
    embedder: Any = None
    embed_lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def digest(self) -> str:
        return self.manifest.model


@dataclass
class Lease:
    runner: Runner
    load_duration: int
    busy: asyncio.Future[Any] | None = None
    """Done when the decode thread (or the embedding thread) has finished with this request."""
    released: bool = False


def _resolve(future: asyncio.Future[Any]) -> None:
    if not future.done():
        future.set_result(None)


def _from_thread(loop: asyncio.AbstractEventLoop, callback: Any, *args: Any) -> None:
    """Run `callback` on the event loop, from the decode thread; nothing to do once the loop has closed."""
    with contextlib.suppress(RuntimeError):
        loop.call_soon_threadsafe(callback, *args)


class Engine:
    """Loads, schedules and unloads models; shared by every request of one server."""

    def __init__(self, store: Store, config: ServeConfig):
        self.store = store
        self.config = config
        self.runners: dict[str, Runner] = {}
        self.pending = 0
        self._cond: asyncio.Condition | None = None
        self._reaper: asyncio.Task[None] | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._cancels: set[threading.Event] = set()
        """The cancel flags of running generations, so shutdown can stop them."""
        self.served: collections.Counter[str] = collections.Counter()
        """How the generations that reached the model ended, by done_reason (stop, length, cancel). A request
        dropped while it waited for a slot never reaches it and is not counted (the tests count on that)."""

    @property
    def cond(self) -> asyncio.Condition:
        if self._cond is None:
            self._cond = asyncio.Condition()
        return self._cond

    # ------------------------------------------------------------------ lifecycle
    async def start(self) -> None:
        self._reaper = asyncio.create_task(self._reap_expired())

    async def stop(self) -> None:
        if self._reaper:
            self._reaper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._reaper
        # Stop running generations and wait for them to leave the batch before freeing the models under them.
        for cancel in list(self._cancels):
            cancel.set()
        for runner in self.runners.values():
            runner.batcher.wake()
        deadline = time.monotonic() + 30
        while any(r.active for r in self.runners.values()) and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        async with self.cond:
            for runner in list(self.runners.values()):
                await self._unload(runner)

    async def _reap_expired(self) -> None:
        while True:
            await asyncio.sleep(0.5)
            async with self.cond:
                now = time.time()
                for runner in list(self.runners.values()):
                    if runner.active == 0 and runner.expires_at <= now:
                        await self._unload(runner)
                self.cond.notify_all()

    async def _unload(self, runner: Runner) -> None:
        """Drop a runner; the caller holds the condition's lock."""
        self.runners.pop(runner.name, None)

        def close() -> None:
            runner.batcher.close()
            if runner.embedder is not None:
                _close(runner.embedder)

        await asyncio.to_thread(close)
        log.info("unloaded %s", runner.name)

    async def unload(self, name: str) -> bool:
        """Unload `name` now if it is idle (keep_alive 0); a busy model unloads when its last request ends."""
        async with self.cond:
            runner = self.runners.get(name)
            if runner is None:
                return False
            if runner.active:
                runner.keep_alive = 0.0
                return False
            await self._unload(runner)
            self.cond.notify_all()
            return True

    def expires_at(self, runner: Runner) -> float:
        """When `runner` unloads if nothing else happens: a busy one stays until its requests end, then
        keep_alive longer (FOREVER for a negative keep_alive)."""
        if runner.active:
            return time.time() + runner.keep_alive
        return runner.expires_at

    # ------------------------------------------------------------------ scheduling
    async def acquire(self, name: str, manifest: Manifest, opts: Options, keep_alive: float) -> Lease:
        """A loaded model for one request; give it back with `finish` (or `release`).

        The request's keep_alive becomes the model's, as Ollama sets the session duration when a request starts.
        """
        if self.pending >= self.config.max_queue:
            raise ServerBusy()
        self.pending += 1
        try:
            runner, load_duration = await self._runner(name, manifest, opts)
        except BaseException:
            self.pending -= 1
            raise
        runner.keep_alive = keep_alive
        return Lease(runner, load_duration)

    def release(self, lease: Lease) -> None:
        """Give the lease back once the decode thread has finished with its request.

        Synchronous on purpose: it runs in `finally` blocks of cancelled tasks, where anyio cancels every
        await again, so awaiting there would return early and count a request as gone while it still decodes.
        """
        if lease.released:
            return
        lease.released = True
        busy = lease.busy
        if busy is not None and not busy.done():
            busy.add_done_callback(lambda _: self._finish(lease.runner))
        else:
            self._finish(lease.runner)

    async def finish(self, lease: Lease) -> None:
        """Release a completed request and apply its keep_alive (unloading for 0) before the caller answers:
        a client that has its answer must find the server in its new state (/api/ps, keep_alive 0)."""
        if lease.released:
            return
        if lease.busy is not None:
            await asyncio.shield(lease.busy)
        lease.released = True
        await asyncio.shield(self._finish(lease.runner))

    def _finish(self, runner: Runner) -> asyncio.Task[None]:
        # No await in here: the bookkeeping is atomic on the event loop.
        self.pending -= 1
        runner.active -= 1
        runner.last_used = time.monotonic()
        if runner.active == 0:
            runner.expires_at = time.time() + runner.keep_alive if runner.keep_alive != FOREVER else FOREVER
        task = asyncio.get_running_loop().create_task(self._after_release(runner))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    async def _after_release(self, runner: Runner) -> None:
        async with self.cond:
            if runner.active == 0 and runner.expires_at <= time.time() and self.runners.get(runner.name) is runner:
                await self._unload(runner)
            self.cond.notify_all()

    async def _runner(self, name: str, manifest: Manifest, opts: Options) -> tuple[Runner, int]:
        threads = opts.num_thread or default_threads()
        async with self.cond:
            while True:
                runner = self.runners.get(name)
                if runner is not None and runner.digest == manifest.model and runner.num_ctx == opts.num_ctx \
                        and runner.num_thread == threads and runner.manifest.adapters == manifest.adapters \
                        and runner.batcher.alive:
                    runner.active += 1
                    return runner, 0
                if runner is not None:
                    # Loaded with other settings (num_ctx, num_thread, or the name now points at another blob),
                    # or its decode thread failed: reload when idle.
                    if runner.active == 0:
                        await self._unload(runner)
                    else:
                        await self.cond.wait()
                    continue
                if len(self.runners) >= self.config.max_loaded:
                    idle = [r for r in self.runners.values() if r.active == 0]
                    if idle:
                        await self._unload(min(idle, key=lambda r: r.last_used))
                    else:
                        await self.cond.wait()
                    continue
                runner = await self._load(name, manifest, opts.num_ctx, threads)
                self.runners[name] = runner
                runner.active += 1
                return runner, runner.load_duration

    async def _load(self, name: str, manifest: Manifest, num_ctx: int, threads: int) -> Runner:
        path = self.store.blob_path(manifest.model)
        lora = self.store.blob_path(manifest.adapters[0]) if manifest.adapters else None
        started = time.perf_counter_ns()
        batcher = await asyncio.to_thread(Batcher, path, num_ctx=num_ctx, parallel=self.config.parallel,
                                          n_threads=threads, lora_path=lora)
        size = sum(self.store.blob_path(d).stat().st_size for d in manifest.blobs())
        log.info("loaded %s (num_ctx %d, %d parallel sequences, %d threads)", name, num_ctx, self.config.parallel,
                 threads)
        return Runner(name, manifest, num_ctx, threads, batcher, size, time.perf_counter_ns() - started)

    # ------------------------------------------------------------------ work
    def detokenize(self, lease: Lease, tokens: list[int]) -> str:
        """The text of token ids a client sent (generate's `context`), each checked against the vocabulary
        first: llama.cpp aborts the whole process on an id outside it."""
        n_vocab = lease.runner.batcher.n_vocab
        bad = next((t for t in tokens if not (isinstance(t, int) and 0 <= t < n_vocab)), None)
        if bad is not None:
            raise BadRequest(f"invalid context: token id {bad} is outside the model's vocabulary (0 to {n_vocab - 1})",
                             "send back the context of this model's own earlier answer")
        return lease.runner.batcher.detokenize(tokens)

    async def stream(self, lease: Lease, prompt: str, opts: Options, grammar: Any = None,
                     cancel: threading.Event | None = None,
                     top_logprobs: int | None = None) -> AsyncIterator[Piece | Stats]:
        """Generate from `prompt`: Pieces of text, then one Stats. Setting `cancel` stops within one token.

        `top_logprobs` None asks for no log probabilities; 0-20 for each token's, with that many alternatives.
        """
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[Any] = asyncio.Queue()
        cancel = cancel or threading.Event()
        batcher = lease.runner.batcher
        if top_logprobs is not None and not 0 <= top_logprobs <= MAX_TOP_LOGPROBS:
            raise BadRequest(f"top_logprobs must be between 0 and {MAX_TOP_LOGPROBS}")
        # A short prompt tokenizes in less time than a hop to a worker thread takes.
        tokens = await asyncio.to_thread(_long_prompt, batcher, prompt) if len(prompt) > token_count.LONG \
            else batcher.tokenize(prompt)
        if not tokens:
            # Nothing to start from (an empty prompt on a model without BOS): the decode loop would hold the
            # slot forever waiting for a first token.
            raise BadRequest("the prompt is empty after the template: there is nothing to generate from",
                             "send a prompt, or a template that writes it")
        limit = opts.num_predict if opts.num_predict >= 0 else batcher.n_ctx
        if limit == 0 and len(tokens) < batcher.n_ctx:
            yield Stats(done_reason="length", load_duration=lease.load_duration, prompt_eval_count=len(tokens),
                        tokens=tokens)
            return
        busy = loop.create_future()

        def deliver(item: Any) -> None:  # on the event loop
            if isinstance(item, Stats) and seq.admitted:
                self.served[item.done_reason] += 1
            queue.put_nowait(item)

        seq = Sequence(tokens, opts, batcher.sampler(opts, grammar), lambda item: _from_thread(loop, deliver, item),
                       cancel, top_logprobs, limit, batcher.n_ctx, on_done=lambda: _from_thread(loop, _resolve, busy))
        batcher.submit(seq)
        lease.busy = busy
        self._cancels.add(cancel)
        busy.add_done_callback(lambda _: self._cancels.discard(cancel))
        try:
            while True:
                item = await queue.get()
                if isinstance(item, BaseException):
                    raise item
                if isinstance(item, Stats):
                    item.load_duration = lease.load_duration
                    yield item
                    return
                yield item
        finally:
            # The client left (or the consumer failed): the decode thread drops the request at its next step.
            cancel.set()
            batcher.wake()

    async def embed(self, lease: Lease, inputs: list[str], truncate: bool) -> tuple[list[list[float]], int]:
        """One L2-normalised vector per input, and the number of tokens read."""
        runner = lease.runner
        store = self.store

        def work() -> tuple[list[list[float]], int]:
            # A thread lock, not an asyncio one: it must hold until the thread is done, even if the request
            # is cancelled meanwhile.
            with runner.embed_lock:
                if runner.embedder is None:
                    lora = store.blob_path(runner.manifest.adapters[0]) if runner.manifest.adapters else None
                    runner.embedder = open_llama(store.blob_path(runner.manifest.model), n_ctx=runner.num_ctx,
                                                 n_threads=runner.num_thread, lora_path=lora, embedding=True)
                return _embed(runner.embedder, inputs, truncate)

        worker = asyncio.get_running_loop().run_in_executor(None, work)
        lease.busy = worker  # release waits for the thread, and so does unloading
        return await asyncio.shield(worker)


def _long_prompt(batcher: Batcher, prompt: str) -> list[int]:
    """A long prompt's tokens, in a worker thread (ctypes lets go of the GIL: the event loop goes on serving
    other clients); one far longer than the context is refused once its first pieces show it, before llama.cpp
    tokenizes all of it (seconds and 20-100 times its size in memory for megabytes)."""
    limit = 2 * batcher.n_ctx
    counted, _ = token_count.count_tokens(lambda piece: len(batcher.tokenize(piece)), prompt, limit)
    if counted > limit:
        raise BadRequest(f"the prompt is more than {counted} tokens, more than the context length "
                         f"(num_ctx {batcher.n_ctx})", "shorten the prompt or raise num_ctx")
    return batcher.tokenize(prompt)


def _embed(llama: Any, inputs: list[str], truncate: bool) -> tuple[list[list[float]], int]:
    vectors: list[list[float]] = []
    count = 0
    for text in inputs:
        if len(text) > token_count.LONG:  # as _long_prompt: what lies past twice the context is never tokenized
            limit = 2 * llama.n_ctx()
            counted, counted_chars = token_count.count_tokens(
                lambda piece: len(llama.tokenize(piece.encode("utf-8"), add_bos=False, special=True)), text, limit)
            if counted > limit and not truncate:
                raise BadRequest("the input length exceeds the context length", "shorten it or set truncate true")
            text = text[:counted_chars]
        tokens = llama.tokenize(text.encode("utf-8"), add_bos=True, special=True)
        if len(tokens) > llama.n_ctx() and not truncate:
            raise BadRequest("the input length exceeds the context length", "shorten it or set truncate true")
        count += min(len(tokens), llama.n_ctx())
        vector = llama.embed(text, normalize=False, truncate=True)
        if vector and isinstance(vector[0], list):  # per-token vectors: mean-pool them
            vector = [sum(col) / len(vector) for col in zip(*vector, strict=True)]
        vectors.append(normalize(vector))
    return vectors, count


def normalize(vector: list[float]) -> list[float]:
    norm = math.sqrt(sum(x * x for x in vector))
    return [x / norm for x in vector] if norm else list(vector)
