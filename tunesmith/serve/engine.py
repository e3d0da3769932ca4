"""The llama.cpp engine: loads store models into llama-cpp-python, schedules requests onto them, streams tokens.

One `Runner` per loaded model holds `serve.parallel` llama contexts (the weights are mmapped, so the
contexts share them). Requests wait for a free context; more than `serve.max_queue` pending requests
get ServerBusy (503) at once. At most `serve.max_loaded` models stay loaded; the least recently used
idle one unloads to make room, and an idle model unloads when its keep_alive expires.
Generation runs in a worker thread and stops within one token when the client goes away.
"""

from __future__ import annotations

import asyncio
import codecs
import contextlib
import logging
import math
import os
import random
import threading
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tunesmith.config import ServeConfig
from tunesmith.errors import TunesmithError
from tunesmith.serve.options import FOREVER, Options
from tunesmith.serve.store import Manifest, Store

log = logging.getLogger("tunesmith.serve")


class EngineError(TunesmithError):
    """A request the engine cannot serve as asked."""

    status_code = 500


class ServerBusy(EngineError):
    status_code = 503

    def __init__(self) -> None:
        super().__init__("server busy, please try again.  maximum pending requests exceeded",
                         "raise serve.max_queue or retry later")


class BadRequest(EngineError):
    status_code = 400


# llama.cpp's CPU "extra buffer types" (AMX and weight repacking) crash with a general protection fault
# inside some VMs whose CPUs report AMX (measured here: Firecracker, Sapphire Rapids). Off unless asked for.
EXTRA_BUFTS_ENV = "TUNESMITH_LLAMA_EXTRA_BUFTS"
_construct_lock = threading.Lock()


