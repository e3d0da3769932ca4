"""Find tool calls in model output: Hermes/Qwen `<tool_call>{…}</tool_call>` blocks or a bare JSON call.

`arguments` always comes back as an object, as Ollama sends it (the Python client rejects a string).
"""

from __future__ import annotations

import re
from typing import Any

from tunesmith.serve import strict_json

_BLOCK_RE = re.compile(r"<tool_call>\s*(.*?)\s*(?:</tool_call>|$)", re.DOTALL)


def may_be_tool_call(text: str) -> bool:
    """Whether output starting like this could still turn out to be a tool call (so hold it back)."""
    head = text.lstrip()
    return not head or head[0] in "{[" or "<tool_call>".startswith(head[:11]) or head.startswith("<tool_call>")


def _as_call(obj: Any) -> dict[str, Any] | None:
    if not isinstance(obj, dict):
        return None
    fn = obj.get("function") if isinstance(obj.get("function"), dict) else obj
    name = fn.get("name")
    args = fn.get("arguments", fn.get("parameters", {}))
    if isinstance(args, str):
        try:
            args = strict_json.loads(args)
        except strict_json.InvalidJSON:
            return None
    if not isinstance(name, str) or not isinstance(args, dict):
        return None
    return {"name": name, "arguments": args}


def parse_tool_calls(text: str, tool_names: set[str] | None = None) -> list[dict[str, Any]]:
    """The tool calls in `text` as Ollama's `{"function": {"index", "name", "arguments"}}`; [] if none."""
    candidates: list[Any] = []
    blocks = _BLOCK_RE.findall(text) if "<tool_call>" in text else [text.strip()]
    for block in blocks:
        try:
            parsed = strict_json.loads(block)
        except strict_json.InvalidJSON:
            continue
        candidates.extend(parsed if isinstance(parsed, list) else [parsed])
    calls = []
    for obj in candidates:
        call = _as_call(obj)
        if call is None or (tool_names is not None and call["name"] not in tool_names):
            continue
        calls.append({"function": {"index": len(calls), **call}})
    return calls
