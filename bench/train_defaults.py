"""Where a CPU training step goes with the default config, and the default config's tokens/s.

The workload a new user brings: 600 alpaca-shaped records of ~90 tokens (`examples/orders`, its first 600), the
built-in SmolLM2-135M, every training setting at its default (LoRA r=16 on 7 projections, batch 8, lr 2e-3,
`train.bf16: auto`, `train.gradient_checkpointing: auto`).

    .venv/bin/python bench/train_defaults.py --steps 40                 # tokens/s of `tunesmith train`, defaults
    .venv/bin/python bench/train_defaults.py --profile --steps 12       # checkpointing off vs on, step by step

`--profile` builds the model once, then alternates steps with gradient checkpointing off and on (one process,
interleaved, so a machine whose speed drifts affects both alike), times forward+backward and the optimizer step
separately, and prints torch.profiler's top operators for one step of each. The default mode runs the real
command (`tunesmith train`, defaults, `--set train.max_steps=N`) and reads tokens/s from its metrics.jsonl.
Both append what they measured to bench/RESULTS.md with the machine, versions and command. Time it on a quiet
machine only: on a busy one the figures say nothing.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from importlib import metadata
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RECORDS = 600


def _data(into: Path) -> Path:
    lines = (ROOT / "examples/orders/train.jsonl").read_text(encoding="utf-8").splitlines()[:RECORDS]
    path = into / "orders600.jsonl"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def _overrides(tmp: Path, data: Path, steps: int, base: str) -> list[str]:
    return [f"runs_dir={tmp}/runs", "name=defaults", f"data.train_file={data}", f"model.base={base}",
            f"train.max_steps={steps}", "train.log_steps=1", f"train.save_steps={steps}", f"train.eval_steps={steps}"]


def run_command(steps: int, base: str) -> dict:
    """`tunesmith train` with the defaults: input tokens/s as its metrics.jsonl reports them (from the first
    step's start), and the same over the steps after the first 5 (oneDNN picks kernels for new shapes early)."""
    with tempfile.TemporaryDirectory() as scratch:
        tmp = Path(scratch)
        command = [sys.executable, "-m", "tunesmith.cli", "train"]
        for override in _overrides(tmp, _data(tmp), steps, base):
            command += ["--set", override]
        done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, check=True,
                              env={**os.environ, "COLUMNS": "400"})  # rich wraps at the terminal width
        choice = next((line for line in done.stdout.splitlines() if "gradient checkpointing" in line), "")
        records = [json.loads(line) for line in (tmp / "runs/defaults/metrics.jsonl").read_text().splitlines()]
    steps_logged = [r for r in records if "loss" in r]
    return {"tokens_per_second": steps_logged[-1]["tokens_per_second"], "steps": len(steps_logged),
            "checkpointing": choice.strip()}


def profile(steps: int, base: str) -> dict:
    import torch
    from rich.console import Console

    from tunesmith.config import load_config
    from tunesmith.data import prepare
    from tunesmith.models import load_model, load_tokenizer, resolve_base
    from tunesmith.train import distributed
    from tunesmith.train.engines import HFEngine
    from tunesmith.train.loop import _optimizer
    from tunesmith.train.lora import apply_lora
    from tunesmith.train.loss import completion_loss, model_dtype, use_bf16

    with tempfile.TemporaryDirectory() as scratch:
        tmp = Path(scratch)
        config = load_config(None, _overrides(tmp, _data(tmp), steps, base))
        resolved = resolve_base(config.model.base)
        tokenizer = load_tokenizer(resolved)
        data = prepare(config, tokenizer)
    torch.manual_seed(config.train.seed)
    model = load_model(resolved, dtype=model_dtype(config, "cpu"))
    model.config.use_cache = False
    model = apply_lora(model, config.lora, config.train.seed)
    forward = distributed.wrap(model, completion_loss, distributed.ALONE, "cpu", False, use_bf16(config, "cpu"))
    optimizer = _optimizer(model, config, "cpu", Console(quiet=True))
    engine = HFEngine(model, data, config, "cpu", tokenizer.pad_token_id, optimizer, forward)

    def one_step(step: int, checkpointing: bool) -> tuple[float, int]:
        if checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        else:
            model.gradient_checkpointing_disable()
        model.train()
        started = time.perf_counter()
        _, _, inputs, _ = engine.step(step)
        return time.perf_counter() - started, inputs

    times: dict[bool, list[tuple[float, int]]] = {False: [], True: []}
    for step in range(2 * steps):  # the same batches in the same order for both: step k of each uses batch k
        checkpointing = bool(step % 2)
        times[checkpointing].append(one_step(step // 2, checkpointing))
    warm = 3  # the first steps of each carry oneDNN's kernel selection for new shapes
    result = {}
    for checkpointing, measured in times.items():
        kept = measured[warm:] or measured
        result["on" if checkpointing else "off"] = {
            "median_step_s": round(statistics.median(t for t, _ in kept), 3),
            "tokens_per_second": round(sum(n for _, n in kept) / sum(t for t, _ in kept), 1)}
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    for checkpointing in (False, True):
        with torch_profile(activities=[ProfilerActivity.CPU]) as prof:
            one_step(0, checkpointing)
        table = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=12)
        print(f"\n--- one step, gradient checkpointing {'on' if checkpointing else 'off'} ---\n{table}")
    return result


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--profile", action="store_true")
    parser.add_argument("--base", default="builtin:smollm2-135m", help="a smaller model checks the script runs")
    parser.add_argument("--no-record", action="store_true", help="print only; do not append to RESULTS.md")
    args = parser.parse_args()
    result = profile(args.steps, args.base) if args.profile else run_command(args.steps, args.base)
    print(json.dumps(result, indent=1))
    if args.no_record:
        return
    versions = ", ".join(f"{p} {metadata.version(p)}" for p in ("torch", "transformers", "peft"))
    load = os.getloadavg()[0]
    command = " ".join(["bench/train_defaults.py", *sys.argv[1:]])
    with open(ROOT / "bench/RESULTS.md", "a", encoding="utf-8") as results:
        results.write(f"\n### Default config on 600 orders records ({time.strftime('%Y-%m-%d %H:%M')})\n"
                      f"Machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, load average "
                      f"{load:.1f} at the end; {versions}. Command: `.venv/bin/python {command}`.\n\n"
                      f"```\n{json.dumps(result, indent=1)}\n```\n")


if __name__ == "__main__":
    main()
