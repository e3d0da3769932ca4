"""Packing goDrive-length examples into the fast path's buffers: wall time of `pack` for 200,000 of them.

    .venv/bin/python bench/packing.py [--examples 200000] [--lengths qwen|smollm2] [--seq-len 4096] [--repeat 3]

Lengths (and which tokens carry a loss) come from goDrive's own data:
  qwen     the Qwen3 tokenizer's lengths of examples/godrive/train.jsonl in the article's chat format, as
           measured for the article-recipe benchmark (7,799 examples, 129-154 tokens, median 141), drawn with
           their measured frequencies; the last 25 tokens of each carry the loss (the answer).
  smollm2  examples/godrive/train.jsonl rendered and tokenized by tunesmith's data layer with the built-in
           SmolLM2's tokenizer and chat template (the demo's lengths), drawn from at random.
qwen's token ids are random (packing looks only at lengths). Prints the buffers, how full they are, and the
first and best wall time and the CPU time of `--repeat` runs of `best_fit` alone (the placement) and of `pack`
(placement plus the tensors).
"""

from __future__ import annotations

import argparse
import os
import platform
import random
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tunesmith.train.fast.packing import IGNORE_INDEX, best_fit, pack

# Length -> count: the 7,799 goDrive training examples under the Qwen3 tokenizer (article-recipe benchmark).
QWEN_LENGTHS = {
    129: 6, 130: 35, 131: 148, 132: 291, 133: 440, 134: 410, 135: 285, 136: 191, 137: 289, 138: 422, 139: 534,
    140: 589, 141: 553, 142: 411, 143: 321, 144: 393, 145: 430, 146: 542, 147: 557, 148: 392, 149: 257,
    150: 172, 151: 93, 152: 21, 153: 14, 154: 3,
}
ANSWER = 25


def qwen_examples(count: int, rng: random.Random) -> list[tuple[list[int], list[int]]]:
    lengths = rng.choices(list(QWEN_LENGTHS), weights=list(QWEN_LENGTHS.values()), k=count)
    pool = [rng.randrange(151_936) for _ in range(1 << 16)]  # slices of one random stream: ids don't matter
    out = []
    for n in lengths:
        start = rng.randrange(len(pool) - n)
        ids = pool[start:start + n]
        out.append((ids, [IGNORE_INDEX] * (n - ANSWER) + ids[n - ANSWER:]))
    return out


def smollm2_examples(count: int, rng: random.Random) -> list[tuple[list[int], list[int]]]:
    from transformers import AutoTokenizer

    from tunesmith.config import load_config
    from tunesmith.data import load_examples
    from tunesmith.data.render import tokenize_many
    from tunesmith.models.builtin import smollm2_gguf

    config = load_config(ROOT / "examples" / "godrive" / "config.yaml", [])
    gguf = smollm2_gguf()
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    real = tokenize_many(tokenizer, load_examples(config.data.train_file, config.data), config.data, config.train)
    lengths = sorted(len(t["input_ids"]) for t in real)
    print(f"SmolLM2 lengths of {len(real)} goDrive examples: {lengths[0]}-{lengths[-1]}, "
          f"median {lengths[len(lengths) // 2]}")
    return [(t["input_ids"], t["labels"]) for t in (rng.choice(real) for _ in range(count))]


def timed(repeat: int, work) -> tuple[float, float, float, object]:
    """(first, best) wall seconds of `repeat` calls, the least CPU seconds of one, and the result. The first is
    what a training run pays: its fresh memory (about 800 MB of buffers for 200k examples) is faulted in for
    the first time. CPU seconds say what the work costs even where other work shares the cores."""
    times, cpu, result = [], [], None
    for _ in range(repeat):
        result = None  # free the last result first, as a single call would find the memory
        started, started_cpu = time.perf_counter(), time.process_time()
        result = work()
        times.append(time.perf_counter() - started)
        cpu.append(time.process_time() - started_cpu)
    return times[0], min(times), min(cpu), result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--examples", type=int, default=200_000)
    parser.add_argument("--lengths", choices=["qwen", "smollm2"], default="qwen")
    parser.add_argument("--seq-len", type=int, default=4096, help="tokens per buffer (the fast path's default)")
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    rng = random.Random(0)
    examples = (qwen_examples if args.lengths == "qwen" else smollm2_examples)(args.examples, rng)

    def place() -> list[list[int]]:
        lengths = sorted((len(ids) for ids, _ in examples), reverse=True)
        return best_fit(lengths, args.seq_len)

    placed_first, placed, placed_cpu, bins = timed(args.repeat, place)
    packed_first, packed, packed_cpu, batches = timed(args.repeat, lambda: pack(examples, args.seq_len))
    tokens = sum(len(ids) for ids, _ in examples)
    assert sum(b.num_tokens for b in batches) == tokens and len(batches) == len(bins)
    fill = tokens / (len(batches) * args.seq_len)
    lower = -(-tokens // args.seq_len)  # no packing can use fewer buffers
    import torch

    print(f"{args.examples} examples ({args.lengths} lengths, median "
          f"{statistics.median(len(ids) for ids, _ in examples):.0f} tokens), seq_len {args.seq_len}; "
          f"Python {platform.python_version()}, torch {torch.__version__}, {platform.machine()}, "
          f"{os.cpu_count()} cores, {args.repeat} runs")
    print("| step | first s | best s | CPU s | buffers | lower bound | fill |")
    print("|---|---|---|---|---|---|---|")
    print(f"| best_fit (placement only) | {placed_first:.2f} | {placed:.2f} | {placed_cpu:.2f} | {len(bins)} | {lower} "
          f"| {fill:.2%} |")
    print(f"| pack (placement + tensors) | {packed_first:.2f} | {packed:.2f} | {packed_cpu:.2f} | {len(batches)} | "
          f"{lower} | {fill:.2%} |")


if __name__ == "__main__":
    main()
