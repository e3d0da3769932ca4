"""Go's `text/template` language, the subset Ollama's Modelfile TEMPLATEs use: lexer, parser and executor.

`render(template, values)` executes a template the way Go's text/template does (with `missingkey=zero`);
`parse` and `identifiers` give its syntax tree and the names it mentions (Ollama's `Template.Vars`).
Ollama's prompt assembly on top of it (messages -> prompt) is `prompt.py`.
"""

from __future__ import annotations

import datetime
import json
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from tunesmith.errors import TunesmithError


class TemplateError(TunesmithError):
    """A TEMPLATE does not parse or fails while executing."""


# ---------------------------------------------------------------------------------------- lexing

@dataclass
class _Tok:
    kind: str  # field var ident str num char dot ( ) | := = ,
    value: Any
    space_before: bool


_ACTION_RE = re.compile(r"\{\{(-\s)?")
_TOKEN_RE = re.compile(
    r"""(?P<space>\s+)
    |(?P<declare>:=)
    |(?P<punct>[=|(),])
    |(?P<str>"(?:[^"\\\n]|\\.)*")
    |(?P<raw>`[^`]*`)
    |(?P<char>'(?:[^'\\]|\\.)+')
    |(?P<num>[+-]?(?:0[xX][0-9a-fA-F_]+|(?:\d[\d_]*)?\.?\d+(?:[eE][+-]?\d+)?))
    |(?P<field>\.[A-Za-z_][A-Za-z0-9_]*)
    |(?P<dot>\.)
    |(?P<var>\$[A-Za-z0-9_]*)
    |(?P<ident>[A-Za-z_][A-Za-z0-9_]*)""",
    re.VERBOSE,
)
_ESCAPES = {"n": "\n", "t": "\t", "r": "\r", "\\": "\\", '"': '"', "'": "'", "a": "\a", "b": "\b",
            "f": "\f", "v": "\v", "0": "\0"}


def _unquote(body: str) -> str:
    """Go string-literal escapes (the common ones: \\n \\t \\" \\\\ \\xNN \\uNNNN \\UNNNNNNNN)."""
    out, i = [], 0
    while i < len(body):
        ch = body[i]
        if ch != "\\":
            out.append(ch)
            i += 1
            continue
        nxt = body[i + 1]
        if nxt in "xuU":
            width = {"x": 2, "u": 4, "U": 8}[nxt]
            out.append(chr(int(body[i + 2:i + 2 + width], 16)))
            i += 2 + width
        else:
            out.append(_ESCAPES.get(nxt, nxt))
            i += 2
    return "".join(out)


def _lex_action(text: str, where: int) -> list[_Tok]:
    tokens: list[_Tok] = []
    pos, space = 0, True
    while pos < len(text):
        m = _TOKEN_RE.match(text, pos)
        if not m:
            raise TemplateError(f"template: unexpected {text[pos]!r} in action at offset {where + pos}")
        kind = m.lastgroup
        raw = m.group()
        pos = m.end()
        if kind == "space":
            space = True
            continue
        if kind == "declare" or kind == "punct":
            tokens.append(_Tok(raw, raw, space))
        elif kind == "str":
            tokens.append(_Tok("str", _unquote(raw[1:-1]), space))
        elif kind == "raw":
            tokens.append(_Tok("str", raw[1:-1], space))
        elif kind == "char":
            tokens.append(_Tok("num", ord(_unquote(raw[1:-1])), space))
        elif kind == "num":
            clean = raw.replace("_", "")
            try:
                value: Any = int(clean, 0)
            except ValueError:
                value = float(clean)
            tokens.append(_Tok("num", value, space))
        elif kind == "field":
            tokens.append(_Tok("field", raw[1:], space))
        else:
            tokens.append(_Tok(kind or "", raw, space))
        space = False
    return tokens


