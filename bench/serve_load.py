"""Concurrent streaming clients on `tunesmith serve` against llama.cpp's own `llama-server`, in one command.

    .venv/bin/python bench/serve_load.py [--clients 1,4,8,16] [--duration 30] [--num-predict 64] [--threads N]
                                         [--rounds R] [--no-append]

Both servers get the same GGUF (SmolLM2-135M-Instruct q8_0, made from the built-in model), the same thread
count, the same prompts (ChatML-rendered, sent raw) and greedy decoding without repeat penalty. For each client
count N, tunesmith with `serve.parallel N` and `llama-server -np N` each serve N clients that stream one request
after another for --duration seconds. Reported per row: aggregate tokens/s (every sampled token of every stream,
the end-of-generation token included, over the wall time), p50/p95 time to first token, requests completed, and
how many answers differ from that prompt's answer decoded alone on the same server (recorded first, one request
at a time). With --rounds R both servers stay up and serve the load in turns, R times each (the order swapped
every round); a row pools its rounds, and the notes list tunesmith's tokens/s over llama-server's round by
round, with their median, and the same for p95 time to first token; at 1 client each round also runs
llama-cpp-python alone, and the notes give tunesmith's tokens/s over it by round. Two more rows: tunesmith with
`serve.parallel 1` (one sequence at a time, as before batching) at the largest client count up to 8, and
llama-cpp-python alone on one stream (no server).

llama-server is built from the pinned source distribution on first use (bench/llama_server.py, minutes), the
GGUF likewise (materialize, convert, quantize). The table is appended to bench/RESULTS.md. Time it on a quiet
machine only: the load average before and after goes into the table.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from tunesmith import paths
from tunesmith.serve import gguf_meta
from tunesmith.serve.known_templates import CHATML
from tunesmith.serve.prompt import build_prompt
from tunesmith.serve.store import Manifest, Store

QUESTIONS = [
    "What is the capital of France?", "Give me three tips for driving in the rain.",
    "Explain what a roundabout is.", "Write a haiku about traffic lights.",
    "What should I do at a yellow light?", "Describe how to merge onto a highway.",
    "What is the speed of light?", "Name three colors of the rainbow.",
    "How do I check the oil level in a car?", "Why do cars have seat belts?",
    "What does a stop sign look like?", "How far should I stay behind the car in front?",
    "What is a hybrid car?", "When should I use high beams?",
    "How do I parallel park?", "What is the boiling point of water?",
]
PROMPTS = [build_prompt(CHATML, [{"role": "user", "content": q}]) for q in QUESTIONS]
MODEL = "bench"
NUM_CTX = 2048


@dataclass
class Answer:
    text: str
    tokens: int
    """Sampled tokens, the end-of-generation token included."""
    ttft: float


@dataclass
class Load:
    answers: list[tuple[int, Answer]] = field(default_factory=list)
    broken: list[str] = field(default_factory=list)
    wall: float = 0.0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def bench_gguf() -> Path:
    """SmolLM2-135M-Instruct as q8_0, from the built-in checkpoint (cached in $TUNESMITH_HOME/bench)."""
    from tunesmith.export.convert import convert_checkpoint
    from tunesmith.export.quantize import quantize
    from tunesmith.models import resolve_base

    folder = paths.home() / "bench"
    folder.mkdir(parents=True, exist_ok=True)
    q8 = folder / "smollm2-135m.q8_0.gguf"
    if not q8.exists():
        f16 = folder / "smollm2-135m.f16.gguf"
        if not f16.exists():
            convert_checkpoint(resolve_base("builtin:smollm2-135m"), f16, "f16")
        quantize(f16, q8, "q8_0")
    return q8


def wait_ready(url: str, path: str, proc: subprocess.Popen[bytes], log: Path) -> None:
    for _ in range(600):
        if proc.poll() is not None:
            raise SystemExit(f"server exited with {proc.returncode}; its log: {log}")
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(url + path, timeout=2).status_code == 200:
                return
        time.sleep(0.2)
    raise SystemExit(f"server did not come up; its log: {log}")


# ---------------------------------------------------------------------- the two servers


class Server:
    name: str
    url: str

    async def ask(self, client: httpx.AsyncClient, prompt: str, num_predict: int) -> Answer:
        raise NotImplementedError


class Tunesmith(Server):
    """/api/generate, raw prompt, streamed NDJSON."""

    def __init__(self, url: str, parallel: int):
        self.url = url
        self.name = f"tunesmith serve.parallel {parallel}"

    async def ask(self, client: httpx.AsyncClient, prompt: str, num_predict: int) -> Answer:
        body = {"model": MODEL, "prompt": prompt, "raw": True, "stream": True,
                "options": {"num_predict": num_predict, "temperature": 0, "repeat_penalty": 1.0}}
        started = time.monotonic()
        first = None
        text = []
        async with client.stream("POST", self.url + "/api/generate", json=body) as response:
            if response.status_code != 200:
                raise ValueError(f"HTTP {response.status_code}: {(await response.aread())[:200]!r}")
            async for line in response.aiter_lines():
                chunk = json.loads(line)
                if "error" in chunk:
                    raise ValueError(chunk["error"])
                if chunk.get("response"):
                    first = first if first is not None else time.monotonic() - started
                    text.append(chunk["response"])
                if chunk.get("done"):
                    # eval_count leaves out the end-of-generation token; llama-server counts it.
                    tokens = chunk.get("eval_count", 0) + (chunk.get("done_reason") == "stop")
                    return Answer("".join(text), tokens, first if first is not None else time.monotonic() - started)
        raise ValueError("stream ended without done: true")


class LlamaServer(Server):
    """llama-server's own /completion, raw prompt, streamed server-sent events."""

    def __init__(self, url: str, parallel: int):
        self.url = url
        self.name = f"llama-server -np {parallel}"

    async def ask(self, client: httpx.AsyncClient, prompt: str, num_predict: int) -> Answer:
        body = {"prompt": prompt, "n_predict": num_predict, "stream": True, "temperature": 0,
                "repeat_penalty": 1.0, "cache_prompt": True}
        started = time.monotonic()
        first = None
        text = []
        async with client.stream("POST", self.url + "/completion", json=body) as response:
            if response.status_code != 200:
                raise ValueError(f"HTTP {response.status_code}: {(await response.aread())[:200]!r}")
            async for line in response.aiter_lines():
                if not line.startswith("data: "):
                    continue
                event = json.loads(line.removeprefix("data: "))
                if event.get("content"):
                    first = first if first is not None else time.monotonic() - started
                    text.append(event["content"])
                if event.get("stop"):
                    tokens = event.get("timings", {}).get("predicted_n", event.get("tokens_predicted", 0))
                    return Answer("".join(text), tokens, first if first is not None else time.monotonic() - started)
        raise ValueError("stream ended without a stop event")