def open_llama(path: str | Path, *, n_ctx: int, n_threads: int | None = None, n_batch: int = 512,
               lora_path: str | Path | None = None, embedding: bool = False) -> Any:
    """A `llama_cpp.Llama` for a GGUF file, with the settings every tunesmith caller needs.

    n_threads None means half the cores, for generation and for prompt evaluation alike (llama-cpp-python
    gives prompt evaluation all cores): on 2 busy cores, 2 threads measured 2-3 tokens/s against 30-45
    with 1, and a 16-token prompt took 5 s instead of 0.2 s, because llama.cpp's threads spin-wait.
    """
    threads = n_threads or max(1, (os.cpu_count() or 2) // 2)
    import llama_cpp
    import llama_cpp.llama as llama_module

    kwargs: dict[str, Any] = {}
    if embedding:
        # Decoder models have no pooling of their own; mean pooling gives one vector per input.
        kwargs["pooling_type"] = llama_cpp.LLAMA_POOLING_TYPE_MEAN
    default_params = llama_module.llama_cpp.llama_model_default_params

    def params_without_extra_bufts() -> Any:
        params = default_params()
        params.use_extra_bufts = os.environ.get(EXTRA_BUFTS_ENV) == "1"
        return params

    # Llama() builds its model params from this module function; swap it only while constructing.
    with _construct_lock:
        llama_module.llama_cpp.llama_model_default_params = params_without_extra_bufts
        try:
            return llama_cpp.Llama(
                model_path=str(path), n_ctx=n_ctx, n_batch=min(n_batch, n_ctx), n_threads=threads,
                n_threads_batch=threads,
                lora_path=str(lora_path) if lora_path else None, embedding=embedding, verbose=False, **kwargs)
        except ValueError as exc:
            raise EngineError(f"llama.cpp could not load {path}: {exc}",
                              "check that the file is a GGUF model llama.cpp supports") from exc
        finally:
            llama_module.llama_cpp.llama_model_default_params = default_params


def _close(llama: Any) -> None:
    with contextlib.suppress(Exception):
        llama.close()


def is_eog(llama: Any, token: int) -> bool:
    import llama_cpp

    return bool(llama_cpp.llama_vocab_is_eog(llama_cpp.llama_model_get_vocab(llama.model), token))


@dataclass
class Stats:
    """The counts and integer-nanosecond durations of Ollama's final chunk."""

    done_reason: str = "stop"
    load_duration: int = 0
    prompt_eval_count: int = 0
    prompt_eval_duration: int = 0
    eval_count: int = 0
    eval_duration: int = 0
    total_duration: int = 0
    """From the request's arrival (queueing included) to its end, set by the caller."""
    tokens: list[int] = field(default_factory=list)
    """Prompt and generated tokens: generate's `context`."""


@dataclass
class Runner:
    """One loaded model."""

    name: str
    manifest: Manifest
    num_ctx: int
    contexts: list[Any]
    free: asyncio.Queue[Any]
    size: int
    load_duration: int
    active: int = 0
    last_used: float = field(default_factory=time.monotonic)
    expires_at: float = FOREVER
    """Wall-clock seconds (time.time) when this model unloads; FOREVER while in use."""
    embedder: Any = None
    embed_lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def digest(self) -> str:
        return self.manifest.model


@dataclass
class Lease:
    runner: Runner
    llama: Any
    load_duration: int
    worker: asyncio.Future[None] | None = None
    """The thread generating with `llama`, while there is one."""


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
        # Stop running generations and wait for their threads before freeing the models under them.
        for cancel in list(self._cancels):
            cancel.set()
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
        llamas = [*runner.contexts, *([runner.embedder] if runner.embedder else [])]
        await asyncio.to_thread(lambda: [_close(llama) for llama in llamas])
        log.info("unloaded %s", runner.name)

    async def unload(self, name: str) -> bool:
        """Unload `name` now if it is loaded and idle (keep_alive 0)."""
        async with self.cond:
            runner = self.runners.get(name)
            if runner is None or runner.active:
                if runner is not None:
                    runner.expires_at = 0.0  # unload as soon as its last request ends
                return False
            await self._unload(runner)
            self.cond.notify_all()
            return True

    # ------------------------------------------------------------------ scheduling
    async def acquire(self, name: str, manifest: Manifest, num_ctx: int, *, context: bool = True) -> Lease:
        """A loaded model and (if `context`) one of its free llama contexts; release it with `release`."""
        if self.pending >= self.config.max_queue:
            raise ServerBusy()
        self.pending += 1
        try:
            runner, load_duration = await self._runner(name, manifest, num_ctx)
        except BaseException:
            self.pending -= 1
            raise
        try:
            llama = await runner.free.get() if context else None
        except BaseException:
            self._finish(runner, None, None)
            raise
        return Lease(runner, llama, load_duration)

    def release(self, lease: Lease, keep_alive: float) -> None:
        """Give the lease back once its worker thread (if any) has stopped using the llama context.

        Synchronous on purpose: it runs in `finally` blocks of cancelled tasks, where anyio cancels every
        await again, so awaiting the worker there would return early and hand out a context still in use.
        """
        worker = lease.worker
        if worker is not None and not worker.done():
            worker.add_done_callback(lambda _: self._finish(lease.runner, lease.llama, keep_alive))
        else:
            self._finish(lease.runner, lease.llama, keep_alive)

    def _finish(self, runner: Runner, llama: Any, keep_alive: float | None) -> None:
        # No await in here: the bookkeeping is atomic on the event loop.
        if llama is not None:
            runner.free.put_nowait(llama)
        self.pending -= 1
        runner.active -= 1
        runner.last_used = time.monotonic()
        if keep_alive is not None:
            runner.expires_at = time.time() + keep_alive if keep_alive != FOREVER else FOREVER
        task = asyncio.get_running_loop().create_task(self._after_release(runner))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _after_release(self, runner: Runner) -> None:
        async with self.cond:
            if runner.active == 0 and runner.expires_at <= time.time() and self.runners.get(runner.name) is runner:
                await self._unload(runner)
            self.cond.notify_all()

    async def _runner(self, name: str, manifest: Manifest, num_ctx: int) -> tuple[Runner, int]:
        async with self.cond:
            while True:
                runner = self.runners.get(name)
                if runner is not None and runner.digest == manifest.model and runner.num_ctx == num_ctx \
                        and runner.manifest.adapters == manifest.adapters:
                    runner.active += 1
                    runner.expires_at = FOREVER
                    return runner, 0
                if runner is not None:
                    # Loaded with other settings (num_ctx, or the name now points at another blob): reload when idle.
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
                runner = await self._load(name, manifest, num_ctx)
                self.runners[name] = runner
                runner.active += 1
                return runner, runner.load_duration

    async def _load(self, name: str, manifest: Manifest, num_ctx: int) -> Runner:
        path = self.store.blob_path(manifest.model)
        lora = self.store.blob_path(manifest.adapters[0]) if manifest.adapters else None
        started = time.perf_counter_ns()

        def load_all() -> list[Any]:
            return [open_llama(path, n_ctx=num_ctx, lora_path=lora) for _ in range(self.config.parallel)]

        contexts = await asyncio.to_thread(load_all)
        free: asyncio.Queue[Any] = asyncio.Queue()
        for llama in contexts:
            free.put_nowait(llama)
        size = sum(self.store.blob_path(d).stat().st_size for d in manifest.blobs())
        log.info("loaded %s (num_ctx %d, %d contexts)", name, num_ctx, len(contexts))
        return Runner(name, manifest, num_ctx, contexts, free, size, time.perf_counter_ns() - started)

    # ------------------------------------------------------------------ work
    async def stream(self, lease: Lease, prompt: str, opts: Options, grammar: Any = None,
                     cancel: threading.Event | None = None) -> AsyncIterator[str | Stats]:
        """Generate from `prompt`: text pieces, then one Stats. Setting `cancel` stops within one token."""
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[Any] = asyncio.Queue()
        cancel = cancel or threading.Event()

        def emit(item: Any) -> None:
            loop.call_soon_threadsafe(queue.put_nowait, item)

        worker = loop.run_in_executor(None, _generate, lease.llama, prompt, opts, grammar, cancel, emit)
        lease.worker = worker
        self._cancels.add(cancel)
        worker.add_done_callback(lambda _: self._cancels.discard(cancel))
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
            # The client left (or the consumer failed): stop the worker; `release` waits for it to end.
            cancel.set()

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
                                                 lora_path=lora, embedding=True)
                return _embed(runner.embedder, inputs, truncate)

        worker = asyncio.get_running_loop().run_in_executor(None, work)
        lease.worker = worker  # release waits for the thread, and so does unloading
        return await asyncio.shield(worker)


