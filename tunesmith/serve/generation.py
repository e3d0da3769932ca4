"""From an API request to a stream of events: prompt assembly, options, format grammar, think and tool parsing.

Ollama's and OpenAI's handlers both build a `Job` here and shape its events (`Content`, `Thinking`,
`ToolCalls`, `Done`) into their own wire format.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from tunesmith.serve import templates, thinking, tools
from tunesmith.serve.engine import BadRequest, Engine, Stats
from tunesmith.serve.options import Options
from tunesmith.serve.store import Manifest

DEFAULT_TEMPLATE = "{{ .Prompt }}"


@dataclass
class Content:
    text: str


@dataclass
class Thinking:
    text: str


@dataclass
class ToolCalls:
    calls: list[dict[str, Any]]


@dataclass
class Done:
    stats: Stats


Event = Content | Thinking | ToolCalls | Done


def capabilities(manifest: Manifest) -> list[str]:
    """What a model can do, judged from its template as Ollama does."""
    template = manifest.template or DEFAULT_TEMPLATE
    names = templates.identifiers(templates.parse(template))
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
    cancel: threading.Event = field(default_factory=threading.Event)
    started: int = field(default_factory=time.perf_counter_ns)


def tool_names(tool_list: list[dict[str, Any]] | None) -> set[str] | None:
    if not tool_list:
        return None
    return {t.get("function", {}).get("name") for t in tool_list if isinstance(t, dict)}


async def run(engine: Engine, job: Job) -> AsyncIterator[Event]:
    """Acquire the model, generate, and turn text pieces into events; releases the model when done."""
    lease = await engine.acquire(job.name, job.manifest, job.opts.num_ctx)
    try:
        prompt = job.prompt
        if job.context:
            # Older clients carry the conversation as tokens; Ollama detokenizes and prepends them.
            prefix = lease.llama.detokenize(job.context, special=True).decode("utf-8", errors="replace")
            prompt = prefix + prompt
        # A template may open the thinking block itself (`...assistant\n<think>\n`); then output starts inside it.
        opened = prompt.rstrip().endswith(thinking.OPEN)
        parser = thinking.ThinkingParser(started=opened) if job.think else None
        holding = bool(job.tools)
        held = ""
        async for item in engine.stream(lease, prompt, job.opts, job.grammar, job.cancel):
            if isinstance(item, Stats):
                if parser is not None:
                    thought, text = parser.flush()
                    if thought:
                        yield Thinking(thought)
                    held += text if holding else ""
                    if text and not holding:
                        yield Content(text)
                if held:
                    calls = tools.parse_tool_calls(held, tool_names(job.tools))
                    yield ToolCalls(calls) if calls else Content(held)
                item.total_duration = time.perf_counter_ns() - job.started
                yield Done(item)
                return
            thought, text = parser.add(item) if parser is not None else ("", item)
            if thought:
                yield Thinking(thought)
            if not text:
                continue
            if holding:
                held += text
                if tools.may_be_tool_call(held):
                    continue
                holding, text, held = False, held, ""
            yield Content(text)
    finally:
        engine.release(lease, job.keep_alive)
