"""Chat rendering and label masks, checked by decoding the trained tokens with the real SmolLM2 tokenizer.

The Qwen3-style template below is written for these tests: like Qwen3's it puts an empty think block in
the generation prompt when `enable_thinking` is false, and drops <think> from earlier assistant turns.
"""

from __future__ import annotations

import copy

import pytest

from tunesmith.config import DataConfig, TrainConfig
from tunesmith.data import IGNORE_INDEX, Example, Source, fit_length, render, tokenize, tokenize_many
from tunesmith.errors import DataError, ModelError
from tunesmith.models import load_tokenizer, resolve_base

QWEN3_STYLE = (
    "{%- set ns = namespace(last_user=-1) -%}"
    "{%- for m in messages -%}{%- if m.role == 'user' -%}{%- set ns.last_user = loop.index0 -%}{%- endif -%}"
    "{%- endfor -%}"
    "{%- for m in messages -%}"
    "{%- if m.role == 'assistant' -%}"
    "{%- set body = m.content -%}{%- set thought = '' -%}"
    "{%- if '</think>' in body -%}"
    "{%- set thought = body.split('</think>')[0].split('<think>')[-1].strip('\\n') -%}"
    "{%- set body = body.split('</think>')[-1].lstrip('\\n') -%}"
    "{%- endif -%}"
    "{%- if loop.index0 > ns.last_user -%}"
    "{{- '<|im_start|>assistant\\n<think>\\n' + thought + '\\n</think>\\n\\n' + body + '<|im_end|>\\n' -}}"
    "{%- else -%}{{- '<|im_start|>assistant\\n' + body + '<|im_end|>\\n' -}}{%- endif -%}"
    "{%- else -%}{{- '<|im_start|>' + m.role + '\\n' + m.content + '<|im_end|>\\n' -}}{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n' -}}"
    "{%- if enable_thinking is defined and enable_thinking is false -%}{{- '<think>\\n\\n</think>\\n\\n' -}}"
    "{%- endif -%}{%- endif -%}"
)
# Llama-3 style: header tokens, no newline after the end-of-turn marker.
LLAMA3_STYLE = (
    "{{- bos_token -}}{%- for m in messages -%}"
    "{{- '<|start_header_id|>' + m.role + '<|end_header_id|>\\n\\n' + m.content + '<|eot_id|>' -}}{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' -}}{%- endif -%}"
)
TRAIN = TrainConfig()
USER, REPLY = "<特征>安全带:未系</特征>", "请系好安全带。"


def example(*turns: tuple[str, str]) -> Example:
    return Example([{"role": role, "content": content} for role, content in turns], Source("mem.jsonl", 0, 1))


def trained_runs(tokenizer, tokens) -> list[str]:
    """Each run of consecutive trained tokens, decoded."""
    runs, current = [], []
    for token, label in zip(tokens["input_ids"], tokens["labels"]):
        if label != IGNORE_INDEX:
            assert label == token
            current.append(token)
        elif current:
            runs.append(tokenizer.decode(current))
            current = []
    if current:
        runs.append(tokenizer.decode(current))
    return runs


@pytest.fixture(scope="module")
def chatml():
    return load_tokenizer(resolve_base("builtin:smollm2-135m"))


@pytest.fixture(scope="module")
def qwen3(tmp_path_factory):
    from tunesmith.testing import tiny_checkpoint

    return load_tokenizer(tiny_checkpoint(tmp_path_factory.mktemp("q") / "tiny", "qwen3", chat_template=QWEN3_STYLE))


def test_only_the_reply_and_its_end_of_turn_token_are_trained(chatml):
    ex = example(("system", "你是驾驶教练。"), ("user", USER), ("assistant", REPLY))
    tokens = tokenize(chatml, ex, DataConfig(), TRAIN)
    text = chatml.apply_chat_template(ex.messages, tokenize=False)
    assert chatml.decode(tokens["input_ids"]) == text
    assert trained_runs(chatml, tokens) == [REPLY + "<|im_end|>"]
    assert tokens["labels"][-2] == chatml.convert_tokens_to_ids("<|im_end|>")  # the stop token is learned
    first = next(i for i, label in enumerate(tokens["labels"]) if label != IGNORE_INDEX)
    assert chatml.decode(tokens["input_ids"][:first]).endswith("<|im_start|>assistant\n")
    # The prompt is tokenized as at inference (it ends on the same boundary), and here the whole is unchanged.
    assert tokens["input_ids"] == chatml.apply_chat_template(ex.messages, tokenize=True)["input_ids"]


def test_every_assistant_turn_is_trained_and_loss_on_all_trains_everything(chatml):
    ex = example(("user", "q1"), ("assistant", "a1"), ("user", "q2"), ("assistant", "a2"))
    tokens = tokenize(chatml, ex, DataConfig(), TRAIN)
    assert trained_runs(chatml, tokens) == ["a1<|im_end|>", "a2<|im_end|>"]
    everything = tokenize(chatml, ex, DataConfig(), TrainConfig(loss_on="all"))
    assert everything["labels"] == everything["input_ids"] == tokens["input_ids"]