def _scan(source: str) -> Iterator[tuple[str, Any]]:
    """Yield ("text", str) and ("action", [tokens]) items, applying `{{-` / `-}}` trimming."""
    pos = 0
    trim_next = False
    while True:
        m = _ACTION_RE.search(source, pos)
        text = source[pos:m.start()] if m else source[pos:]
        if trim_next:
            text = text.lstrip(" \t\r\n")
        if m and m.group(1):
            text = text.rstrip(" \t\r\n")
        if text:
            yield "text", text
        if not m:
            return
        start = m.end()
        if source.startswith("/*", start):
            end_comment = source.find("*/", start)
            if end_comment < 0:
                raise TemplateError("template: unclosed comment")
            close = end_comment + 2
            rest = source[close:]
            trim_next = bool(re.match(r"\s-\}\}", rest))
            close_at = source.find("}}", close)
            if close_at < 0:
                raise TemplateError("template: unclosed action")
            pos = close_at + 2
            continue
        end = _find_close(source, start)
        body = source[start:end]
        trim_next = False
        if re.search(r"\s-$", body):
            trim_next = True
            body = body[:-1]
        pos = end + 2
        yield "action", _lex_action(body, start)


def _find_close(source: str, start: int) -> int:
    """The `}}` that ends the action at `start`, skipping quoted strings that may contain `}}`."""
    i = start
    while i < len(source):
        ch = source[i]
        if ch in "\"`'":
            j = i + 1
            while j < len(source) and source[j] != ch:
                j += 2 if source[j] == "\\" and ch != "`" else 1
            i = j + 1
            continue
        if source.startswith("}}", i):
            return i
        i += 1
    raise TemplateError("template: unclosed action")


# ---------------------------------------------------------------------------------------- nodes

@dataclass
class Text:
    text: str


@dataclass
class Field:
    idents: list[str]


@dataclass
class Variable:
    name: str
    idents: list[str] = field(default_factory=list)


@dataclass
class Dot:
    pass


@dataclass
class Literal:
    value: Any


@dataclass
class Ident:
    name: str


@dataclass
class Chain:
    node: Any
    idents: list[str]


@dataclass
class Command:
    args: list[Any]


@dataclass
class Pipe:
    decl: list[str]
    assign: bool
    cmds: list[Command]


@dataclass
class Action:
    pipe: Pipe


@dataclass
class Branch:
    kind: str  # if | range | with
    pipe: Pipe
    body: list[Any]
    else_body: list[Any] | None


@dataclass
class Break:
    pass


@dataclass
class Continue:
    pass


# ---------------------------------------------------------------------------------------- parsing

