"""Modelfiles: parse them as Ollama's `parser/` does, and write them back as text.

    FROM ./model.gguf
    TEMPLATE \"\"\"{{ .Prompt }}\"\"\"
    PARAMETER temperature 0
    PARAMETER stop <|im_end|>
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from tunesmith.errors import TunesmithError

INSTRUCTIONS = ("from", "adapter", "template", "system", "parameter", "message", "license", "renderer", "parser")
MESSAGE_ROLES = ("system", "user", "assistant")

# api.Options' fields by JSON name and type (Ollama v0.13 `api/types.go`); PARAMETER values are typed by these.
INT_OPTIONS = {"num_ctx", "num_batch", "num_gpu", "main_gpu", "num_thread", "num_keep", "seed", "num_predict",
               "top_k", "repeat_last_n"}
FLOAT_OPTIONS = {"top_p", "min_p", "typical_p", "temperature", "repeat_penalty", "presence_penalty",
                 "frequency_penalty"}
BOOL_OPTIONS = {"use_mmap", "numa"}
LIST_OPTIONS = {"stop"}
# Still accepted in old Modelfiles; Ollama's CLI warns and drops them.
DEPRECATED_OPTIONS = {"penalize_newline", "low_vram", "f16_kv", "logits_all", "vocab_only", "use_mlock",
                      "mirostat", "mirostat_tau", "mirostat_eta", "tfs_z"}


class ModelfileError(TunesmithError):
    """A Modelfile does not parse."""


@dataclass
class Modelfile:
    from_: str = ""
    adapters: list[str] = field(default_factory=list)
    template: str | None = None
    system: str | None = None
    parameters: dict[str, Any] = field(default_factory=dict)
    messages: list[dict[str, str]] = field(default_factory=list)
    license: list[str] = field(default_factory=list)
    renderer: str | None = None
    parser: str | None = None
    warnings: list[str] = field(default_factory=list)

    def to_text(self) -> str:
        """The Modelfile as text that `parse` (and Ollama) reads back to the same values."""
        lines = [f"FROM {self.from_}"]
        for adapter in self.adapters:
            lines.append(f"ADAPTER {adapter}")
        if self.template is not None:
            lines.append(f"TEMPLATE {quote(self.template)}")
        if self.system is not None:
            lines.append(f"SYSTEM {quote(self.system)}")
        for name, value in self.parameters.items():
            for item in value if isinstance(value, list) else [value]:
                lines.append(f"PARAMETER {name} {quote(format_value(item))}")
        for message in self.messages:
            lines.append(f"MESSAGE {message['role']} {quote(message.get('content', ''))}")
        for text in self.license:
            lines.append(f"LICENSE {quote(text)}")
        if self.renderer:
            lines.append(f"RENDERER {self.renderer}")
        if self.parser:
            lines.append(f"PARSER {self.parser}")
        return "\n".join(lines) + "\n"


def format_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def quote(value: str) -> str:
    """Bare when the value survives bare; `\"\"\"…\"\"\"` otherwise; `\"…\"` with escapes as a last resort."""
    if value and value == value.strip() and "\n" not in value and not value.startswith('"'):
        return value
    if '"""' not in value and not value.endswith('"'):
        return f'"""{value}"""'
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


def typed_parameter(name: str, raw: str) -> Any:
    """A PARAMETER value typed as Ollama's `api.FormatParams` types it."""
    try:
        if name in INT_OPTIONS:
            return int(raw)
        if name in FLOAT_OPTIONS:
            return float(raw)
    except ValueError:
        kind = "int" if name in INT_OPTIONS else "float"
        raise ModelfileError(f"invalid {kind} value [{raw}] for parameter {name!r}") from None
    if name in BOOL_OPTIONS:
        if raw.lower() not in ("true", "false"):
            raise ModelfileError(f"invalid bool value [{raw}] for parameter {name!r}")
        return raw.lower() == "true"
    if name in LIST_OPTIONS:
        return raw
    raise ModelfileError(f"unknown parameter '{name}'", "see the PARAMETER list in Ollama's Modelfile docs")


