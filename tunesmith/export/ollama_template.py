"""The Ollama template for an exported run, and its Modelfile: a Go TEMPLATE that writes exactly what training's
chat template wrote.

The family (ChatML/Qwen/SmolLM, Llama 3, Mistral, Gemma) is recognised by its marker tokens in the
tokenizer's Jinja chat template; the few things that differ inside a family are read off renderings of
probe conversations through that Jinja template: the generation prompt (Qwen3's empty `<think>` block
with `enable_thinking=False`), a default system prompt (SmolLM2's), whether a BOS token is written, and
which user turn carries the system prompt (Mistral). `verify` then renders probe conversations both
ways, the way Ollama assembles a chat, and compares token ids, so a template that does not match is an
error at export time, not garbage at serving time.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tunesmith.atomic import write_text
from tunesmith.errors import TunesmithError
from tunesmith.serve.known_templates import FAMILIES
from tunesmith.serve.modelfile import Modelfile
from tunesmith.serve.prompt import build_prompt


class TemplateFamilyError(TunesmithError):
    """The chat template is of no family tunesmith can write as an Ollama template, or the result differs."""


_HINT = "set export.template to an Ollama Go template that writes the same prompt as the model's chat template"

_SYSTEM_TURN = {"first": "$first", "last": "(eq (len (slice $.Messages $i)) 1)"}

# Distinct words so each probe's pieces can be found in a rendering.
_U1, _A1, _U2, _S = "Ping-one", "Pong-one", "Ping-two", "Sys-prompt"


@dataclass
class OllamaTemplate:
    family: str
    template: str
    stop: list[str]
    default_system: str | None = None
    """The system prompt the chat template writes when a conversation has none (SmolLM2 has one)."""
    notes: list[str] = field(default_factory=list)


Render = Callable[[list[dict[str, str]], bool], str]


def jinja_renderer(tokenizer: Any, template_kwargs: dict[str, Any]) -> Render:
    """The tokenizer's chat template as training used it (`apply_chat_template`, text out)."""
    def render(messages: list[dict[str, str]], generation: bool) -> str:
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation,
                                             **template_kwargs)
    return render


def detect_family(chat_template: str | None) -> str:
    if not chat_template:
        raise TemplateFamilyError("the tokenizer has no chat template to derive the Modelfile TEMPLATE from", _HINT)
    for name, family in FAMILIES.items():
        if family.marker in chat_template:
            return name
    raise TemplateFamilyError(
        f"the tokenizer's chat template is of no family tunesmith knows ({', '.join(FAMILIES)}: none of the "
        f"markers {', '.join(f.marker for f in FAMILIES.values())} appears in it)", _HINT)


def derive(tokenizer: Any, template_kwargs: dict[str, Any], llama_adds_bos: bool) -> OllamaTemplate:
    """The Ollama TEMPLATE equivalent to the tokenizer's chat template rendered with `template_kwargs`.

    `llama_adds_bos`: whether llama.cpp puts a BOS token before the prompt itself (the GGUF's
    `tokenizer.ggml.add_bos_token`); then the template must not write one too (the double-BOS bug).
    """
    name = detect_family(getattr(tokenizer, "chat_template", None))
    family = FAMILIES[name]
    render = jinja_renderer(tokenizer, template_kwargs)
    user = [{"role": "user", "content": _U1}]
    without, with_generation = render(user, False), render(user, True)
    if not with_generation.startswith(without):
        raise TemplateFamilyError("the chat template's generation prompt is not an addition at the end of the "
                                  "conversation, so it cannot be written as an Ollama template", _HINT)
    generation = with_generation[len(without):]
    bos = tokenizer.bos_token or ""
    writes_bos = bool(bos) and without.startswith(bos) and not without.startswith(family.marker)
    notes = []
    if writes_bos and llama_adds_bos:
        notes.append(f"BOS {bos} is added by llama.cpp, so the TEMPLATE does not write it")
    elif not writes_bos and llama_adds_bos and bos:
        raise TemplateFamilyError(f"llama.cpp adds a BOS token ({bos}) that the chat template never writes, so "
                                  "served prompts would differ from training", _HINT)
    default_system = _default_system(name, without)
    system_block = ""
    if name == "llama3":
        preamble, always = _llama3_system(render)
        opening, closing = family.system_turn
        system_block = f"{opening}{preamble}{{{{ .System }}}}{closing}"
        if always:  # Llama 3.1/3.2 write the system turn (its date preamble) whether or not there is a system prompt
            default_system = None
            notes.append("the system turn and its preamble are written for every conversation, as the chat "
                         "template writes them")
        else:
            system_block = f"{{{{ if .System }}}}{system_block}{{{{ end }}}}"
    pieces = {
        "{BOS}": bos if writes_bos and not llama_adds_bos else "",
        "{GEN}": generation,
        "{SYSTEM_TURN}": _SYSTEM_TURN[_system_turn(render)] if name == "mistral" else "",
        "{SYSTEM_BLOCK}": system_block,
    }
    template = family.skeleton
    for key, value in pieces.items():
        template = template.replace(key, value)
    return OllamaTemplate(name, template, list(family.stop), default_system, notes)


