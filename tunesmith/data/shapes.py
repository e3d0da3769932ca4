"""Record shapes: detect which one a record has and turn it into chat messages, checking every field.

Shapes (the names `data.format` takes):
  input_output       {"input", "output", "system"?}                  the reference article's pairs
  alpaca             {"instruction", "input"?, "output", "system"?}  user turn = instruction + blank line + input
  chat               {"messages": [{"role", "content"}, ...]}        roles system?, then user/assistant alternating
  sharegpt           {"conversations": [{"from", "value"}, ...]}     from: system, human/user, gpt/assistant
  prompt_completion  {"prompt", "completion", "system"?}
Other keys in a record (ids, tags) are ignored and listed by `tunesmith data inspect`.
`data.fields` maps a shape's field names to yours, e.g. {"input": "question", "output": "answer"}; for
messages it may also rename "role", "content", "from" and "value". Errors name your field, not ours.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from tunesmith.data.source import RecordError

Message = dict[str, str]

SHAPES: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    # name: (required keys, optional keys); detection tries them in this order.
    "chat": (("messages",), ()),
    "sharegpt": (("conversations",), ("system",)),
    "alpaca": (("instruction", "output"), ("input", "system")),
    "prompt_completion": (("prompt", "completion"), ("system",)),
    "input_output": (("input", "output"), ("system",)),
}
ROLES = ("system", "user", "assistant")
SHAREGPT_ROLES = {"system": "system", "human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant"}
_INNER = ("role", "content", "from", "value")


def detect_shape(record: dict[str, Any]) -> str | None:
    """The first shape whose required keys the record has (after `data.fields` renaming), or None."""
    for name, (required, _) in SHAPES.items():
        if all(key in record for key in required):
            return name
    return None


def describe_shapes() -> str:
    return "; ".join(f"{name}: {', '.join(required)}" for name, (required, _) in SHAPES.items())


def rename(record: dict[str, Any], fields: dict[str, str]) -> dict[str, Any]:
    """Give the record the shape's field names, as mapped by `data.fields` ({shape name: your name})."""
    if not fields:
        return record
    renamed = dict(record)
    for ours, theirs in fields.items():
        if ours in _INNER:
            continue
        if theirs in record and ours != theirs:
            renamed[ours] = renamed.pop(theirs)
    return renamed


def extra_keys(shape: str, record: dict[str, Any]) -> list[str]:
    required, optional = SHAPES[shape]
    return [key for key in record if key not in required and key not in optional]


def to_messages(shape: str, record: dict[str, Any], fields: dict[str, str] | None = None) -> list[Message]:
    """Check the record as `shape` and return its turns; raise RecordError naming the bad field."""
    fields = fields or {}

    def name(key: str) -> str:
        return fields.get(key, key)

    required, _ = SHAPES[shape]
    for key in required:
        if key not in record:
            present = ", ".join(repr(k) for k in record) or "none"
            raise RecordError(name(key), f"missing field (the {shape} shape needs {', '.join(map(name, required))}; "
                                         f"the record has {present})")
    if shape in ("chat", "sharegpt"):
        messages = _turns(shape, record, fields, name)
        if shape == "sharegpt":
            system = _optional_text(record, "system", name)
            if system is not None:
                if messages[0]["role"] == "system":
                    raise RecordError(name("system"), "given both as a field and as the first turn")
                messages.insert(0, {"role": "system", "content": system})
        return messages
    if shape == "alpaca":
        instruction = _text(record, "instruction", name, "empty instruction")
        extra = _optional_text(record, "input", name)
        user = instruction if not extra else f"{instruction}\n\n{extra}"
        assistant = _text(record, "output", name, "empty output")
    elif shape == "prompt_completion":
        user = _text(record, "prompt", name, "empty prompt")
        assistant = _text(record, "completion", name, "empty completion")
    else:
        user = _text(record, "input", name, "empty input")
        assistant = _text(record, "output", name, "empty output")
    messages = [{"role": "user", "content": user}, {"role": "assistant", "content": assistant}]
    system = _optional_text(record, "system", name)
    if system is not None:
        messages.insert(0, {"role": "system", "content": system})
    return messages