def test_tokenize_many_equals_tokenize_one_by_one(chatml):
    examples = [example(("user", f"q{i}"), ("assistant", f"答案{i}")) for i in range(5)]
    assert tokenize_many(chatml, examples, DataConfig(), TRAIN) == [tokenize(chatml, e, DataConfig(), TRAIN)
                                                                    for e in examples]


def test_think_strip_trains_the_answer_only_and_prompts_without_thinking(qwen3):
    ex = example(("user", "hi"), ("assistant", "<think>\nlet me see\n</think>\n\nHello!"))
    tokens = tokenize(qwen3, ex, DataConfig(think="strip"), TRAIN)
    assert trained_runs(qwen3, tokens) == ["Hello!<|im_end|>"]
    text = qwen3.decode(tokens["input_ids"])
    assert "let me see" not in text
    # enable_thinking=False: the empty think block sits in the prompt, as the served model will see it.
    assert text.endswith("<|im_start|>assistant\n<think>\n\n</think>\n\nHello!<|im_end|>\n")
    prompt = qwen3.apply_chat_template(ex.messages[:1], tokenize=False, add_generation_prompt=True,
                                       enable_thinking=False)
    assert text.startswith(prompt)


def test_think_keep_trains_the_think_block(qwen3):
    ex = example(("user", "hi"), ("assistant", "<think>\nlet me see\n</think>\n\nHello!"))
    tokens = tokenize(qwen3, ex, DataConfig(think="keep"), TRAIN)
    assert trained_runs(qwen3, tokens) == ["<think>\nlet me see\n</think>\n\nHello!<|im_end|>"]


def test_template_that_rewrites_earlier_turns_still_gets_exact_spans(qwen3):
    ex = example(("user", "hi"), ("assistant", "<think>a</think>Hello!"), ("user", "again"),
                 ("assistant", "<think>b</think>Bye."))
    for think, last in (("strip", "Bye.<|im_end|>"), ("keep", "<think>\nb\n</think>\n\nBye.<|im_end|>")):
        tokens = tokenize(qwen3, ex, DataConfig(think=think), TRAIN)
        # The earlier reply is trained as the template writes it in history: without its think block.
        assert trained_runs(qwen3, tokens) == ["Hello!<|im_end|>", last]


def test_a_reply_that_is_only_thinking_is_an_error_when_stripping(qwen3):
    ex = example(("user", "hi"), ("assistant", "<think>hmm</think>"))
    with pytest.raises(DataError) as caught:
        tokenize(qwen3, ex, DataConfig(think="strip"), TRAIN)
    assert "mem.jsonl, line 1 (record 0), field 'messages[1].content'" in caught.value.message
    assert "empty once data.think: strip" in caught.value.message


def test_other_template_shapes_end_the_span_on_their_end_marker(chatml):
    llama = copy.copy(chatml)
    llama.chat_template = LLAMA3_STYLE
    ex = example(("user", "q"), ("assistant", "a1"), ("user", "q2"), ("assistant", "a2"))
    rendered = render(llama, ex, DataConfig())
    assert [rendered.text[s:e] for s, e in rendered.spans] == ["a1<|eot_id|>", "a2<|eot_id|>"]
    tokens = tokenize(llama, ex, DataConfig(), TRAIN)
    assert trained_runs(llama, tokens) == ["a1<|eot_id|>", "a2<|eot_id|>"]


def test_fit_length_truncates_drops_and_never_keeps_an_untrained_example():
    tokens = {"input_ids": [1, 2, 3, 4, 5, 6], "labels": [-100, -100, -100, 4, 5, 6]}
    assert fit_length(tokens, 6, "drop") is tokens
    assert fit_length(tokens, 5, "drop") is None
    assert fit_length(tokens, 4, "truncate") == {"input_ids": [1, 2, 3, 4], "labels": [-100, -100, -100, 4]}
    assert fit_length(tokens, 3, "truncate") is None


def test_a_template_that_refuses_the_conversation_names_the_example(chatml):
    strict = copy.copy(chatml)
    strict.chat_template = ("{%- for m in messages -%}{%- if m.role == 'system' -%}"
                            "{{ raise_exception('System role not supported') }}{%- endif -%}"
                            "{{ m.role + ': ' + m.content + '<|im_end|>' }}{%- endfor -%}")
    with pytest.raises(DataError) as caught:
        tokenize(strict, example(("system", "s"), ("user", "q"), ("assistant", "a")), DataConfig(), TRAIN)
    assert caught.value.message.startswith("mem.jsonl, line 1 (record 0): the model's chat template refused")
    assert "System role not supported" in caught.value.message
    bare = copy.copy(chatml)
    bare.chat_template = None
    with pytest.raises(ModelError, match="has no chat template"):
        tokenize(bare, example(("user", "q"), ("assistant", "a")), DataConfig(), TRAIN)


def test_a_template_that_never_ends_a_turn_is_refused(chatml):
    endless = copy.copy(chatml)
    endless.chat_template = "{%- for m in messages -%}{{ m.role + ': ' + m.content }}{%- endfor -%}"
    with pytest.raises(ModelError, match="writes nothing after an assistant reply"):
        tokenize(endless, example(("user", "q"), ("assistant", "a")), DataConfig(), TRAIN)
