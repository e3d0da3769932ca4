"""Greedy answers of a GGUF, decoded as the server decodes: many prompts at once through llama.cpp's batched
decoder (tunesmith/llama/batching.py), each sequence in its own cache stream, so an answer is the same alone or
among others (tests/test_inference.py), and a GGUF is scored exactly as `tunesmith serve` answers.

Prompts are the training template's token ids (hf.prompt_ids) and answers are decoded by the same tokenizer, so
the only difference from the Hugging Face model's answers is the weights.
"""

from __future__ import annotations

import threading
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from tunesmith.config import Config
from tunesmith.inference import hf
from tunesmith.llama.batching import Batcher, Sequence, Stats
from tunesmith.llama.load import EngineError, idle_cores

PARALLEL = 16
"""Sequences decoded together. On CPU one llama_decode of 2 to 8 tokens costs about what 2 tokens cost, so many
sequences together pay: on one thread of 2 cores, from about 6 on, up to 1.8x one stream's tokens/s
(bench/RESULTS.md, issue 19)."""


GREEDY = SimpleNamespace(temperature=0.0, repeat_last_n=0, repeat_penalty=1.0, presence_penalty=0.0,
                         frequency_penalty=0.0, stop=[], top_k=1, typical_p=1.0, top_p=1.0, min_p=0.0, seed=0)
"""The most likely token at every step, with no penalty: how evaluation has always decoded (llama-cpp-python's
temp 0), as the batcher's sampling settings (batching.Sequence.opts)."""


def gguf_answers(gguf: Path, config: Config, conversations: list[list[dict[str, str]]], max_new: int,
                 parallel: int = PARALLEL, tokenizer: Any = None) -> list[str]:
    """Greedy answers of a GGUF through llama.cpp, prompted with the training template's token ids, each cut at
    its first stop token (hf.stop_ids) or after `max_new` tokens. `tokenizer`: the base's, when the caller has
    it loaded (Gemma 3's takes ~2.5 s to load)."""
    from tunesmith.models import load_tokenizer, resolve_base

    if not conversations:
        return []
    if tokenizer is None:
        tokenizer = load_tokenizer(resolve_base(config.model.base, config.model.revision))
    prompts = [hf.prompt_ids(tokenizer, messages, config) for messages in conversations]
    stops = frozenset(hf.stop_ids(tokenizer))
    # Each sequence's cache holds its prompt and answer; a longer one would only take memory. A multiple of 256,
    # which llama.cpp would otherwise pad the context to (and say so on the terminal).
    num_ctx = -(-(max(len(prompt) for prompt in prompts) + max_new + 1) // 256) * 256
    # Answering alone, so with every core no other process is using (the server keeps half: it shares them).
    batcher = Batcher(gguf, num_ctx=num_ctx, parallel=min(parallel, len(prompts)), n_threads=idle_cores())
    try:
        decoded = decode_all(batcher, prompts, max_new, stops)
    finally:
        batcher.close()
    return [hf.answer_text(tokenizer, tokens, cut=reason == "length") for tokens, reason in decoded]


def decode_all(batcher: Batcher, prompts: list[list[int]], limit: int,
               stop_tokens: frozenset[int] = frozenset()) -> list[tuple[list[int], str]]:
    """(generated token ids, done reason: stop or length) for each prompt, decoded greedily by `batcher`, all
    submitted at once: the batcher gives each a slot as one frees, in order."""
    results: list[Stats | BaseException | None] = [None] * len(prompts)
    left = [len(prompts)]
    finished = threading.Event()
    lock = threading.Lock()

    def receiver(index: int):  # called from the decode thread: Pieces of text (not needed here), then the end
        def emit(item: object) -> None:
            if isinstance(item, Stats | BaseException):
                results[index] = item
        return emit

    def done() -> None:
        with lock:
            left[0] -= 1
            if left[0] == 0:
                finished.set()

    for index, prompt in enumerate(prompts):
        batcher.submit(Sequence(prompt, GREEDY, batcher.sampler(GREEDY), receiver(index), threading.Event(), None,
                                limit, batcher.n_ctx, on_done=done, stop_tokens=stop_tokens))
    while not finished.wait(1.0):
        if not batcher.alive:
            raise EngineError("llama.cpp's decode loop ended before every prompt was answered")
    out = []
    for prompt, result in zip(prompts, results, strict=True):
        if isinstance(result, BaseException):
            raise result
        assert result is not None
        out.append((result.tokens[len(prompt):], result.done_reason))
    return out
