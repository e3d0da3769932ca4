"""`tunesmith train` on 1 and 2 GPUs through the real CLI (issue 9): DDP, the fast path, FSDP2, kill and resume.

Each configuration trains the Qwen3-0.6B architecture (random weights, bf16, the SmolLM2 tokenizer so that no
hub is needed) on goDrive examples with the same global batch on 1 and on 2 GPUs, and compares:
- the loss curves (max relative difference at each logged step; bf16, so rounding-level differences are expected),
- that both ranks ended with the same adapter (run.json's per-rank sha256 of the trained weights),
- the trained tokens/s the run itself reports (includes start-up and CUDA-graph capture: the throughput figure
  of record is `bench/train_gpu.py --scaling`),
- for `resume`: a 2-GPU run SIGKILLed (whole process group) once its first checkpoint exists, then
  `tunesmith train --resume`, against the uninterrupted 2-GPU run: same curve after the resume point, same
  adapter.

    python bench/multi_gpu.py --tokenizer DIR --work /tmp/mg --runs fast,hf,fsdp,resume,resume-fast --json out.json

Prints a markdown table last.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import yaml

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))

from train_gpu import QWEN3_06B  # the issue 8 workload's model shape

DEVICE: dict[str, dict] = {"train": {}}
TIMEOUT = 240  # seconds a single training run may take


def make_model(path: Path, tokenizer_dir: Path) -> Path:
    """The Qwen3-0.6B architecture, random bf16 weights, with the SmolLM2 tokenizer (its ids fit the vocab)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, Qwen3Config

    if (path / "config.json").exists():
        return path
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    torch.manual_seed(0)
    cfg = Qwen3Config(**{**QWEN3_06B, "bos_token_id": tokenizer.bos_token_id,
                         "eos_token_id": tokenizer.eos_token_id})
    cfg.architectures = ["Qwen3ForCausalLM"]
    AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def write_config(work: Path, name: str, model: Path, train: dict) -> Path:
    config = {
        "name": name,
        "runs_dir": str(work / "runs"),
        "model": {"base": str(model)},
        "data": {"train_file": str(work / "train.jsonl"), "eval_fraction": 0.02,
                 "system_prompt": "你是驾驶教练，根据车辆特征给出指令。"},
        "train": {**DEVICE["train"], "bf16": "device" not in DEVICE["train"], "learning_rate": 2e-4, "log_steps": 5, "eval_steps": 1000, "save_steps": 1000,
                  "gradient_checkpointing": False, **train},
    }
    path = work / f"{name}.yaml"
    path.write_text(yaml.safe_dump(config, allow_unicode=True))
    return path


def command(config: Path, gpus: int, resume: bool = False) -> list[str]:
    return [sys.executable, "-m", "tunesmith.cli", "train", "-c", str(config),
            *(["--gpus", str(gpus)] if gpus > 1 else []), *(["--resume"] if resume else [])]


def train(work: Path, name: str, model: Path, gpus: int, train_cfg: dict, log) -> dict:
    config = write_config(work, name, model, train_cfg)
    shutil.rmtree(work / "runs" / name, ignore_errors=True)
    t0 = time.perf_counter()
    log.write(f"==== {name} ({gpus} GPU)\n")
    log.flush()
    try:  # output straight to the log, so that a run killed at the timeout still leaves it there
        proc = subprocess.run(command(config, gpus), check=False, cwd=ROOT, stdout=log, stderr=log,
                              timeout=TIMEOUT)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {TIMEOUT} s"}
    return result(work / "runs" / name, proc.returncode, time.perf_counter() - t0, "")


