"""How likely a GGUF finds given answers: the mean log-likelihood per token of each answer after its prompt.

Export's fidelity check compares it with the merged model's (export/fidelity.py). One llama_decode reads a
prompt and its answer together, and llama.cpp computes logits only at the positions that predict an answer
token: an LM head at every position (llama-cpp-python's `logits_all`) costs Gemma 3's 262k-token vocabulary
more than the rest of the model, and copying those logits out cost more again.
"""

from __future__ import annotations

from pathlib import Path

from tunesmith.llama.load import EngineError, load_model, new_context


def answer_logliks(path: str | Path, pairs: list[tuple[list[int], list[int]]],
                   n_threads: int | None = None) -> list[float]:
    """For each (prompt ids, answer ids): the mean of log p(answer token | everything before it); 0.0 for an
    empty answer."""
    import llama_cpp as L
    import numpy as np
    import torch

    longest = max((len(prompt) + len(answer) for prompt, answer in pairs), default=1)
    model = load_model(path)
    ctx = batch = None
    try:
        n_ctx = max(512, longest + 8)
        ctx = new_context(model, n_ctx=n_ctx, n_batch=n_ctx, n_threads=n_threads)
        if not ctx:
            raise EngineError(f"llama.cpp could not create a context of {n_ctx} tokens for {path}")
        memory = L.llama_get_memory(ctx)
        n_vocab = L.llama_vocab_n_tokens(L.llama_model_get_vocab(model))
        batch = L.llama_batch_init(n_ctx, 0, 1)
        logliks = []
        for prompt, answer in pairs:
            if not answer:
                logliks.append(0.0)
                continue
            L.llama_memory_clear(memory, True)
            tokens = prompt + answer
            first = len(prompt) - 1  # the position whose logits predict the answer's first token
            for i, token in enumerate(tokens):
                batch.token[i], batch.pos[i], batch.n_seq_id[i] = token, i, 1
                batch.seq_id[i][0] = 0
                batch.logits[i] = first <= i < len(tokens) - 1
            batch.n_tokens = len(tokens)
            rc = L.llama_decode(ctx, batch)
            if rc != 0:
                raise EngineError(f"llama.cpp could not decode a prompt and its answer (llama_decode returned {rc})")
            # The answer's rows are consecutive in llama.cpp's output buffer (one per position asked for, in order).
            rows = np.ctypeslib.as_array(L.llama_get_logits_ith(ctx, first), shape=(len(answer), n_vocab))
            # In float64 as before, through torch: numpy's one-threaded exp over Gemma 3's 262k-token rows cost
            # ~0.2 s a prompt, as much as llama.cpp's pass.
            rows = torch.from_numpy(rows).double()
            picked = rows[torch.arange(len(answer)), torch.tensor(answer)] - rows.logsumexp(dim=1)
            logliks.append(float(picked.mean()))
        return logliks
    finally:
        if batch is not None:
            L.llama_batch_free(batch)
        if ctx:
            L.llama_free(ctx)
        L.llama_model_free(model)