class _Parser:
    def __init__(self, source: str):
        self.items = list(_scan(source))
        self.pos = 0

    def parse(self) -> list[Any]:
        nodes, stop = self.parse_list(set())
        if stop is not None:
            raise TemplateError(f"template: unexpected {{{{{stop}}}}}")
        return nodes

    def parse_list(self, stops: set[str]) -> tuple[list[Any], str | None]:
        """Nodes up to one of `stops` (`end`, `else`); the stop action's remaining tokens stay in self.rest."""
        nodes: list[Any] = []
        while self.pos < len(self.items):
            kind, value = self.items[self.pos]
            self.pos += 1
            if kind == "text":
                nodes.append(Text(value))
                continue
            tokens: list[_Tok] = value
            if not tokens:
                raise TemplateError("template: missing value for command")
            head = tokens[0]
            word = head.value if head.kind == "ident" else None
            if word in ("end", "else"):
                if word not in stops:
                    raise TemplateError(f"template: unexpected {{{{{word}}}}}")
                self.rest = tokens[1:]
                return nodes, word
            if word in ("if", "range", "with"):
                nodes.append(self.parse_branch(word, tokens[1:]))
            elif word == "break":
                nodes.append(Break())
            elif word == "continue":
                nodes.append(Continue())
            elif word in ("define", "template", "block"):
                raise TemplateError(f"template: {{{{{word}}}}} is not supported")
            else:
                nodes.append(Action(self.parse_pipe(tokens)))
        if stops:
            raise TemplateError("template: unexpected EOF (missing {{end}})")
        return nodes, None

    def parse_branch(self, kind: str, tokens: list[_Tok]) -> Branch:
        pipe = self.parse_pipe(tokens, allow_two=kind == "range")
        body, stop = self.parse_list({"end", "else"})
        else_body = None
        if stop == "else":
            rest = self.rest
            if rest and rest[0].kind == "ident" and rest[0].value in ("if", "with") and kind != "range":
                # `{{else if x}}` is `{{else}}{{if x}}...{{end}}` sharing the outer {{end}}.
                else_body = [self.parse_branch(rest[0].value, rest[1:])]
            else:
                else_body, _ = self.parse_list({"end"})
        return Branch(kind, pipe, body, else_body)

    def parse_pipe(self, tokens: list[_Tok], allow_two: bool = False) -> Pipe:
        decl: list[str] = []
        assign = False
        i = 0
        if len(tokens) >= 2 and tokens[0].kind == "var":
            if tokens[1].kind in (":=", "="):
                decl, assign, i = [tokens[0].value], tokens[1].kind == "=", 2
            elif allow_two and len(tokens) >= 4 and tokens[1].kind == "," and tokens[2].kind == "var" \
                    and tokens[3].kind in (":=", "="):
                decl, assign, i = [tokens[0].value, tokens[2].value], tokens[3].kind == "=", 4
        cmds, i = self.parse_cmds(tokens, i)
        if i != len(tokens):
            raise TemplateError(f"template: unexpected {tokens[i].value!r} in command")
        return Pipe(decl, assign, cmds)

    def parse_cmds(self, tokens: list[_Tok], i: int) -> tuple[list[Command], int]:
        cmds: list[Command] = []
        while True:
            args: list[Any] = []
            while i < len(tokens) and tokens[i].kind not in ("|", ")"):
                node, i = self.parse_operand(tokens, i)
                args.append(node)
            if not args:
                raise TemplateError("template: missing value for command")
            cmds.append(Command(args))
            if i < len(tokens) and tokens[i].kind == "|":
                i += 1
                continue
            return cmds, i

    def parse_operand(self, tokens: list[_Tok], i: int) -> tuple[Any, int]:
        tok = tokens[i]
        i += 1
        node: Any
        if tok.kind == "field":
            idents = [tok.value]
            while i < len(tokens) and tokens[i].kind == "field" and not tokens[i].space_before:
                idents.append(tokens[i].value)
                i += 1
            return Field(idents), i
        if tok.kind == "dot":
            node = Dot()
        elif tok.kind == "var":
            node = Variable(tok.value)
        elif tok.kind in ("str", "num"):
            node = Literal(tok.value)
        elif tok.kind == "ident":
            node = {"true": Literal(True), "false": Literal(False), "nil": Literal(None)}.get(
                tok.value, Ident(tok.value))
        elif tok.kind == "(":
            cmds, i = self.parse_cmds(tokens, i)
            if i >= len(tokens) or tokens[i].kind != ")":
                raise TemplateError("template: unclosed left paren")
            i += 1
            node = Pipe([], False, cmds)
        else:
            raise TemplateError(f"template: unexpected {tok.value!r} in operand")
        chain: list[str] = []
        while i < len(tokens) and tokens[i].kind == "field" and not tokens[i].space_before:
            chain.append(tokens[i].value)
            i += 1
        if chain:
            node = Variable(node.name, chain) if isinstance(node, Variable) else Chain(node, chain)
        return node, i


_PARSED: dict[str, list[Any]] = {}


def parse(source: str) -> list[Any]:
    """Parse a template into nodes (cached: servers render the same few templates over and over)."""
    nodes = _PARSED.get(source)
    if nodes is None:
        try:
            nodes = _Parser(source).parse()
        except RecursionError as exc:
            raise TemplateError("template: nested too deeply") from exc
        if len(_PARSED) > 256:
            _PARSED.clear()
        _PARSED[source] = nodes
    return nodes


# ---------------------------------------------------------------------------------------- values

def _lookup(value: Any, name: str) -> Any:
    """`.Name` on a value. Dict keys are tried as written, then lowerCamel and snake_case, so a template
    written for Ollama's Go structs (`.Role`, `.ToolCalls`) works on API-shaped dicts (`role`, `tool_calls`)."""
    if value is None:
        return None
    snake = re.sub(r"(?<!^)(?=[A-Z])", "_", name).lower()
    candidates = (name, name[:1].lower() + name[1:], snake)
    if isinstance(value, dict):
        for key in candidates:
            if key in value:
                return value[key]
        return None  # missingkey=zero
    for key in candidates:
        if hasattr(value, key):
            return getattr(value, key)
    raise TemplateError(f"template: can't evaluate field {name} in type {type(value).__name__}")


def truth(value: Any) -> bool:
    """Go template truth: false, 0, nil and empty strings/slices/maps are false."""
    if value is None:
        return False
    if isinstance(value, bool | int | float | str | list | tuple | dict):
        return bool(value)
    return True