@contextlib.contextmanager
def tunesmith_server(home: Path, parallel: int, logs: Path) -> Iterator[Server]:
    port = free_port()
    log = logs / f"tunesmith-p{parallel}.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "tunesmith.app", "--port", str(port),
                                 "--set", f"serve.parallel={parallel}", "--set", "serve.max_queue=1024",
                                 "--set", f"serve.num_ctx={NUM_CTX}"],
                                # PYTHONPATH: the server of this checkout, whatever the venv has installed
                                env={**os.environ, "TUNESMITH_HOME": str(home),
                                     "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT),
                                                                                 os.environ.get("PYTHONPATH")]))},
                                stdout=out, stderr=out)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_ready(url, "/", proc, log)
        httpx.post(url + "/api/generate", json={"model": MODEL, "prompt": ""}, timeout=300)  # load it
        yield Tunesmith(url, parallel)
    finally:
        proc.terminate()
        proc.wait(timeout=60)


@contextlib.contextmanager
def llama_server(binary: Path, gguf: Path, parallel: int, threads: int, logs: Path) -> Iterator[Server]:
    port = free_port()
    log = logs / f"llama-server-np{parallel}.log"
    # The settings tunesmith's engine uses: per-sequence caches of NUM_CTX, flash attention, 512-token
    # batches, no weight repacking (tunesmith leaves llama.cpp's extra buffer types off).
    with open(log, "wb") as out:
        proc = subprocess.Popen([str(binary), "-m", str(gguf), "--host", "127.0.0.1", "--port", str(port),
                                 "-np", str(parallel), "-c", str(NUM_CTX * parallel), "-t", str(threads),
                                 "-tb", str(threads), "-fa", "on", "-b", "512", "-ub", "512", "--no-repack",
                                 "--no-webui"], stdout=out, stderr=out)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_ready(url, "/health", proc, log)
        yield LlamaServer(url, parallel)
    finally:
        proc.terminate()
        proc.wait(timeout=60)


# ---------------------------------------------------------------------- load


async def reference(server: Server, num_predict: int) -> list[Answer]:
    """Every prompt decoded alone, one request at a time."""
    async with httpx.AsyncClient(timeout=None) as client:
        return [await server.ask(client, prompt, num_predict) for prompt in PROMPTS]