def _text(record: dict[str, Any], key: str, name: Callable[[str], str], empty: str) -> str:
    value = record.get(key)
    if value is None:
        raise RecordError(name(key), "is null; expected text")
    if not isinstance(value, str):
        raise RecordError(name(key), f"wrong type: expected a string, got {_type(value)}")
    if not value.strip():
        raise RecordError(name(key), empty)
    return value


def _optional_text(record: dict[str, Any], key: str, name: Callable[[str], str]) -> str | None:
    value = record.get(key)
    if value is None or value == "":  # CSV and Parquet spell an absent optional column this way
        return None
    if not isinstance(value, str):
        raise RecordError(name(key), f"wrong type: expected a string, got {_type(value)}")
    return value if value.strip() else None


def _turns(shape: str, record: dict[str, Any], fields: dict[str, str], name: Callable[[str], str]) -> list[Message]:
    list_key = "messages" if shape == "chat" else "conversations"
    role_key, content_key = ("role", "content") if shape == "chat" else ("from", "value")
    role_name, content_name = fields.get(role_key, role_key), fields.get(content_key, content_key)
    turns = record[list_key]
    where = name(list_key)
    if not isinstance(turns, list):
        raise RecordError(where, f"wrong type: expected a list of turns, got {_type(turns)}")
    if not turns:
        raise RecordError(where, "empty conversation")
    messages: list[Message] = []
    for i, turn in enumerate(turns):
        at = f"{where}[{i}]"
        if not isinstance(turn, dict):
            raise RecordError(at, f"wrong type: expected an object with {role_name!r} and {content_name!r}, "
                                  f"got {_type(turn)}")
        for key in (role_name, content_name):
            if key not in turn:
                raise RecordError(f"{at}.{key}", "missing field")
        role, content = turn[role_name], turn[content_name]
        if not isinstance(role, str):
            raise RecordError(f"{at}.{role_name}", f"wrong type: expected a string, got {_type(role)}")
        if shape == "sharegpt":
            if role.lower() not in SHAREGPT_ROLES:
                raise RecordError(f"{at}.{role_name}", f"unknown speaker {role!r}; expected one of "
                                                       f"{', '.join(SHAREGPT_ROLES)}")
            role = SHAREGPT_ROLES[role.lower()]
        elif role not in ROLES:
            raise RecordError(f"{at}.{role_name}", f"unknown role {role!r}; expected system, user or assistant")
        if content is None:
            raise RecordError(f"{at}.{content_name}", "is null; expected text")
        if not isinstance(content, str):
            raise RecordError(f"{at}.{content_name}", f"wrong type: expected a string, got {_type(content)}")
        expected = _expected_role(i, messages)
        if role not in expected:
            raise RecordError(f"{at}.{role_name}", f"bad role order: {role!r} after "
                                                   f"{messages[-1]['role'] if messages else 'the start'}; "
                                                   f"expected {' or '.join(expected)}")
        if not content.strip() and role != "system":
            raise RecordError(f"{at}.{content_name}", f"empty {role} turn")
        messages.append({"role": role, "content": content})
    if messages[-1]["role"] != "assistant":
        raise RecordError(f"{where}[{len(turns) - 1}].{role_name}",
                          f"bad role order: the conversation ends with {messages[-1]['role']!r}; "
                          "it must end with an assistant reply (the part that is trained)")
    return messages


def _expected_role(i: int, messages: list[Message]) -> tuple[str, ...]:
    if i == 0:
        return ("system", "user")
    return ("user",) if messages[-1]["role"] in ("system", "assistant") else ("assistant",)


def _type(value: Any) -> str:
    return {list: "a list", dict: "an object", str: "a string", bool: "a boolean", int: "a number",
            float: "a number", type(None): "null"}.get(type(value), type(value).__name__)