def _go_json(value: Any) -> str:
    text = json.dumps(value, separators=(",", ":"), ensure_ascii=False, default=str)
    # Go's json.Marshal escapes HTML characters; keep byte-identical prompts.
    return text.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")


def to_text(value: Any) -> str:
    """How `{{ value }}` prints. nil prints as "" (Go prints "<no value>"; no template wants that)."""
    if value is None:
        return ""
    if isinstance(value, str):
        return value
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        if value.is_integer() and abs(value) < 1e21:
            return str(int(value))
        return repr(value).replace("e+0", "e+").replace("e-0", "e-")
    if isinstance(value, dict | list | tuple):
        # Ollama's Tools, ToolFunction and tool-call Arguments print as JSON through String() methods.
        return _go_json(value)
    return str(value)


def _length(value: Any) -> int:
    if isinstance(value, str):
        return len(value.encode("utf-8"))  # Go's len counts bytes
    if isinstance(value, list | tuple | dict):
        return len(value)
    raise TemplateError(f"template: error calling len: len of type {type(value).__name__}")


def _index(value: Any, *keys: Any) -> Any:
    for key in keys:
        if isinstance(value, dict):
            value = value.get(key)
        elif isinstance(value, list | tuple | str):
            if not isinstance(key, int) or not 0 <= key < len(value):
                raise TemplateError(f"template: error calling index: index out of range: {key}")
            value = value[key]
        elif value is None:
            raise TemplateError("template: error calling index: index of untyped nil")
        else:
            raise TemplateError(f"template: error calling index: can't index item of type {type(value).__name__}")
    return value


def _slice(value: Any, *bounds: int) -> Any:
    if len(bounds) > 3:
        raise TemplateError("template: error calling slice: too many slice indexes")
    is_str = isinstance(value, str)
    seq: Any = value.encode("utf-8") if is_str else value
    if not isinstance(seq, list | tuple | bytes):
        raise TemplateError(f"template: error calling slice: can't slice item of type {type(value).__name__}")
    lo = bounds[0] if bounds else 0
    hi = bounds[1] if len(bounds) > 1 else len(seq)
    if not 0 <= lo <= hi <= len(seq):
        raise TemplateError(f"template: error calling slice: index out of range: {lo}:{hi}")
    part = seq[lo:hi]
    return part.decode("utf-8", errors="replace") if is_str else list(part)


def _basic_eq(a: Any, b: Any) -> bool:
    if isinstance(a, bool) != isinstance(b, bool):
        return False
    return bool(a == b)


def _eq(first: Any, *others: Any) -> bool:
    if not others:
        raise TemplateError("template: error calling eq: missing argument for comparison")
    return any(_basic_eq(first, other) for other in others)


def _compare(name: str, op: Callable[[Any, Any], bool]) -> Callable[[Any, Any], bool]:
    def compare(a: Any, b: Any) -> bool:
        try:
            return op(a, b)
        except TypeError as exc:
            raise TemplateError(f"template: error calling {name}: incompatible types for comparison") from exc
    return compare


def _sprint(*args: Any) -> str:
    # fmt.Sprint adds a space between operands when neither is a string.
    out = ""
    for i, arg in enumerate(args):
        if i and not isinstance(arg, str) and not isinstance(args[i - 1], str):
            out += " "
        out += to_text(arg)
    return out


def _printf(fmt: str, *args: Any) -> str:
    values = iter(args)

    def one(m: re.Match[str]) -> str:
        verb = m.group(1)
        if verb == "%":
            return "%"
        value = next(values, None)
        if verb == "q":
            return json.dumps(to_text(value), ensure_ascii=False)
        if verb == "d" and isinstance(value, int | float):
            return str(int(value))
        return to_text(value)
    return re.sub(r"%[-+# 0-9.]*([a-zA-Z%])", one, fmt)


FUNCS: dict[str, Callable[..., Any]] = {
    "not": lambda v: not truth(v),
    "len": _length,
    "index": _index,
    "slice": _slice,
    "eq": _eq,
    "ne": lambda a, b: not _basic_eq(a, b),
    "lt": _compare("lt", lambda a, b: a < b),
    "le": _compare("le", lambda a, b: a <= b),
    "gt": _compare("gt", lambda a, b: a > b),
    "ge": _compare("ge", lambda a, b: a >= b),
    "print": _sprint,
    "println": lambda *a: " ".join(to_text(x) for x in a) + "\n",
    "printf": _printf,
    "json": _go_json,
    "currentDate": lambda: datetime.date.today().isoformat(),
    "html": lambda v: to_text(v).replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
    .replace('"', "&#34;").replace("'", "&#39;"),
}


