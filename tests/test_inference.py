"""GGUF answers for evaluation and export come from the server's batched decoder: many prompts at once give the
greedy answers each gives alone, and those of llama-cpp-python's own one-at-a-time decoding (how evaluation
answered before it was batched). A tiny random-weight model with the SmolLM2 tokenizer, converted by llama.cpp."""

from __future__ import annotations

from pathlib import Path

import pytest

from tunesmith.config import Config
from tunesmith.inference import hf
from tunesmith.inference.gguf import decode_all, gguf_answers

QUESTIONS = ["What is the capital of France?", "Name three colours.", "How do I merge onto a highway?",
             "Write a haiku about rain.", "What is 12 times 7?", "Describe a roundabout.", "速度:静止 安全带:未系",
             "Translate 'good morning' into German.", "Why is the sky blue?", "List the days of the week."]
MAX_NEW = 16


@pytest.fixture(scope="module")
def tiny(builtin_checkpoint, tmp_path_factory) -> Path:
    """A tiny model whose greedy answers differ from prompt to prompt (testing.tiny_checkpoint's init_std)."""
    from tunesmith.testing import tiny_checkpoint

    return tiny_checkpoint(tmp_path_factory.mktemp("tiny") / "varied", "qwen3", init_std=0.16)


@pytest.fixture(scope="module")
def tiny_gguf(tiny, tmp_path_factory) -> Path:
    from tunesmith.export.convert import convert_checkpoint

    return convert_checkpoint(tiny, tmp_path_factory.mktemp("gguf") / "tiny.f16.gguf", "f16")


@pytest.fixture(scope="module")
def config(tiny) -> Config:
    return Config.model_validate({"model": {"base": str(tiny)}, "data": {"system_prompt": "Answer briefly."}})


def _conversations(config: Config) -> list[list[dict[str, str]]]:
    return [hf.messages_for(question, config) for question in QUESTIONS]


def test_batched_greedy_answers_equal_one_at_a_time_answers(tiny_gguf, config):
    conversations = _conversations(config)
    together = gguf_answers(tiny_gguf, config, conversations, MAX_NEW)
    alone = [gguf_answers(tiny_gguf, config, [messages], MAX_NEW, parallel=1)[0] for messages in conversations]
    assert together == alone
    assert len(set(together)) > len(QUESTIONS) // 2  # answers differ: a mix-up between sequences would show


def test_batched_answers_equal_llama_cpp_pythons_one_at_a_time_decoding(tiny_gguf, tiny, config):
    """llama-cpp-python's own decoding (generate at temperature 0, a fresh cache for each prompt, cut at the stop
    ids: evaluation's way before it was batched) gives the token ids the batched decoder gives with all prompts
    in flight."""
    from tunesmith.llama.batching import Batcher
    from tunesmith.llama.load import open_llama
    from tunesmith.models import load_tokenizer

    tokenizer = load_tokenizer(tiny)
    prompts = [hf.prompt_ids(tokenizer, messages, config) for messages in _conversations(config)]
    stops = frozenset(hf.stop_ids(tokenizer))
    batcher = Batcher(tiny_gguf, num_ctx=256, parallel=len(prompts))
    try:
        batched = decode_all(batcher, prompts, MAX_NEW, stops)
        assert batcher.widest == len(prompts)  # every sequence was in one llama_decode at least once
    finally:
        batcher.close()
    # Flash attention, as the batcher (and the server) computes attention: without it llama.cpp's CPU kernels
    # round differently, which on this model's large random weights changes the third token of one answer.
    llm = open_llama(tiny_gguf, n_ctx=256, flash_attn=True)
    try:
        for prompt, (tokens, reason) in zip(prompts, batched, strict=True):
            expected = []
            for token in llm.generate(prompt, temp=0.0, top_k=1, reset=True):
                if token in stops or token == llm.token_eos() or len(expected) >= MAX_NEW:
                    break
                expected.append(token)
            assert tokens == expected
            assert reason == ("length" if len(expected) == MAX_NEW else "stop")
    finally:
        llm.close()