def train_killed_and_resumed(work: Path, name: str, model: Path, gpus: int, train_cfg: dict, log) -> dict:
    """Start, SIGKILL the whole process group as soon as the first checkpoint is complete, then --resume."""
    config = write_config(work, name, model, train_cfg)
    run = work / "runs" / name
    shutil.rmtree(run, ignore_errors=True)
    t0 = time.perf_counter()
    proc = subprocess.Popen(command(config, gpus), cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)
    killed_at = None
    while proc.poll() is None and time.perf_counter() - t0 < 300:
        done = sorted((run / "checkpoints").glob("step-*/trainer_state.json")) if (run / "checkpoints").exists() else []
        if done:
            killed_at = json.loads(done[0].read_text())["step"]
            os.killpg(proc.pid, signal.SIGKILL)
            break
        time.sleep(0.2)
    out = proc.communicate()[0]
    log.write(f"==== {name} first part, killed at step {killed_at}\n{out}\n")
    log.write(f"==== {name} resumed\n")
    log.flush()
    try:
        resumed = subprocess.run(command(config, gpus, resume=True), check=False, cwd=ROOT, capture_output=True,
                                 text=True, timeout=TIMEOUT)
    except subprocess.TimeoutExpired:
        return {"error": f"resume timed out after {TIMEOUT} s"}
    log.write(f"{resumed.stdout}\n{resumed.stderr}\n")
    out = result(run, resumed.returncode, time.perf_counter() - t0, resumed.stderr)
    out["killed_at"] = killed_at
    out["resumed_from"] = next((line for line in resumed.stdout.splitlines() + resumed.stderr.splitlines()
                                if line.startswith("resuming")), "")[:80]
    return out


def result(run: Path, rc: int, seconds: float, stderr: str) -> dict:
    if rc or not (run / "run.json").exists():
        tail = [line for line in stderr.strip().splitlines() if line.strip()][-3:]
        return {"error": " | ".join(tail)[-300:] or f"exit {rc}; see the log"}
    record = json.loads((run / "run.json").read_text())
    lines = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    final = record.get("final_metrics") or record.get("final") or {}
    return {"seconds": round(seconds, 1), "curve": [(x["step"], x["loss"]) for x in lines if "loss" in x],
            "tokens_per_s": final.get("trained_tokens_per_second"), "digests": final.get("rank_weight_sha256"),
            "final": final, "adapter": str(run / "adapter" / "adapter_model.safetensors")}