async def load(server: Server, clients: int, duration: float, num_predict: int) -> Load:
    out = Load()
    started = time.monotonic()
    deadline = started + duration

    async def client_loop(index: int) -> None:
        async with httpx.AsyncClient(timeout=None) as client:
            n = index
            while time.monotonic() < deadline:
                which = n % len(PROMPTS)
                n += clients
                try:
                    out.answers.append((which, await server.ask(client, PROMPTS[which], num_predict)))
                except (ValueError, httpx.HTTPError) as exc:
                    out.broken.append(f"{type(exc).__name__}: {exc}")

    await asyncio.gather(*(client_loop(i) for i in range(clients)))
    out.wall = time.monotonic() - started
    return out


def direct(gguf: Path, threads: int, duration: float, num_predict: int) -> Load:
    """llama-cpp-python alone on one stream: the same prompts and settings, no server in between."""
    import llama_cpp

    from tunesmith.llama.load import open_llama

    llama = open_llama(gguf, n_ctx=NUM_CTX, n_threads=threads, flash_attn=True)
    vocab = llama_cpp.llama_model_get_vocab(llama.model)
    out = Load()
    started = time.monotonic()
    n = 0
    while time.monotonic() - started < duration:
        which = n % len(PROMPTS)
        n += 1
        t0 = time.monotonic()
        first = None
        pieces = b""
        count = 0
        for token in llama.generate(llama.tokenize(PROMPTS[which].encode(), add_bos=True, special=True),
                                    temp=0.0, repeat_penalty=1.0, reset=True):
            first = first if first is not None else time.monotonic() - t0
            count += 1
            if llama_cpp.llama_vocab_is_eog(vocab, token):
                break
            pieces += llama.detokenize([token])
            if count >= num_predict:
                break
        out.answers.append((which, Answer(pieces.decode(errors="ignore"), count, first or 0.0)))
    out.wall = time.monotonic() - started
    llama.close()
    return out


# ---------------------------------------------------------------------- report


def pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def p95_ttft(result: Load) -> float:
    return pct([answer.ttft for _, answer in result.answers], 0.95)


def rate(result: Load) -> float:
    return sum(a.tokens for _, a in result.answers) / result.wall


def pooled(results: list[Load]) -> Load:
    """Several rounds as one: every answer, and the wall time summed (tokens/s over all rounds)."""
    out = Load()
    for result in results:
        out.answers += result.answers
        out.broken += result.broken
        out.wall += result.wall
    return out


