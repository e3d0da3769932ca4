"""Render an example with the base model's own chat template and build its labels.

`tokenize(tokenizer, example, data_cfg, train_cfg) -> {"input_ids": [...], "labels": [...]}`:
labels are -100 everywhere except the assistant turns (`train.loss_on: completion`), or equal to
input_ids (`all`). Each trained span runs from the first token of the reply through the template's
end-of-turn token (`<|im_end|>` for ChatML), so the fine-tuned model learns to stop; the role header
(`<|im_start|>assistant\\n`) stays in the prompt because at inference the template writes it.

How spans are found: the conversation up to turn i rendered with `add_generation_prompt=True` is the
prompt of turn i; rendered through turn i it ends after that turn's end-of-turn token. Both are prefixes
of the whole rendering for ordinary templates, which gives exact character spans. Templates that render
earlier assistant turns differently from the last one (Qwen3 drops past `<think>` blocks) fall back to
finding the reply's text (without its <think> block if the template dropped it) after the previous span
and extending it over the end-of-turn marker.
The text is then tokenized span by span (no special tokens added: the template writes BOS itself), so
the prompt ends on the same token boundary as at inference, where the prompt is tokenized alone.

`data.think: strip` removes `<think>...</think>` blocks from assistant turns and renders with
`enable_thinking=False` (Qwen3-style templates then put an empty think block in the prompt, and the
served model answers without thinking); `keep` leaves both alone. `tokenize` never truncates: the
`data.overlength` policy is applied by `fit_length` (and `prepare`).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from tunesmith.config import DataConfig, TrainConfig
from tunesmith.data.validate import Example
from tunesmith.errors import DataError, ModelError

IGNORE_INDEX = -100
THINK_BLOCK = re.compile(r"<think>.*?</think>\s*", re.DOTALL)


@dataclass
class Rendered:
    text: str
    spans: list[tuple[int, int]]
    """Character ranges of `text` that are trained (assistant replies plus their end-of-turn marker)."""
    think_stripped: int = 0


def strip_think(text: str) -> str:
    return THINK_BLOCK.sub("", text)


# Llama 3.x templates write "Today Date: ..." into every system turn: 3.1's says "26 Jul 2024" unless given a
# date_string, 3.2's asks transformers' strftime_now for today. A date that changes from day to day would make
# training, evaluation and the exported Modelfile (derived on export day) write different prompts; pinned to
# the 3.1 template's own default, every stage writes the same one.
DATE_STRING = "26 Jul 2024"


def template_kwargs(data_cfg: DataConfig) -> dict[str, Any]:
    """The extra variables every chat-template rendering gets, in training, evaluation and export alike.
    Templates that do not know a variable ignore it (Jinja leaves unknown variables alone)."""
    kwargs: dict[str, Any] = {"date_string": DATE_STRING}
    if data_cfg.think == "strip":
        kwargs["enable_thinking"] = False
    return kwargs


def target_messages(example: Example, data_cfg: DataConfig) -> tuple[list[dict[str, str]], int]:
    """The messages as trained: with `think: strip`, assistant turns lose their <think> blocks."""
    if data_cfg.think == "keep":
        return example.messages, 0
    stripped = 0
    messages = []
    for i, message in enumerate(example.messages):
        content = message["content"]
        if message["role"] == "assistant" and "<think>" in content:
            content = strip_think(content)
            stripped += 1
            if not content.strip():
                raise DataError(f"{example.source}, field 'messages[{i}].content': the reply is only a "
                                "<think> block, empty once data.think: strip removes it",
                                "give the answer after </think>, or set data.think: keep")
        messages.append({"role": message["role"], "content": content})
    return messages, stripped


def render(tokenizer: Any, example: Example, data_cfg: DataConfig) -> Rendered:
    """The whole conversation as the template writes it, with the trained character spans."""
    messages, stripped = target_messages(example, data_cfg)
    kwargs = template_kwargs(data_cfg)

    def chat(turns: list[dict[str, str]], generation: bool) -> str:
        return _apply_template(tokenizer, turns, generation, kwargs, example)

    if not _end_marker(tokenizer, kwargs):
        raise ModelError("the chat template writes nothing after an assistant reply, so a fine-tuned model "
                         "could not learn where to stop",
                         "use a template that ends assistant turns with an end-of-turn token, such as the "
                         "instruct model's own")
    text = chat(messages, False)
    spans: list[tuple[int, int]] = []
    cursor = 0
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        prompt = chat(messages[:i], True)
        through = (text if i == len(messages) - 1 else chat(messages[: i + 1], False)).rstrip()
        if through.startswith(prompt) and text.startswith(through) and len(prompt) >= cursor:
            start, end = len(prompt), len(through)
        else:
            start, end = _find_reply(text, message["content"], cursor, _end_marker(tokenizer, kwargs))
            if start < 0:
                raise DataError(
                    f"{example.source}: the chat template renders assistant turn {i} so that its text cannot "
                    "be found in the whole conversation, so its labels cannot be built",
                    "use single-turn examples with this model, or a chat template with {% generation %}")
        spans.append((start, end))
        cursor = end
    return Rendered(text, spans, stripped)


def tokenize(tokenizer: Any, example: Example, data_cfg: DataConfig, train_cfg: TrainConfig) -> dict[str, list[int]]:
    """Token ids of the rendered example and labels (-100 outside the trained spans)."""
    return tokenize_many(tokenizer, [example], data_cfg, train_cfg)[0]


def tokenize_many(tokenizer: Any, examples: list[Example], data_cfg: DataConfig,
                  train_cfg: TrainConfig) -> list[dict[str, list[int]]]:
    """`tokenize` for many examples: one batched tokenizer call (several times faster than one by one)."""
    everything = train_cfg.loss_on == "all"
    pieces: list[str] = []
    owners: list[tuple[int, bool]] = []  # (example number, trained) per piece
    for number, example in enumerate(examples):
        rendered = render(tokenizer, example, data_cfg)
        position = 0
        for start, end in rendered.spans:
            for text, trained in ((rendered.text[position:start], False), (rendered.text[start:end], True)):
                if text:
                    pieces.append(text)
                    owners.append((number, trained))
            position = end
        if rendered.text[position:]:
            pieces.append(rendered.text[position:])
            owners.append((number, False))
    encoded = _encode(tokenizer, pieces)
    result: list[dict[str, list[int]]] = [{"input_ids": [], "labels": []} for _ in examples]
    for (number, trained), ids in zip(owners, encoded):
        result[number]["input_ids"].extend(ids)
        result[number]["labels"].extend(ids if trained or everything else [IGNORE_INDEX] * len(ids))
    return result


def fit_length(tokens: dict[str, list[int]], max_length: int, policy: str) -> dict[str, list[int]] | None:
    """Apply `data.overlength`: keep as is, cut to `max_length`, or None (drop).

    A truncated example that keeps no trained token is dropped too: it would only add a zero loss.
    """
    if len(tokens["input_ids"]) <= max_length:
        return tokens
    if policy == "drop":
        return None
    cut = {"input_ids": tokens["input_ids"][:max_length], "labels": tokens["labels"][:max_length]}
    return cut if any(label != IGNORE_INDEX for label in cut["labels"]) else None


LONG = 1 << 16
"""Characters above which a text is tokenized in pieces of about this size, one after the other: the Rust
tokenizer keeps some 400 bytes of bookkeeping per token while it works, so one 16 MiB record (3.4M tokens) took
the process to 2.7 GB."""
_CUT = re.compile(r"(?<=\S) (?=\S)")


def _encode(tokenizer: Any, texts: list[str]) -> list[list[int]]:
    if not texts:
        return []
    backend = getattr(tokenizer, "_tokenizer", None)
    if not hasattr(backend, "encode_batch"):
        return [ids for text in texts for ids in _encode_slow(tokenizer, text)]
    # The Rust tokenizer directly: the same ids as tokenizer(texts, add_special_tokens=False) without building a
    # BatchEncoding (or, with encode_batch_fast, offsets), which halves the time `data inspect` spends on goDrive.
    encode = getattr(backend, "encode_batch_fast", backend.encode_batch)
    short = [i for i, text in enumerate(texts) if len(text) <= LONG]
    result: list[list[int]] = [[] for _ in texts]
    for i, encoding in zip(short, encode([texts[i] for i in short], add_special_tokens=False)):
        result[i] = encoding.ids
    for i in (i for i, text in enumerate(texts) if len(text) > LONG):
        for piece in _pieces(texts[i]):
            result[i].extend(encode([piece], add_special_tokens=False)[0].ids)
    return result


def _encode_slow(tokenizer: Any, text: str) -> list[list[int]]:
    return [[ids for piece in _pieces(text) for ids in tokenizer(piece, add_special_tokens=False)["input_ids"]]]


def _pieces(text: str) -> list[str]:
    """`text` cut into pieces of about LONG characters, each cut at a space between two words: the tokenizers'
    pre-tokenizers (GPT-2's byte-level regex, SentencePiece's metaspace) split there too, so the pieces give the
    ids of the whole. A text with no such space stays whole."""
    pieces, start = [], 0
    while len(text) - start > LONG:
        cut = _CUT.search(text, start + LONG)
        if cut is None:
            break
        pieces.append(text[start:cut.start()])
        start = cut.start()
    pieces.append(text[start:])
    return pieces


def _apply_template(tokenizer: Any, turns: list[dict[str, str]], generation: bool, kwargs: dict[str, Any],
                    example: Example | None) -> str:
    if not getattr(tokenizer, "chat_template", None):
        raise ModelError("the base model's tokenizer has no chat template, so examples cannot be rendered as chats",
                         "use an instruct/chat model, or one whose tokenizer_config.json has a chat_template")
    try:
        return tokenizer.apply_chat_template(turns, tokenize=False, add_generation_prompt=generation, **kwargs)
    except Exception as exc:  # jinja2 TemplateError, or raise_exception() inside the template
        where = example.source if example else "a two-turn probe conversation"
        raise DataError(f"{where}: the model's chat template refused this conversation: {exc}",
                        "some templates reject a system turn or a role order; adjust the data for this model"
                        ) from exc


_MARKERS: dict[tuple[str, str], str] = {}


def _end_marker(tokenizer: Any, kwargs: dict[str, Any]) -> str:
    """What the template writes right after a reply (`<|im_end|>`), learned from a two-turn probe."""
    key = (repr(tokenizer.chat_template), repr(sorted(kwargs.items())))  # not id(): ids are reused after GC
    if key not in _MARKERS:
        probe = [{"role": "user", "content": "ping"}, {"role": "assistant", "content": "PONG-7"}]
        text = _apply_template(tokenizer, probe, False, kwargs, None)
        after = text[text.rfind("PONG-7") + len("PONG-7"):]
        _MARKERS[key] = after.strip().split()[0] if after.strip() else ""
    return _MARKERS[key]


def _find_reply(text: str, content: str, cursor: int, marker: str) -> tuple[int, int]:
    # Templates like Qwen3's drop <think> blocks from earlier turns: then the reply as rendered is the
    # text after </think>, and that (what the model sees at inference) is what gets trained.
    for body in (content.strip(), strip_think(content).strip(), content.split("</think>")[-1].strip()):
        start = text.find(body, cursor) if body else -1
        if start >= 0:
            break
    else:
        return -1, -1
    end = start + len(body)
    gap = text[end:]
    if marker and gap.lstrip(" ").startswith(marker):
        end += len(gap) - len(gap.lstrip(" ")) + len(marker)
    return start, end
