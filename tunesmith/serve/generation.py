"""From a job to a stream of events: think and tool parsing, format grammars, and a started `Generation`.

Ollama's generate and chat handlers build a `Job` and start a `Generation`, which shapes its events (`Content`,
`Thinking`, `ToolCalls`, `Done`) into their wire chunks; the OpenAI routes translate those chunks again.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

from tunesmith.serve import gotemplate, thinking, tools
from tunesmith.serve.engine import MAX_TOP_LOGPROBS, BadRequest, Engine, Stats
from tunesmith.serve.options import Options
from tunesmith.serve.store import Manifest

DEFAULT_TEMPLATE = "{{ .Prompt }}"


@dataclass
class Content:
    text: str
    logprobs: list[dict[str, Any]] = field(default_factory=list)
    """Log probabilities of the tokens generated since the last event (when the request asked for them)."""


@dataclass
class Thinking:
    text: str
    logprobs: list[dict[str, Any]] = field(default_factory=list)


@dataclass
class ToolCalls:
    calls: list[dict[str, Any]]
    logprobs: list[dict[str, Any]] = field(default_factory=list)


@dataclass
class Done:
    stats: Stats
    logprobs: list[dict[str, Any]] = field(default_factory=list)


Event = Content | Thinking | ToolCalls | Done


def capabilities(manifest: Manifest) -> list[str]:
    """What a model can do, judged from its template as Ollama does."""
    template = manifest.template or DEFAULT_TEMPLATE
    names = gotemplate.identifiers(gotemplate.parse(template))
    caps = ["completion"]
    if "tools" in names:
        caps.append("tools")
    if "suffix" in names:
        caps.append("insert")
    if thinking.infer_tags(template):
        caps.append("thinking")
    return caps


def resolve_think(name: str, manifest: Manifest, think: Any) -> tuple[bool, bool]:
    """(think, is_think_set): a thinking model thinks unless told not to; others refuse `think: true`."""
    capable = "thinking" in capabilities(manifest)
    if think is None:
        return capable, False
    enabled = think is not False
    if enabled and not capable:
        raise BadRequest(f'"{name}" does not support thinking', "leave think unset for this model")
    return enabled, True


def grammar_for(fmt: Any) -> Any:
    """A llama.cpp grammar for `format`: "json", a JSON-schema object, or nothing."""
    if fmt in (None, ""):
        return None
    from llama_cpp.llama_grammar import JSON_GBNF, LlamaGrammar

    try:
        if fmt == "json":
            return LlamaGrammar.from_string(JSON_GBNF, verbose=False)
        if isinstance(fmt, dict):
            return LlamaGrammar.from_json_schema(json.dumps(fmt), verbose=False)
    except Exception as exc:  # llama.cpp's schema converter signals unsupported schemas with asserts
        raise BadRequest(f"invalid format: {exc}; expected \"json\" or a valid JSON Schema object") from exc
    raise BadRequest(f'invalid format: {json.dumps(fmt)}; expected "json" or a valid JSON Schema object')


def chat_messages(manifest: Manifest, messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Modelfile MESSAGEs, then the request's; the Modelfile SYSTEM first unless the chat brings one."""
    msgs = [dict(m) for m in manifest.messages] + [dict(m) for m in messages]
    for m in msgs:
        m["role"] = str(m.get("role", "")).lower()
        m.setdefault("content", "")
    if manifest.system and (not messages or messages[0].get("role") != "system"):
        msgs.insert(0, {"role": "system", "content": manifest.system})
    return msgs


@dataclass
class Job:
    name: str
    manifest: Manifest
    prompt: str
    opts: Options
    keep_alive: float
    grammar: Any = None
    think: bool = False
    tools: list[dict[str, Any]] | None = None
    context: list[int] | None = None
    top_logprobs: int | None = None
    """None: no log probabilities; else each token's, with this many alternatives (Ollama's logprobs/top_logprobs)."""
    cancel: threading.Event = field(default_factory=threading.Event)
    started: int = field(default_factory=time.perf_counter_ns)


def tool_names(tool_list: list[dict[str, Any]] | None) -> set[str] | None:
    if not tool_list:
        return None
    return {t.get("function", {}).get("name") for t in tool_list if isinstance(t, dict)}


def logprobs_request(logprobs: bool | None, top_logprobs: int | None) -> int | None:
    """Job.top_logprobs for a request's `logprobs`/`top_logprobs`, checked as Ollama checks them (0-20, even when
    logprobs is off; top_logprobs alone returns nothing, as there)."""
    top = top_logprobs or 0
    if not 0 <= top <= MAX_TOP_LOGPROBS:
        raise BadRequest(f"top_logprobs must be between 0 and {MAX_TOP_LOGPROBS}")
    return top if logprobs else None