def row(clients: int, name: str, result: Load, refs: list[Answer] | None) -> str:
    tokens = sum(a.tokens for _, a in result.answers)
    ttft = [a.ttft for _, a in result.answers]
    differ = "–" if refs is None else f"{sum(a.text != refs[i].text for i, a in result.answers)}"
    broken = f" ({len(result.broken)} failed)" if result.broken else ""
    return (f"| {clients} | {name} | {tokens / result.wall:.1f} | {pct(ttft, 0.5):.3f} | {pct(ttft, 0.95):.3f} "
            f"| {len(result.answers)}{broken} | {differ} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", default="1,4,8,16", help="comma-separated concurrent client counts")
    parser.add_argument("--duration", type=float, default=30.0, help="seconds of load per row")
    parser.add_argument("--num-predict", type=int, default=64)
    parser.add_argument("--threads", type=int, default=0,
                        help="llama.cpp threads for both servers (default: tunesmith's own, half the cores)")
    parser.add_argument("--rounds", type=int, default=1,
                        help="load each server this many times per client count, in turns (rows pool them)")
    parser.add_argument("--no-append", action="store_true", help="print only; do not append to bench/RESULTS.md")
    args = parser.parse_args()
    # A SIGTERM (timeout, kill) unwinds like Ctrl-C, so the servers started here are stopped too.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    levels = [int(c) for c in args.clients.split(",")]

    import llama_cpp
    from llama_server import ensure_built

    from tunesmith.llama.load import default_threads

    threads = args.threads or default_threads()
    binary = ensure_built()
    gguf = bench_gguf()
    home = Path(tempfile.mkdtemp(prefix="tunesmith-bench-"))
    logs = home / "logs"
    logs.mkdir()
    store = Store(home / "models")
    store.write(MODEL, Manifest(model=store.add_file(gguf), template=CHATML, details=gguf_meta.details(gguf),
                                parameters={"num_thread": threads}))
    load_before = os.getloadavg()
    rows = []
    mismatches = {}
    # Single-stream answers of each server: what every concurrent answer is compared with.
    with tunesmith_server(home, 1, logs) as server:
        ts_refs = asyncio.run(reference(server, args.num_predict))
        before = max([c for c in levels if c <= 8] or [levels[0]])
        rows.append(row(before, server.name + " (one sequence at a time)",
                        asyncio.run(load(server, before, args.duration, args.num_predict)), ts_refs))
    with llama_server(binary, gguf, 1, threads, logs) as server:
        ls_refs = asyncio.run(reference(server, args.num_predict))
    mismatches["tunesmith vs llama-server, single-stream answers"] = sum(
        a.text != b.text for a, b in zip(ts_refs, ls_refs, strict=True))
    rows.append(row(1, "llama-cpp-python alone (no server)", direct(gguf, threads, args.duration, args.num_predict),
                    None))
    ratios = []
    for clients in levels:
        # Both servers up at once and loaded in turn, the order swapped every round: a slow minute of a shared
        # machine then falls on both, and the ratio of each round is a like-for-like pair.
        with tunesmith_server(home, clients, logs) as ts, llama_server(binary, gguf, clients, threads, logs) as ls:
            runs: dict[str, list[Load]] = {ts.name: [], ls.name: []}
            alone: list[Load] = []
            for r in range(args.rounds):
                for server in (ts, ls) if r % 2 == 0 else (ls, ts):
                    runs[server.name].append(asyncio.run(load(server, clients, args.duration, args.num_predict)))
                if clients == 1:  # the 1-client target is llama-cpp-python alone: measured in the same round
                    alone.append(direct(gguf, threads, args.duration, args.num_predict))
            for server, refs in ((ts, ts_refs), (ls, ls_refs)):
                rows.append(row(clients, server.name, pooled(runs[server.name]), refs))
            pairs = list(zip(runs[ts.name], runs[ls.name], strict=True))
            speed = [rate(a) / rate(b) for a, b in pairs]
            tail = [p95_ttft(a) / p95_ttft(b) for a, b in pairs]
            # The median of the round-by-round ratios: each round is a like-for-like pair a minute apart, so a
            # slow minute of the shared machine moves one pair, not the verdict.
            ratios.append(f"- {clients} clients: tunesmith / llama-server tokens/s by round: "
                          + ", ".join(f"{x:.3f}" for x in speed) + f" (median {statistics.median(speed):.3f}); "
                          + "TTFT p95 by round: " + ", ".join(f"{x:.3f}" for x in tail)
                          + f" (median {statistics.median(tail):.3f})")
            if alone:
                bare = [rate(a) / rate(b) for a, b in zip(runs[ts.name], alone, strict=True)]
                ratios.append("- 1 client: tunesmith / llama-cpp-python alone tokens/s by round: "
                              + ", ".join(f"{x:.3f}" for x in bare) + f" (median {statistics.median(bare):.3f})")
    load_after = os.getloadavg()

    header = ("| clients | server | tokens/s (all streams) | TTFT p50 s | TTFT p95 s | requests "
              "| answers differing from single-stream |\n|---|---|---|---|---|---|---|")
    table = header + "\n" + "\n".join(rows)
    notes = "\n".join([*(f"- {k}: {v} of {len(PROMPTS)} prompts differ" for k, v in mismatches.items()),
                       *(ratios if args.rounds > 1 else [])])
    print(table)
    print(notes)
    print(f"load average before {load_before[0]:.2f}, after {load_after[0]:.2f}; server logs in {logs}")
    command = " ".join(["bench/serve_load.py", *sys.argv[1:]])
    if args.no_append:
        return
    section = (
        f"\n## serve_load: tunesmith vs llama-server ({time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())})\n\n"
        f"Machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, no GPU; load average "
        f"{load_before[0]:.2f} before, {load_after[0]:.2f} after. Python {platform.python_version()}, "
        f"llama-cpp-python {llama_cpp.__version__} (llama-server built from its sdist with the Makefile's "
        f"LLAMA_CMAKE_ARGS), SmolLM2-135M-Instruct q8_0, {threads} llama.cpp thread(s), num_ctx {NUM_CTX} per "
        f"sequence, flash attention on, greedy, num_predict {args.num_predict}, {len(PROMPTS)} prompts, "
        f"{args.duration:.0f} s per row and round, {args.rounds} round(s).\nCommand: `.venv/bin/python {command}`\n\n{table}\n\n{notes}\n"
    )
    results = ROOT / "bench" / "RESULTS.md"
    with open(results, "a", encoding="utf-8") as f:
        f.write(section)
    print(f"appended to {results}")


if __name__ == "__main__":
    main()