class _Reader:
    def __init__(self, text: str):
        self.text = text
        self.pos = 0
        self.line = 1

    def eof(self) -> bool:
        return self.pos >= len(self.text)

    def peek(self, n: int = 1) -> str:
        return self.text[self.pos:self.pos + n]

    def advance(self, n: int = 1) -> str:
        chunk = self.text[self.pos:self.pos + n]
        self.line += chunk.count("\n")
        self.pos += n
        return chunk

    def skip_spaces(self) -> None:
        while self.peek() in (" ", "\t"):
            self.advance()

    def word(self) -> str:
        """A run of non-space characters on this line."""
        start = self.pos
        while not self.eof() and self.peek() not in (" ", "\t", "\n", "\r"):
            self.advance()
        return self.text[start:self.pos]

    def value(self, what: str) -> str:
        """The rest of the instruction: a bare value to the end of the line, or a quoted one."""
        self.skip_spaces()
        if self.eof() or self.peek() in ("\n", "\r"):
            raise ModelfileError(f"(line {self.line}): unexpected EOF: {what} needs a value")
        if self.peek(3) == '"""':
            self.advance(3)
            end = self.text.find('"""', self.pos)
            if end < 0:
                raise ModelfileError(f"(line {self.line}): unexpected EOF: unterminated \"\"\"")
            value = self.advance(end - self.pos)
            self.advance(3)
            self._end_of_line()
            return value
        if self.peek() == '"':
            self.advance()
            out = []
            while True:
                if self.eof():
                    raise ModelfileError(f"(line {self.line}): unexpected EOF: unterminated \"")
                ch = self.advance()
                if ch == "\\" and self.peek() in ('"', "\\"):
                    out.append(self.advance())
                elif ch == '"':
                    break
                else:
                    out.append(ch)
            self._end_of_line()
            return "".join(out)
        start = self.pos
        while not self.eof() and self.peek() != "\n":
            self.advance()
        return self.text[start:self.pos].strip()

    def _end_of_line(self) -> None:
        self.skip_spaces()
        if self.peek() == "\r":
            self.advance()
        if not self.eof() and self.peek() != "\n":
            raise ModelfileError(f"(line {self.line}): unexpected text after closing quote")


def parse(text: str) -> Modelfile:
    """Parse Modelfile text. Instructions are case-insensitive; `#` starts a comment only at a line's start."""
    text = text.removeprefix("\ufeff")
    r = _Reader(text)
    mf = Modelfile()
    seen_from = False
    while not r.eof():
        r.skip_spaces()
        if r.peek() in ("\n", "\r"):
            r.advance()
            continue
        if r.peek() == "#":
            while not r.eof() and r.peek() != "\n":
                r.advance()
            continue
        line = r.line
        keyword = r.word().lower()
        if keyword not in INSTRUCTIONS:
            raise ModelfileError(
                f"(line {line}): command must be one of {', '.join(repr(i) for i in INSTRUCTIONS)}")
        if keyword == "parameter":
            r.skip_spaces()
            name = r.word()
            if not name:
                raise ModelfileError(f"(line {line}): unexpected EOF: PARAMETER needs a name and a value")
            raw = r.value(f"PARAMETER {name}")
            if name in DEPRECATED_OPTIONS:
                mf.warnings.append(f"parameter {name!r} is deprecated and ignored")
                continue
            value = typed_parameter(name, raw)
            if name in LIST_OPTIONS:
                mf.parameters.setdefault(name, []).append(value)
            else:
                mf.parameters[name] = value
        elif keyword == "message":
            r.skip_spaces()
            role = r.word()
            if role not in MESSAGE_ROLES:
                raise ModelfileError(f'(line {line}): message role must be one of "system", "user", or "assistant"')
            mf.messages.append({"role": role, "content": r.value(f"MESSAGE {role}")})
        else:
            value = r.value(keyword.upper())
            if keyword == "from":
                if seen_from:
                    raise ModelfileError(f"(line {line}): only one FROM is supported")
                seen_from, mf.from_ = True, value
            elif keyword == "adapter":
                mf.adapters.append(value)
            elif keyword == "license":
                mf.license.append(value)
            else:
                setattr(mf, keyword, value)
    if not seen_from:
        raise ModelfileError("no FROM line", "start the Modelfile with FROM ./model.gguf")
    return mf