def _llama3_system(render: Render) -> tuple[str, bool]:
    """(preamble, always) of a Llama 3 system turn: the text the template writes before the system prompt
    (3.1/3.2: "Cutting Knowledge Date: December 2023\nToday Date: ...\n\n"), and whether the turn is written
    when the conversation has no system prompt."""
    opening, closing = FAMILIES["llama3"].system_turn
    with_system = render([{"role": "system", "content": _S}, {"role": "user", "content": _U1}], False)
    start, at = with_system.find(opening), with_system.find(_S)
    if start < 0 or at < start:
        raise TemplateFamilyError("the Llama 3 chat template writes the system prompt outside a system turn", _HINT)
    preamble = with_system[start + len(opening):at]
    if "{{" in preamble or "}}" in preamble:
        raise TemplateFamilyError("the chat template's system preamble contains Go template delimiters", _HINT)
    without = render([{"role": "user", "content": _U1}], False)
    return preamble, f"{opening}{preamble}{closing}" in without


def _default_system(family: str, rendered: str) -> str | None:
    """The system text a template writes for a conversation without one (ChatML/Llama 3 system turns)."""
    opening = FAMILIES[family].system_turn
    if not opening or opening[0] not in rendered:
        return None
    start = rendered.index(opening[0]) + len(opening[0])
    return rendered[start:rendered.index(opening[1], start)]


def _system_turn(render: Render) -> str:
    """Whether the (Mistral) template puts the system prompt in the first or the last user turn."""
    text = render([{"role": "system", "content": _S}, {"role": "user", "content": _U1},
                   {"role": "assistant", "content": _A1}, {"role": "user", "content": _U2}], True)
    position = text.find(_S)
    if position < 0:
        raise TemplateFamilyError("the chat template drops the system prompt", _HINT)
    return "first" if position < text.find(_U1) else "last"


# --------------------------------------------------------------------------------------- proof

PROBES: list[list[dict[str, str]]] = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [{"role": "system", "content": "Answer in one word."}, {"role": "user", "content": "Capital of Peru?"}],
    [{"role": "user", "content": "Hi!"}, {"role": "assistant", "content": "Hello. How can I help?"},
     {"role": "user", "content": "Say 'ok'\nthen stop."}],
    [{"role": "system", "content": "Be terse.\nNo lists."}, {"role": "user", "content": "a"},
     {"role": "assistant", "content": "b"}, {"role": "user", "content": "c"},
     {"role": "assistant", "content": "d"}, {"role": "user", "content": "汉字 e"}],
]


def ollama_messages(messages: list[dict[str, str]], system: str | None) -> list[dict[str, str]]:
    """What Ollama's chat hands the template: the Modelfile SYSTEM first when the chat brings none."""
    if system and (not messages or messages[0]["role"] != "system"):
        return [{"role": "system", "content": system}, *messages]
    return list(messages)


def verify(template: str, system: str | None, render: Render, hf_ids: Callable[[str], list[int]],
           served_ids: Callable[[str], list[int]], conversations: list[list[dict[str, str]]] | None = None,
           training_system: str | None = None) -> None:
    """Raise TemplateFamilyError unless every conversation gives the same token ids both ways.

    Training side: the Jinja rendering (with `training_system` added as the data layer adds it) tokenized
    without added special tokens. Serving side: Ollama's assembly of the chat through `template` with
    `system` as the Modelfile SYSTEM, tokenized as the server tokenizes.
    """
    for messages in conversations or PROBES:
        trained = render(ollama_messages(messages, training_system), True)
        served = build_prompt(template, ollama_messages(messages, system))
        expected, got = hf_ids(trained), served_ids(served)
        if expected != got:
            at = next((i for i, (a, b) in enumerate(zip(expected, got)) if a != b), min(len(expected), len(got)))
            raise TemplateFamilyError(
                f"the Modelfile TEMPLATE and the training chat template give different tokens from token {at} on "
                f"(training ids {expected[at:at + 6]} of {trained[:160]!r}; Ollama ids {got[at:at + 6]} of "
                f"{served[:160]!r})", _HINT)


def write_modelfile(path: Path, from_: str, template: str, system: str | None, stop: list[str],
                    parameters: dict[str, Any], adapter: str | None = None) -> Path:
    """Write the Modelfile (atomically); `parameters` are the sampling defaults, stop tokens come after."""
    params = {key: value for key, value in parameters.items() if key != "stop"}
    params["stop"] = list(dict.fromkeys([*stop, *parameters.get("stop", [])]))
    modelfile = Modelfile(from_=from_, adapters=[adapter] if adapter else [], template=template, system=system,
                          parameters=params)
    write_text(path, modelfile.to_text())
    return path
