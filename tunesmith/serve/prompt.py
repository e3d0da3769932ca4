"""Ollama's prompt assembly (`template.Execute`): a chat's messages, tools and think flags -> the prompt string.

Templates that use `.Messages` run once over the collated conversation; older ones run once per turn with
`.System`/`.Prompt`/`.Response`, the last turn cut right after `{{ .Response }}`. The template language itself
is `gotemplate.py`; the export stage renders through `build_prompt` too, to prove the Go template and the HF
Jinja template agree.
"""

from __future__ import annotations

import copy
from typing import Any

from tunesmith.serve.gotemplate import Action, Branch, Command, Field, Pipe, execute, identifiers, parse


def _with_response(nodes: list[Any]) -> list[Any]:
    # Ollama appends {{ .Response }} to templates that mention neither .Messages nor .Response.
    names = identifiers(nodes)
    if "messages" not in names and "response" not in names:
        return [*nodes, Action(Pipe([], False, [Command([Field(["Response"])])]))]
    return nodes


def _cut_after_response(nodes: list[Any]) -> list[Any]:
    """Drop every node after the first `.Response` field, as Ollama's `deleteNode` does for the last turn."""
    cut = False

    def hit(node: Any) -> bool:
        nonlocal cut
        if isinstance(node, Field) and "Response" in node.idents:
            cut = True
            return False
        return cut

    def walk(node: Any) -> Any:
        if hit(node):
            return None
        if isinstance(node, list):
            return [kept for child in node if (kept := walk(child)) is not None]
        if isinstance(node, Branch):
            node.body = walk(node.body)
            if node.else_body is not None:
                node.else_body = walk(node.else_body)
        elif isinstance(node, Action):
            pipe = walk(node.pipe)
            if pipe is None:
                return None
            node.pipe = pipe
        elif isinstance(node, Pipe):
            commands = []
            for cmd in node.cmds:
                args = [kept for a in cmd.args if (kept := walk(a)) is not None]
                if not args:
                    return None
                cmd.args = args
                commands.append(cmd)
            if not commands:
                return None
            node.cmds = commands
        return node

    return walk(copy.deepcopy(nodes))


def collate(messages: list[dict[str, Any]]) -> tuple[str, list[dict[str, Any]]]:
    """All system contents joined, and consecutive same-role messages merged (tool messages kept apart)."""
    system: list[str] = []
    collated: list[dict[str, Any]] = []
    for message in messages:
        role = message.get("role")
        if role == "system":
            system.append(message.get("content") or "")
        if collated and collated[-1].get("role") == role and role != "tool":
            collated[-1]["content"] = (collated[-1].get("content") or "") + "\n\n" + (message.get("content") or "")
        else:
            collated.append(dict(message))
    return "\n\n".join(system), collated


def build_prompt(template: str, messages: list[dict[str, Any]], *, tools: list[Any] | None = None,
                 think: bool = False, is_think_set: bool = False, prompt: str = "", suffix: str = "") -> str:
    """The prompt Ollama's `template.Execute` produces for these messages (or prompt + suffix).

    Templates that use `.Messages` run once over the collated conversation; older ones run once per
    turn with `.System`/`.Prompt`/`.Response`, and the last turn stops right after `{{ .Response }}` so
    the model continues from there.
    """
    nodes = _with_response(parse(template))
    think_values = {"Think": think, "IsThinkSet": is_think_set}
    if prompt and suffix:
        return execute(nodes, {"Prompt": prompt, "Suffix": suffix, "Response": "", **think_values})
    system, collated = collate(messages)
    if "messages" in identifiers(nodes) or "document" in identifiers(nodes):
        return execute(nodes, {"System": system, "Messages": collated, "Tools": tools or [], "Response": "",
                               **think_values})
    out: list[str] = []
    turn = {"System": "", "Prompt": "", "Response": ""}

    def flush() -> None:
        out.append(execute(nodes, {**turn, **think_values}))
        turn.update(System="", Prompt="", Response="")

    for message in collated:
        role, content = message.get("role"), message.get("content") or ""
        if role == "system":
            if turn["Prompt"] or turn["Response"]:
                flush()
            turn["System"] = content
        elif role == "user":
            if turn["Response"]:
                flush()
            turn["Prompt"] = content
        elif role == "assistant":
            turn["Response"] = content
    out.append(execute(_cut_after_response(nodes), {**turn, **think_values}))
    return "".join(out)
