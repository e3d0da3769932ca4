"""The Batcher alone, no HTTP: where a request's time to first token goes.

    .venv/bin/python bench/batcher_probe.py [--clients 8] [--duration 25]

N closed-loop clients (each sends its next request when the last ends) on bench/serve_load.py's GGUF and prompts,
greedy, 64 tokens, one llama.cpp thread. Prints time to first token (p50/p95) from submission and from admission
to a slot, every `llama_decode` shape (sequences, tokens) with its median and p95 milliseconds, and the share of
wall time spent inside `llama_decode`. A tool for finding where latency goes (issue 19), not a README figure.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import threading
import time
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

import llama_cpp
from serve_load import PROMPTS, bench_gguf, pct

from tunesmith.llama.batching import Batcher, Sequence, Stats
from tunesmith.serve.options import Options


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--duration", type=float, default=25.0)
    args = parser.parse_args()

    calls: list[tuple[int, int, float]] = []
    inside: list[float] = []
    decode = llama_cpp.llama_decode

    def timed_decode(ctx, batch):  # the batcher calls llama_cpp.llama_decode through the module: time each call
        started = time.perf_counter()
        rc = decode(ctx, batch)
        inside.append(time.perf_counter() - started)
        calls.append((0, batch.n_tokens, inside[-1]))
        return rc

    step = Batcher._decode

    def timed_step(self, entries):  # the number of sequences in the call
        step(self, entries)
        if calls:
            calls[-1] = (len(entries), *calls[-1][1:])

    llama_cpp.llama_decode = timed_decode
    Batcher._decode = timed_step
    batcher = Batcher(bench_gguf(), num_ctx=2048, parallel=args.clients, n_threads=1)
    opts = Options(temperature=0, num_predict=64, repeat_penalty=1.0)
    prompts = [batcher.tokenize(p) for p in PROMPTS]
    ttft: list[float] = []
    admitted_to_first: list[float] = []
    deadline = time.monotonic() + args.duration

    def client(index: int) -> None:
        n = index
        while time.monotonic() < deadline:
            done, first = threading.Event(), []

            def emit(item, first=first, done=done) -> None:
                if not first:
                    first.append(time.perf_counter_ns())
                if isinstance(item, (Stats, BaseException)):
                    done.set()

            seq = Sequence(prompts[n % len(prompts)], opts, batcher.sampler(opts), emit, threading.Event(), None, 64,
                           batcher.n_ctx)
            n += args.clients
            batcher.submit(seq)
            done.wait()
            ttft.append((first[0] - seq.submitted) / 1e9)
            admitted_to_first.append((seq.first_at - seq.admitted) / 1e9)

    started = time.monotonic()
    threads = [threading.Thread(target=client, args=(i,)) for i in range(args.clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    wall = time.monotonic() - started
    batcher.close()

    print(f"{len(ttft)} requests in {wall:.1f} s; llama_decode {sum(inside) / wall:.1%} of the wall time")
    print(f"time to first token p50 {pct(ttft, 0.5):.3f} s, p95 {pct(ttft, 0.95):.3f} s; from admission p50 "
          f"{pct(admitted_to_first, 0.5):.3f} s, p95 {pct(admitted_to_first, 0.95):.3f} s")
    shapes: dict[tuple[int, int], list[float]] = defaultdict(list)
    for sequences, tokens, seconds in calls:
        shapes[(sequences, tokens)].append(seconds)
    print("| sequences | tokens | calls | median ms | p95 ms |\n|---|---|---|---|---|")
    for (sequences, tokens), seconds in sorted(shapes.items()):
        if len(seconds) >= 3:
            print(f"| {sequences} | {tokens} | {len(seconds)} | {statistics.median(seconds) * 1000:.1f} | "
                  f"{pct(seconds, 0.95) * 1000:.1f} |")


if __name__ == "__main__":
    main()