def _embed(llama: Any, inputs: list[str], truncate: bool) -> tuple[list[list[float]], int]:
    vectors: list[list[float]] = []
    count = 0
    for text in inputs:
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


def _stop_hold(text: str, stops: list[str]) -> int:
    """How many trailing characters of `text` could be the start of a stop string (and must wait)."""
    hold = 0
    for stop in stops:
        for k in range(min(len(stop) - 1, len(text)), hold, -1):
            if text.endswith(stop[:k]):
                hold = k
                break
    return hold


def _generate(llama: Any, prompt: str, opts: Options, grammar: Any, cancel: threading.Event,
              emit: Callable[[Any], None]) -> None:
    """Worker thread: tokenize, evaluate, sample until a stop, emitting text pieces and then Stats."""
    try:
        started = time.perf_counter_ns()
        if cancel.is_set():  # the client left while this request waited for a context
            emit(Stats(done_reason="cancel"))
            return
        tokens = llama.tokenize(prompt.encode("utf-8"), add_bos=True, special=True)
        n_ctx = llama.n_ctx()
        if len(tokens) >= n_ctx:
            raise BadRequest(f"the prompt is {len(tokens)} tokens, more than the context length (num_ctx {n_ctx})",
                             "shorten the prompt or raise num_ctx")
        llama.set_seed(opts.seed if opts.seed >= 0 else random.randrange(2**31))
        limit = opts.num_predict if opts.num_predict >= 0 else n_ctx
        decoder = codecs.getincrementaldecoder("utf-8")("replace")
        stats = Stats(prompt_eval_count=len(tokens))
        generated: list[int] = []
        text = ""
        first_at = 0
        reason = "stop"
        if limit == 0:
            reason = "length"
        else:
            for token in llama.generate(
                    tokens, top_k=opts.top_k, top_p=opts.top_p, min_p=opts.min_p, typical_p=opts.typical_p,
                    temp=opts.temperature, repeat_penalty=opts.repeat_penalty,
                    frequency_penalty=opts.frequency_penalty, presence_penalty=opts.presence_penalty,
                    grammar=grammar, reset=True):
                if not first_at:
                    first_at = time.perf_counter_ns()
                if cancel.is_set():
                    reason = "cancel"
                    break
                if is_eog(llama, token):
                    break
                generated.append(token)
                text += decoder.decode(llama.detokenize([token], special=False))
                if opts.stop:
                    hits = [i for s in opts.stop if (i := text.find(s)) >= 0]
                    if hits:
                        text = text[:min(hits)]
                        break
                    hold = _stop_hold(text, opts.stop)
                else:
                    hold = 0
                if len(text) > hold:
                    emit(text[:len(text) - hold])
                    text = text[len(text) - hold:]
                if len(generated) >= limit or len(tokens) + len(generated) >= n_ctx:
                    reason = "length"
                    break
            else:
                reason = "stop"
        text += decoder.decode(b"", final=True)
        if text and reason != "cancel":
            emit(text)
        ended = time.perf_counter_ns()
        first_at = first_at or ended
        stats.done_reason = reason
        stats.prompt_eval_duration = first_at - started
        stats.eval_count = len(generated)
        stats.eval_duration = ended - first_at
        stats.tokens = [*tokens, *generated]
        emit(stats)
    except BaseException as exc:  # noqa: BLE001 - every failure must reach the waiting request
        emit(exc)
