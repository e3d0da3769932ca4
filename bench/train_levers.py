"""CPU training speed of one config under several settings, interleaved: tokens/s of `tunesmith train` per variant.

    .venv/bin/python bench/train_levers.py --config examples/godrive/config.yaml --steps 30 --rounds 2 \
        --variant "shared prefix:train.share_prefix=true" --variant "padded:train.share_prefix=false" \
        --variant "packed:train.packing=true"

Each variant is a label and `--set` overrides (comma-separated). Every run is its own process with 2 fixed
threads, no eval passes and no checkpoints; the rounds run the variants in turn so drift on the machine hits
all of them alike. Prints each run's input tokens/s (metrics.jsonl's last line: real tokens, padding not
counted) and the median per variant against the first. Run it on a quiet machine.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path


def run(config: str, steps: int, sets: list[str], runs: Path, name: str) -> float:
    command = [sys.executable, "-m", "tunesmith.cli", "train", "-c", config, "--set", f"runs_dir={runs}",
               "--set", f"name={name}", "--set", "train.max_minutes=null", "--set", f"train.max_steps={steps}",
               "--set", "train.eval_steps=100000", "--set", "train.eval_accuracy=0", "--set", "train.save_steps=100000",
               "--set", "train.threads=2", "--set", "train.log_steps=5"]
    for setting in sets:
        command += ["--set", setting]
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    if done.returncode:
        raise SystemExit(f"{name} failed:\n{done.stderr[-2000:]}")
    lines = [json.loads(line) for line in (runs / name / "metrics.jsonl").read_text().splitlines()]
    return [line for line in lines if "tokens_per_second" in line][-1]["tokens_per_second"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="examples/godrive/config.yaml")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--variant", action="append", required=True, help="LABEL:key=value[,key=value]")
    args = parser.parse_args()
    variants = [(label, [s for s in sets.split(",") if s]) for label, _, sets in
                (v.partition(":") for v in args.variant)]
    results: dict[str, list[float]] = {label: [] for label, _ in variants}
    with tempfile.TemporaryDirectory() as tmp:
        for round_ in range(args.rounds):
            for index, (label, sets) in enumerate(variants):
                value = run(args.config, args.steps, sets, Path(tmp), f"r{round_}v{index}")
                results[label].append(value)
                print(f"round {round_ + 1} {label:24} {value:7.1f} tokens/s", flush=True)
    first = statistics.median(results[variants[0][0]])
    print(f"\n{args.config}, {args.steps} steps, 2 threads\n| variant | tokens/s (each round) | median | vs "
          f"{variants[0][0]} |\n|---|---|---|---|")
    for label, values in results.items():
        median = statistics.median(values)
        print(f"| {label} | {', '.join(f'{v:.0f}' for v in values)} | {median:.0f} | {median / first:.2f} |")


if __name__ == "__main__":
    main()