def test_gguf_log_likelihoods_equal_llama_cpp_pythons_every_position_logits(smollm2_gguf):
    """The fidelity check's pass computes logits only where an answer token is predicted; its numbers are those
    of llama-cpp-python's logits at every position (the pass before), with flash attention as the server runs.
    The built-in SmolLM2, whose likely answers are far from its unlikely ones, so a position off by one shows."""
    import numpy as np

    from tunesmith.llama.load import open_llama
    from tunesmith.llama.logliks import answer_logliks
    from tunesmith.models import load_tokenizer, resolve_base

    config = Config()
    tokenizer = load_tokenizer(resolve_base(config.model.base))
    answers = {"What is the capital of France?": "The capital of France is Paris.", "What is 2 + 2?": "2 + 2 = 4.",
               "Name three colours.": "Red, green and blue.", "Say nothing.": ""}
    pairs = [(hf.prompt_ids(tokenizer, hf.messages_for(question, config), config),
              tokenizer(answer, add_special_tokens=False)["input_ids"]) for question, answer in answers.items()]
    got = answer_logliks(smollm2_gguf, pairs, n_threads=1)
    llm = open_llama(smollm2_gguf, n_ctx=512, n_threads=1, flash_attn=True)
    llm.context_params.logits_all = llm._logits_all = True  # every position's logits kept in llm.scores
    try:
        expected = []
        for prompt, answer in pairs:
            llm.reset()
            llm.eval(prompt + answer)
            rows = np.asarray(llm.scores[len(prompt) - 1:len(prompt) + len(answer) - 1], dtype=np.float64)
            logprobs = rows - rows.max(-1, keepdims=True)
            logprobs -= np.log(np.exp(logprobs).sum(-1, keepdims=True))
            expected.append(float(np.mean([logprobs[j, token] for j, token in enumerate(answer)])) if answer else 0.0)
    finally:
        llm.close()
    assert got == pytest.approx(expected, rel=1e-5, abs=1e-6)
    assert got[0] > -1.0 and got[1] > -1.0 and got[-1] == 0.0  # likely answers, so positions line up


def test_answers_are_cut_at_the_longest_reference_plus_a_margin(tiny):
    """An answer longer than every reference by ANSWER_MARGIN tokens cannot match one: generation stops there."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny)
    references = ["short", "a somewhat longer reference answer of several words"]
    longest = max(len(tokenizer(text, add_special_tokens=False).input_ids) for text in references)
    assert hf.answer_limit(tokenizer, references, 256) == longest + hf.ANSWER_MARGIN
    assert hf.answer_limit(tokenizer, references, 4) == 4  # never more than asked
    assert hf.answer_limit(tokenizer, None, 256) == 256  # nothing to compare with: as asked


def test_hugging_face_answers_are_the_same_however_the_prompts_are_batched(tiny, config, monkeypatch):
    """generate_batch decodes as many prompts together as ANSWER_CACHE_BYTES of KV cache holds (a bigger batch
    runs the LM head nearer the cores' peak); one at a time, by threes or all at once, the greedy answers are
    the same."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(tiny).eval()
    tokenizer = AutoTokenizer.from_pretrained(tiny)
    conversations = _conversations(config)
    together = hf.generate_batch(model, tokenizer, conversations, config, MAX_NEW)
    assert hf.answer_batch_size(model, 64) == hf.MAX_ANSWER_BATCH  # a tiny model's cache: all at once
    assert together == hf.generate_batch(model, tokenizer, conversations, config, MAX_NEW, batch_size=1)
    # A cache budget of three prompts' worth: batches of three, the same answers.
    text = model.config.get_text_config()
    per_token = 2 * text.num_hidden_layers * text.num_key_value_heads * text.head_dim * model.dtype.itemsize
    monkeypatch.setattr(hf, "ANSWER_CACHE_BYTES", 3 * per_token * 64)
    assert hf.answer_batch_size(model, 64) == 3
    assert hf.answer_batch_size(model, 65) == 2
    assert together == hf.generate_batch(model, tokenizer, conversations, config, MAX_NEW)
    assert len(set(together)) > len(QUESTIONS) // 2


def test_answer_batches_grow_only_as_far_as_their_longest_prompt_allows():
    lengths = [10, 20, 30, 40, 50]
    fits = lambda tokens: 200 // tokens  # sequences of `tokens` that fit a budget of 200
    assert list(hf._batches([0, 1, 2, 3, 4], lengths, 10, fits)) == [[0, 1, 2, 3], [4]]
    assert list(hf._batches([0, 1, 2, 3, 4], lengths, 60, fits)) == [[0, 1], [2, 3], [4]]
    assert list(hf._batches([], lengths, 10, fits)) == []