async def run(engine: Engine, job: Job) -> AsyncIterator[Event]:
    """Acquire the model, generate, and turn text pieces into events; releases the model when done.

    The model is released before `Done` is yielded, so a client holding its final chunk finds the server
    already in its next state (what /api/ps reports, an unload with keep_alive 0).
    """
    lease = await engine.acquire(job.name, job.manifest, job.opts, job.keep_alive)
    try:
        prompt = job.prompt
        if job.context:
            # Older clients carry the conversation as tokens; Ollama detokenizes and prepends them.
            prompt = engine.detokenize(lease, job.context) + prompt
        # A template may open the thinking block itself (`...assistant\n<think>\n`); then output starts inside it.
        # (Its end only: stripping all of a prompt of megabytes copies it.)
        opened = prompt[-len(thinking.OPEN) - 256:].rstrip().endswith(thinking.OPEN)
        parser = thinking.ThinkingParser(started=opened) if job.think else None
        holding = bool(job.tools)
        held = ""
        # Log probabilities wait for the next event that carries text (the text of their tokens may be held).
        logprobs: list[dict[str, Any]] = []

        def take() -> list[dict[str, Any]]:
            nonlocal logprobs
            taken, logprobs = logprobs, []
            return taken

        async for item in engine.stream(lease, prompt, job.opts, job.grammar, job.cancel, job.top_logprobs):
            if isinstance(item, Stats):
                if parser is not None:
                    thought, text = parser.flush()
                    if thought:
                        yield Thinking(thought, take())
                    held += text if holding else ""
                    if text and not holding:
                        yield Content(text, take())
                if held:
                    calls = tools.parse_tool_calls(held, tool_names(job.tools))
                    yield ToolCalls(calls, take()) if calls else Content(held, take())
                item.total_duration = time.perf_counter_ns() - job.started
                await engine.finish(lease)
                yield Done(item, take())
                return
            logprobs.extend(item.logprobs)
            thought, text = parser.add(item.text) if parser is not None else ("", item.text)
            if thought:
                yield Thinking(thought, take())
            if not text:
                continue
            if holding:
                held += text
                if tools.may_be_tool_call(held):
                    continue
                holding, text, held = False, held, ""
            yield Content(text, take())
    finally:
        engine.release(lease)


C = TypeVar("C")
Disconnected = Callable[[], Awaitable[bool]]
"""Whether the client has gone (Starlette's `request.is_disconnected`)."""


def _watch(disconnected: Disconnected | None, cancel: threading.Event) -> asyncio.Task[None] | None:
    """A task that sets `cancel` when the client of a request goes away (None when nobody is watching)."""
    if disconnected is None:
        return None

    async def watch() -> None:
        while not cancel.is_set():
            if await disconnected():
                cancel.set()
                return
            await asyncio.sleep(0.2)

    return asyncio.create_task(watch())


class Generation(Generic[C]):
    """A generation that has started, its events shaped into one wire format's chunks by `shape`.

    `start` waits for the first event, so errors before any output still get a real status code, and a client
    that leaves while its request waits in the queue is noticed there and its turn skipped. `ready` wraps an
    answer that needed no generation (an empty prompt loads or unloads the model). Whoever streams the chunks
    closes it (`aclose`), which stops the generation and gives the model back.
    """

    def __init__(self, job: Job | None, shape: Callable[[Event], C], first: Any, events: AsyncIterator[Event] | None,
                 disconnected: Disconnected | None = None):
        self.job = job
        self.shape = shape
        self.first = first
        self.events = events
        self.disconnected = disconnected

    @classmethod
    async def start(cls, engine: Engine, job: Job, shape: Callable[[Event], C],
                    disconnected: Disconnected | None = None) -> Generation[C]:
        events = run(engine, job)
        watcher = _watch(disconnected, job.cancel)
        try:
            first = await anext(events)
        except BaseException:
            await events.aclose()
            raise
        finally:
            if watcher is not None:
                watcher.cancel()
        return cls(job, shape, first, events, disconnected)

    @classmethod
    def ready(cls, chunk: C) -> Generation[C]:
        return cls(None, lambda event: chunk, chunk, None)

    async def chunks(self) -> AsyncIterator[C]:
        if self.job is None or self.events is None:
            yield self.first
            return
        yield self.shape(self.first)
        async for event in self.events:
            yield self.shape(event)

    async def collect(self) -> list[C]:
        """Every chunk, for a client that asked for one answer (its leaving still stops the generation)."""
        watcher = _watch(self.disconnected, self.job.cancel) if self.job is not None else None
        try:
            return [chunk async for chunk in self.chunks()]
        finally:
            if watcher is not None:
                watcher.cancel()
            await self.aclose()

    async def aclose(self) -> None:
        if self.job is not None and self.events is not None:
            self.job.cancel.set()
            await self.events.aclose()
