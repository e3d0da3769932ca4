"""What one llama_decode costs by the number of sequences in it: one call for all, or one call per sequence.

    .venv/bin/python bench/decode_calls.py GGUF [--threads 1]

Each row decodes 20 steps of one token for each of N sequences (separate per-sequence caches, flash attention
on, as tunesmith's engine runs them), best of 5, and reports the CPU time of the calling thread
(time.thread_time) per step: with one llama.cpp thread that is the work done, and it moves far less than wall
time when other jobs share the cores. With more threads, read the wall column on a quiet machine only.
This is the measurement behind Batcher._plan (tunesmith/llama/batching.py).
"""

from __future__ import annotations

import argparse
import time


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("gguf")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()

    import llama_cpp as L
    from llama_cpp._logger import set_verbose

    set_verbose(False)
    widths = (1, 2, 3, 4, 6, 8, 12, 16)
    params = L.llama_model_default_params()
    params.use_extra_bufts = False
    model = L.llama_model_load_from_file(args.gguf.encode(), params)
    cparams = L.llama_context_default_params()
    cparams.n_ctx, cparams.n_batch, cparams.n_ubatch = 512 * max(widths), 512, 512
    cparams.n_seq_max, cparams.kv_unified = max(widths), False
    cparams.n_threads = cparams.n_threads_batch = args.threads
    cparams.flash_attn_type = L.LLAMA_FLASH_ATTN_TYPE_ENABLED
    ctx = L.llama_init_from_model(model, cparams)
    memory = L.llama_get_memory(ctx)
    batch = L.llama_batch_init(512, 0, 1)

    def call(seqs: list[int], pos: int) -> None:
        for j, s in enumerate(seqs):
            batch.token[j], batch.pos[j], batch.n_seq_id[j], batch.logits[j] = 100 + s, pos, 1, True
            batch.seq_id[j][0] = s
        batch.n_tokens = len(seqs)
        assert L.llama_decode(ctx, batch) == 0

    best: dict[tuple[int, bool], tuple[float, float]] = {}
    for _ in range(5):
        for width in widths:
            for apart in (False, True):
                for s in range(max(widths)):
                    L.llama_memory_seq_rm(memory, s, -1, -1)
                cpu, wall = time.thread_time(), time.perf_counter()
                for pos in range(20):
                    if apart:
                        for s in range(width):
                            call([s], pos)
                    else:
                        call(list(range(width)), pos)
                step = ((time.thread_time() - cpu) / 20, (time.perf_counter() - wall) / 20)
                key = (width, apart)
                best[key] = min(best.get(key, step), step)
    print("| sequences | one call: CPU ms a step | tokens/s | one call each: CPU ms a step | tokens/s | wall ms "
          "(one call / each) |")
    print("|---|---|---|---|---|---|")
    for width in widths:
        (cpu1, wall1), (cpu2, wall2) = best[(width, False)], best[(width, True)]
        print(f"| {width} | {cpu1 * 1e3:.1f} | {width / cpu1:.0f} | {cpu2 * 1e3:.1f} | {width / cpu2:.0f} "
              f"| {wall1 * 1e3:.0f} / {wall2 * 1e3:.0f} |")


if __name__ == "__main__":
    main()