# ---------------------------------------------------------------------------------------- execution

class _BreakLoop(Exception):
    pass


class _ContinueLoop(Exception):
    pass


MAX_STEPS = 1_000_000
"""Nodes and loop iterations one execution may run: a chat template takes tens per message, so this is room for
tens of thousands of messages, and a `{{ range 1000000000 }}` in a request's template stops in about a second."""
MAX_OUTPUT = 64 * 1024 * 1024
"""Characters one execution may write (the server refuses bodies above 64 MiB; a prompt is never larger)."""


class _State:
    def __init__(self, root: Any):
        self.out: list[str] = []
        self.vars: list[list[Any]] = [["$", root]]
        self.steps = 0
        self.size = 0

    def step(self) -> None:
        self.steps += 1
        if self.steps > MAX_STEPS:
            raise TemplateError(f"template: execution stopped after {MAX_STEPS} steps (a range too long?)")

    def write(self, text: str) -> None:
        self.size += len(text)
        if self.size > MAX_OUTPUT:
            raise TemplateError(f"template: execution stopped: output over {MAX_OUTPUT} characters")
        self.out.append(text)

    def set_var(self, name: str, value: Any) -> None:
        for slot in reversed(self.vars):
            if slot[0] == name:
                slot[1] = value
                return
        raise TemplateError(f"template: undefined variable: {name}")

    def get_var(self, name: str) -> Any:
        for slot in reversed(self.vars):
            if slot[0] == name:
                return slot[1]
        raise TemplateError(f"template: undefined variable: {name}")


def _walk(state: _State, nodes: list[Any], dot: Any) -> None:
    for node in nodes:
        state.step()
        if isinstance(node, Text):
            state.write(node.text)
        elif isinstance(node, Action):
            value = _eval_pipe(state, node.pipe, dot)
            if not node.pipe.decl:
                state.write(to_text(value))
        elif isinstance(node, Branch):
            _branch(state, node, dot)
        elif isinstance(node, Break):
            raise _BreakLoop
        elif isinstance(node, Continue):
            raise _ContinueLoop


def _scoped(state: _State, nodes: list[Any], dot: Any) -> None:
    mark = len(state.vars)
    try:
        _walk(state, nodes, dot)
    finally:
        del state.vars[mark:]


def _branch(state: _State, node: Branch, dot: Any) -> None:
    mark = len(state.vars)
    try:
        if node.kind == "range":
            _range(state, node, dot)
            return
        value = _eval_pipe(state, node.pipe, dot)
        if truth(value):
            _scoped(state, node.body, value if node.kind == "with" else dot)
        elif node.else_body is not None:
            _scoped(state, node.else_body, dot)
    finally:
        del state.vars[mark:]


def _range(state: _State, node: Branch, dot: Any) -> None:
    pipe = node.pipe
    value = _eval_pipe(state, Pipe([], False, pipe.cmds), dot)
    # Lazily: `range N` of a request's template must not build a list of N pairs first.
    pairs: Iterator[tuple[Any, Any]]
    if isinstance(value, dict):
        pairs, empty = ((k, value[k]) for k in sorted(value)), not value
    elif isinstance(value, list | tuple):
        pairs, empty = enumerate(value), not value
    elif isinstance(value, int) and not isinstance(value, bool):
        pairs, empty = ((i, i) for i in range(value)), value <= 0
    elif value is None:
        pairs, empty = iter(()), True
    else:
        raise TemplateError(f"template: range can't iterate over {to_text(value)}")
    if empty:
        if node.else_body is not None:
            _scoped(state, node.else_body, dot)
        return
    for key, elem in pairs:
        state.step()
        mark = len(state.vars)
        if len(pipe.decl) == 1:
            state.vars.append([pipe.decl[0], elem])
        elif len(pipe.decl) == 2:
            state.vars.append([pipe.decl[0], key])
            state.vars.append([pipe.decl[1], elem])
        try:
            _walk(state, node.body, elem)
        except _BreakLoop:
            break
        except _ContinueLoop:
            continue
        finally:
            del state.vars[mark:]


