"""Does batching change greedy answers? 8 prompts decoded one at a time, then all 8 in one llama_batch.

    .venv/bin/python bench/batch_exactness.py [GGUF ...]   # default: the built-in Q4_1, and bench/serve_load's
                                                           # f16 and q8_0 when they exist

For each GGUF and each llama.cpp cache layout (one KV stream per sequence, as tunesmith's engine and
`llama-server -np N` use, or one unified stream) with flash attention on and off, it prints how many of the
8 greedy continuations (48 tokens) are identical batched and alone. Counts only, no timing: it can run on a
busy machine. This is what chose the engine's settings (batching.py): per-sequence streams, flash attention on.
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tunesmith import paths
from tunesmith.serve.known_templates import CHATML
from tunesmith.serve.prompt import build_prompt

QUESTIONS = [
    "What is the capital of France?", "Give me three tips for driving in the rain.",
    "Explain what a roundabout is.", "Write a haiku about traffic lights.",
    "What should I do at a yellow light?", "Describe how to merge onto a highway.",
    "What is the speed of light?", "Name three colors of the rainbow.",
]
TOKENS = 48


def identical(gguf: Path, unified: bool, flash: bool) -> int:
    import llama_cpp as L
    from llama_cpp._logger import set_verbose

    set_verbose(False)
    params = L.llama_model_default_params()
    params.use_extra_bufts = False
    model = L.llama_model_load_from_file(str(gguf).encode(), params)
    vocab = L.llama_model_get_vocab(model)
    cparams = L.llama_context_default_params()
    cparams.n_ctx, cparams.n_batch, cparams.n_ubatch = 1024 * len(QUESTIONS), 512, 512
    cparams.n_seq_max, cparams.kv_unified = len(QUESTIONS), unified
    cparams.n_threads = cparams.n_threads_batch = 1
    cparams.flash_attn_type = L.LLAMA_FLASH_ATTN_TYPE_ENABLED if flash else L.LLAMA_FLASH_ATTN_TYPE_DISABLED
    ctx = L.llama_init_from_model(model, cparams)
    memory = L.llama_get_memory(ctx)
    batch = L.llama_batch_init(512, 0, 1)
    prompts = []
    for q in QUESTIONS:
        data = build_prompt(CHATML, [{"role": "user", "content": q}]).encode()
        buffer = (L.llama_token * (len(data) + 8))()
        n = L.llama_tokenize(vocab, data, len(data), buffer, len(data) + 8, L.llama_vocab_get_add_bos(vocab), True)
        prompts.append(list(buffer[:n]))

    def put(i: int, token: int, pos: int, seq: int, logits: bool) -> None:
        batch.token[i], batch.pos[i], batch.n_seq_id[i], batch.logits[i] = token, pos, 1, logits
        batch.seq_id[i][0] = seq

    def decode(seqs: list[int]) -> dict[int, list[int]]:
        samplers = {}
        for s in seqs:
            L.llama_memory_seq_rm(memory, s, -1, -1)
            samplers[s] = L.llama_sampler_chain_init(L.llama_sampler_chain_default_params())
            L.llama_sampler_chain_add(samplers[s], L.llama_sampler_init_greedy())
        out: dict[int, list[int]] = {s: [] for s in seqs}
        for s in seqs:  # each prompt in its own call, as a whole
            for j, token in enumerate(prompts[s]):
                put(j, token, j, s, j == len(prompts[s]) - 1)
            batch.n_tokens = len(prompts[s])
            assert L.llama_decode(ctx, batch) == 0
            out[s].append(L.llama_sampler_sample(samplers[s], ctx, len(prompts[s]) - 1))
        for _ in range(TOKENS - 1):  # then one token of every sequence per call
            for j, s in enumerate(seqs):
                put(j, out[s][-1], len(prompts[s]) + len(out[s]) - 1, s, True)
            batch.n_tokens = len(seqs)
            assert L.llama_decode(ctx, batch) == 0
            for j, s in enumerate(seqs):
                out[s].append(L.llama_sampler_sample(samplers[s], ctx, j))
        for sampler in samplers.values():
            L.llama_sampler_free(sampler)
        return out

    alone = {s: decode([s])[s] for s in range(len(QUESTIONS))}
    together = decode(list(range(len(QUESTIONS))))
    L.llama_batch_free(batch)
    L.llama_free(ctx)
    L.llama_model_free(model)
    return sum(together[s] == alone[s] for s in alone)


def main() -> None:
    from tunesmith.models.builtin import smollm2_gguf

    ggufs = [Path(p) for p in sys.argv[1:]] or [smollm2_gguf(), *(
        p for p in (paths.home() / "bench" / f"smollm2-135m.{q}.gguf" for q in ("f16", "q8_0")) if p.exists())]
    print(f"| GGUF | KV cache | flash attention | identical batched and alone (of {len(QUESTIONS)}) |")
    print("|---|---|---|---|")
    for gguf in ggufs:
        for unified in (False, True):
            for flash in (True, False):
                n = identical(gguf, unified, flash)
                layout = "unified" if unified else "one stream per sequence"
                print(f"| {gguf.name} | {layout} | {'on' if flash else 'off'} | {n} |", flush=True)


if __name__ == "__main__":
    main()
