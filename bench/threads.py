"""CPU training beside another busy process: tokens/s quiet and with a one-core hog, interleaved, per config.

    .venv/bin/python bench/threads.py --steps 40 --rounds 2

For each config (goDrive's, and README's "Your own data and model" block on examples/address) and each round it
runs `tunesmith train` for --steps steps three ways, one after the other: quiet with `train.threads: auto`; with a
single-threaded busy process (`python -c "while True: pass"`) started together with training and killed after it,
`auto` (the thread governor, train/threads.py, sees the busy core and the batch goes on in two parts at once, one
thread each: train/workers.py); and the same hog with 1 fixed thread (what the governor did before the parts). It
prints each run's input tokens/s (metrics.jsonl's last line) and the ratio to quiet `auto` per config (median over
rounds). Run it on a quiet machine: every other process shows up in every number.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CONFIGS = {"goDrive": ROOT / "examples/godrive/config.yaml", "default (address)": ROOT / "examples/address/config.yaml"}
WAYS = (("quiet, auto", False, "auto"), ("hog, auto", True, "auto"), ("hog, 1 thread", True, "1"))


def run(config: Path, steps: int, hog: bool, threads: str, runs: Path, name: str) -> float:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    command = [sys.executable, "-m", "tunesmith.cli", "train", "-c", str(config), "--set", f"runs_dir={runs}",
               "--set", f"name={name}", "--set", "train.max_minutes=null", "--set", f"train.max_steps={steps}",
               "--set", "train.eval_steps=100000", "--set", "train.eval_accuracy=0", "--set", "train.save_steps=100000",
               "--set", f"train.threads={threads}", "--set", "train.log_steps=5"]
    busy = subprocess.Popen([sys.executable, "-c", "while True: pass"]) if hog else None
    try:
        done = subprocess.run(command, env=env, capture_output=True, text=True, check=False)
    finally:
        if busy is not None:
            busy.kill()
            busy.wait()
    if done.returncode:
        raise SystemExit(f"{name} failed:\n{done.stderr[-2000:]}")
    lines = [json.loads(line) for line in (runs / name / "metrics.jsonl").read_text().splitlines()]
    changes = [line for line in done.stdout.splitlines() if "compute threads:" in line]
    print(f"  {name}: {changes[:3]}", flush=True)
    return [line for line in lines if "tokens_per_second" in line][-1]["tokens_per_second"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--only", choices=list(CONFIGS), help="one config")
    args = parser.parse_args()
    results: dict[tuple[str, str], list[float]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for round_ in range(args.rounds):
            for label, config in CONFIGS.items():
                if args.only and label != args.only:
                    continue
                for way, hog, threads in WAYS:
                    name = f"r{round_}-{label.split()[0]}-{way.replace(' ', '').replace(',', '-')}"
                    value = run(config, args.steps, hog, threads, Path(tmp), name)
                    results.setdefault((label, way), []).append(value)
                    print(f"round {round_ + 1} {label:18} {way:15} {value:7.1f} tokens/s", flush=True)
    print("\n| config | way | tokens/s (each round) | median | vs quiet |\n|---|---|---|---|---|")
    for (label, way), values in results.items():
        quiet = statistics.median(results[(label, WAYS[0][0])])
        median = statistics.median(values)
        print(f"| {label} | {way} | {', '.join(f'{v:.0f}' for v in values)} | {median:.0f} | {median / quiet:.2f} |")


if __name__ == "__main__":
    main()