def _eval_pipe(state: _State, pipe: Pipe, dot: Any) -> Any:
    value: Any = _MISSING
    for cmd in pipe.cmds:
        value = _eval_cmd(state, cmd, dot, value)
    for name in pipe.decl:
        if pipe.assign:
            state.set_var(name, value)
        else:
            state.vars.append([name, value])
    return value


_MISSING = object()


def _eval_cmd(state: _State, cmd: Command, dot: Any, piped: Any) -> Any:
    head = cmd.args[0]
    if isinstance(head, Ident):
        name = head.name
        if name in ("and", "or"):
            # Short-circuit like Go 1.18+: return the first falsy (and) / truthy (or) operand, else the last.
            operands: list[Any] = list(cmd.args[1:])
            if piped is not _MISSING:
                operands.append(Literal(piped))
            if not operands:
                raise TemplateError(f"template: wrong number of args for {name}")
            result: Any = None
            for operand in operands:
                result = _eval_arg(state, operand, dot)
                if truth(result) != (name == "and"):
                    return result
            return result
        fn = FUNCS.get(name)
        if fn is None:
            raise TemplateError(f'template: function "{name}" not defined')
        args = [_eval_arg(state, a, dot) for a in cmd.args[1:]]
        if piped is not _MISSING:
            args.append(piped)
        try:
            return fn(*args)
        except TypeError as exc:
            raise TemplateError(f"template: wrong number of args for {name}") from exc
    if len(cmd.args) > 1 or piped is not _MISSING:
        raise TemplateError("template: can't give argument to non-function")
    return _eval_arg(state, head, dot)


def _eval_arg(state: _State, node: Any, dot: Any) -> Any:
    if isinstance(node, Field):
        value = dot
        for name in node.idents:
            value = _lookup(value, name)
        return value
    if isinstance(node, Variable):
        value = state.get_var(node.name)
        for name in node.idents:
            value = _lookup(value, name)
        return value
    if isinstance(node, Dot):
        return dot
    if isinstance(node, Literal):
        return node.value
    if isinstance(node, Pipe):
        return _eval_pipe(state, node, dot)
    if isinstance(node, Chain):
        value = _eval_arg(state, node.node, dot)
        for name in node.idents:
            value = _lookup(value, name)
        return value
    if isinstance(node, Ident):
        return _eval_cmd(state, Command([node]), dot, _MISSING)
    raise TemplateError(f"template: can't evaluate {node!r}")


def execute(nodes: list[Any], values: Any) -> str:
    state = _State(values)
    try:
        _walk(state, nodes, values)
    except (_BreakLoop, _ContinueLoop) as exc:
        raise TemplateError("template: {{break}} or {{continue}} outside {{range}}") from exc
    except RecursionError as exc:
        raise TemplateError("template: nested too deeply") from exc
    return "".join(state.out)


def render(template: str, values: dict[str, Any]) -> str:
    """Execute a Go text/template with `values` as dot, as Go does with `missingkey=zero`.

    Keys are the names templates use (`System`, `Messages`, ...); message dicts may use Ollama's
    JSON names (`role`, `content`, `tool_calls`), found by `.Role`, `.Content`, `.ToolCalls`.
    """
    return execute(parse(template), values)


# ---------------------------------------------------------------------------------------- names

def identifiers(nodes: list[Any]) -> set[str]:
    """Every field and variable name the template mentions, lower-cased (Ollama's `Template.Vars`)."""
    names: set[str] = set()

    def visit(node: Any) -> None:
        if isinstance(node, list):
            for child in node:
                visit(child)
        elif isinstance(node, Action):
            visit(node.pipe)
        elif isinstance(node, Branch):
            visit(node.pipe)
            visit(node.body)
            if node.else_body is not None:
                visit(node.else_body)
        elif isinstance(node, Pipe):
            for cmd in node.cmds:
                visit(cmd.args)
        elif isinstance(node, Field):
            names.update(n.lower() for n in node.idents)
        elif isinstance(node, Variable):
            names.add(node.name.lower())
            names.update(n.lower() for n in node.idents)
        elif isinstance(node, Chain):
            visit(node.node)
            names.update(n.lower() for n in node.idents)

    visit(nodes)
    return names