def compare(a: dict, b: dict) -> dict:
    """How far apart two runs ended: loss curves (relative, at common steps) and adapters (relative norm)."""
    from safetensors.torch import load_file

    if "curve" not in a or "curve" not in b:
        return {}
    ca, cb = dict(a["curve"]), dict(b["curve"])
    steps = sorted(set(ca) & set(cb))
    gap = max((abs(ca[s] - cb[s]) / abs(cb[s]) for s in steps), default=float("nan"))
    wa, wb = load_file(a["adapter"]), load_file(b["adapter"])
    rel = max(float((wa[k].float() - wb[k].float()).norm() / wb[k].float().norm().clamp_min(1e-12)) for k in wb)
    return {"steps_compared": len(steps), "max_rel_loss_diff": gap, "max_rel_adapter_diff": rel}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokenizer", required=True, type=Path)
    ap.add_argument("--work", default=Path("/tmp/multi_gpu"), type=Path)
    ap.add_argument("--runs", default="fast,hf,fsdp,resume,resume-fast")
    ap.add_argument("--examples", type=int, default=3000, help="goDrive training examples used")
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--model", type=Path, help="an existing checkpoint instead of the random Qwen3-0.6B")
    ap.add_argument("--device", default="cuda", help="cpu: 2 gloo processes, to check this script without GPUs")
    ap.add_argument("--json", type=Path)
    ap.add_argument("--log", type=Path)
    a = ap.parse_args()
    a.work.mkdir(parents=True, exist_ok=True)
    lines = (ROOT / "examples/godrive/train.jsonl").read_text(encoding="utf-8").splitlines()[:a.examples]
    (a.work / "train.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    model = a.model or make_model(a.work / "qwen3-0.6b-random", a.tokenizer)
    DEVICE["train"] = {"device": a.device} if a.device != "cuda" else {}
    log = open(a.log or a.work / "multi_gpu.log", "a")  # noqa: SIM115  (open for the whole run, closed at exit)
    steps = a.steps
    plans = {
        # same global batch: 1 GPU takes grad_accum 2 (fast: 2 buffers) or batch 16; 2 GPUs half each
        "fast": [("fast-1", 1, {"fast": True, "grad_accum": 2, "max_steps": steps}),
                 ("fast-2", 2, {"fast": True, "grad_accum": 1, "max_steps": steps})],
        "hf": [("hf-1", 1, {"fast": False, "batch_size": 16, "max_steps": steps}),
               ("hf-2", 2, {"fast": False, "batch_size": 8, "max_steps": steps})],
        "fsdp": [("fsdp-2", 2, {"fast": False, "fsdp": True, "batch_size": 8, "max_steps": steps})],
    }
    results: dict[str, dict] = {}
    for group in a.runs.split(","):
        for name, gpus, cfg in plans.get(group, []):
            results[name] = {"gpus": gpus, **train(a.work, name, model, gpus, cfg, log)}
            print(name, {k: v for k, v in results[name].items() if k not in ("curve", "final", "adapter")},
                  flush=True)
        if group in ("resume", "resume-fast"):
            # log every 4 steps, checkpoint every 3: a logged window spans the kill, so a resumed curve only
            # matches if the checkpoint carried the loss summed since the last log
            cfg = {"fast": group == "resume-fast", "max_steps": steps // 2, "save_steps": 3, "log_steps": 4,
                   **({"grad_accum": 1} if group == "resume-fast" else {"batch_size": 8})}
            ref, killed = f"{group}-ref", f"{group}-2"
            results[ref] = {"gpus": 2, **train(a.work, ref, model, 2, cfg, log)}
            results[killed] = {"gpus": 2, **train_killed_and_resumed(a.work, killed, model, 2, cfg, log)}
    comparisons = {
        "fast-2 vs fast-1": ("fast-2", "fast-1"), "hf-2 vs hf-1": ("hf-2", "hf-1"),
        "fsdp-2 vs hf-1": ("fsdp-2", "hf-1"), "resume-2 vs resume-ref": ("resume-2", "resume-ref"),
        "resume-fast-2 vs resume-fast-ref": ("resume-fast-2", "resume-fast-ref"),
    }
    header = ("| run | GPUs | s (wall) | trained tok/s | ranks' adapters equal | vs | max rel loss diff "
              "| max rel adapter diff |")
    rows = [header, "|---|---|---|---|---|---|---|---|"]
    for label, (x, y) in comparisons.items():
        if x not in results:
            continue
        r = results[x]
        if "error" in r:
            rows.append(f"| {x} | {r['gpus']} | ERROR {r['error']} | | | | | |")
            continue
        c = compare(r, results.get(y, {})) if "error" not in results.get(y, {"error": 1}) else {}
        results[label] = c
        digests = r.get("digests") or []
        equal = bool(digests) and len(set(digests)) == 1
        rows.append(f"| {x} | {r['gpus']} | {r['seconds']} | {r['tokens_per_s']} | {equal} ({len(digests)}) | {y} | "
                    f"{c.get('max_rel_loss_diff', float('nan')):.2e} | {c.get('max_rel_adapter_diff', float('nan')):.2e} |")
    for name in ("fast-1", "hf-1", "resume-ref", "resume-fast-ref"):
        if name in results and "error" not in results[name]:
            r = results[name]
            rows.append(f"| {name} | 1 | {r['seconds']} | {r['tokens_per_s']} | | | | |" if r["gpus"] == 1 else
                        f"| {name} | 2 | {r['seconds']} | {r['tokens_per_s']} | | | | |")
    for name in ("resume-2", "resume-fast-2"):
        if name in results:
            rows.append(f"\n{name}: killed at step {results[name].get('killed_at')}; "
                        f"{results[name].get('resumed_from', '')}; curve {results[name].get('curve')}")
    table = "\n".join(rows)
    if a.json:
        a.json.write_text(json.dumps(results, indent=1, default=str))
    print(table)


if __name__ == "__main__":
    main()
