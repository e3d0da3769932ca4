"""Evaluation's answers (report.html's columns) when the token limit falls inside a character: the built-in
SmolLM2 writes Chinese characters as several byte tokens, so `max_new_tokens` can stop between them."""

from __future__ import annotations

import pytest

from tunesmith.config import Config
from tunesmith.inference import hf
from tunesmith.inference.gguf import gguf_answers

CHINESE = [{"role": "user", "content": "请用中文回答：中国的首都是哪里？"}]


def _cuts(tokenizer, tokens: list[int]) -> list[int]:
    """Lengths at which the answer ends inside a character (its decoded text ends in U+FFFD)."""
    return [k for k in range(1, len(tokens) + 1) if tokenizer.decode(tokens[:k]).endswith("\ufffd")]


@pytest.fixture(scope="module")
def base(builtin_checkpoint):
    config = Config()
    model, tokenizer = hf.load(config, None)
    return config, model, tokenizer


def test_the_base_models_answer_cut_inside_a_character_drops_its_bytes(base):
    import torch

    config, model, tokenizer = base
    ids = torch.tensor([hf.prompt_ids(tokenizer, CHINESE, config)])
    with torch.no_grad():
        tokens = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=16,
                                do_sample=False, pad_token_id=tokenizer.pad_token_id)[0, ids.shape[1]:].tolist()
    cuts = _cuts(tokenizer, tokens)
    assert cuts, f"no cut inside a character in {tokenizer.decode(tokens)!r}"  # the case under test occurs
    for k in sorted({cuts[0], cuts[-1]}):
        (answer,) = hf.generate_batch(model, tokenizer, [CHINESE], config, k)
        assert answer == tokenizer.decode(tokens[:k])[:-1].strip() and "\ufffd" not in answer


def test_a_gguf_answer_cut_inside_a_character_drops_its_bytes(base, smollm2_gguf):
    from tunesmith.llama.load import open_llama

    config, _, tokenizer = base
    llm = open_llama(smollm2_gguf, n_ctx=512)
    tokens = []
    for token in llm.generate(hf.prompt_ids(tokenizer, CHINESE, config), temp=0.0, top_k=1, reset=True):
        if token == llm.token_eos() or len(tokens) >= 16:
            break
        tokens.append(token)
    llm.close()
    cuts = _cuts(tokenizer, tokens)
    assert cuts, f"no cut inside a character in {tokenizer.decode(tokens)!r}"
    for k in sorted({cuts[0], cuts[-1]}):
        (answer,) = gguf_answers(smollm2_gguf, config, [CHINESE], k)
        assert answer == tokenizer.decode(tokens[:k])[:-1].strip() and "\ufffd" not in answer
