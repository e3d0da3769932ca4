"""The article's whole training run, timed as a user waits: `tunesmith train` for 5 epochs beside the article's
own recipe (Unsloth FastLanguageModel + TRL SFTTrainer), on one GPU, in one command.

Data: 7,799 sequences with goDrive's lengths under the Qwen tokenizer (../shared/bench/godrive_qwen_lengths.json,
129-154 tokens), random tokens; the Qwen3-0.6B architecture with random weights; LoRA r=16 alpha=16 on the seven
projections; every token trained (the recipe's SFTTrainer trains all tokens of an input_ids data set, so
tunesmith gets `train.loss_on: all`); the article's lr 2e-4 and weight decay 0.01, 5 epochs, no eval split.

- tunesmith: `python -m tunesmith.cli train --config ...` on those sequences as an input/output data set
  (random_tokens.py), timed whole: from starting the command to its exit with the adapter saved. Imports, data
  checks and tokenizing, model load, packing, compilation, CUDA graphs and tunesmith's default checkpoints
  (train.save_steps 50) are all inside that time.
- the article's recipe (../shared/bench/article_recipe.py, its notebook defaults: batch 2 x grad_accum 4,
  adamw_8bit, Unsloth's gradient checkpointing) needs ~95 minutes for 5 epochs, more than one device command
  may run. It runs `--article-epochs` of an epoch (0.05: 49 optimizer steps), and its 5-epoch wall time is
  EXTRAPOLATED: its own setup time (imports, model load, data) + its steady step time (after step 20) x 4,875
  steps (975 an epoch) + its save time. Its first 20 steps are slower than the steady ones, so this slightly
  flatters the recipe.

    UNSLOTH_SITE=/tmp/site python bench/article_run.py --recipe ../shared/bench/article_recipe.py \\
        --lengths ../shared/bench/godrive_qwen_lengths.json --json out.json
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))

import random_tokens

ARTICLE_BATCH, ARTICLE_ACCUM = 2, 4


def run_tunesmith(a, work: Path, low_memory: bool) -> dict:
    from train_gpu import make_model_dir

    lengths = json.loads(Path(a.lengths).read_text())
    make_model_dir(a.model)
    base = random_tokens.with_word_tokenizer(a.model, work / "base")
    data = work / "train.jsonl"
    trained = random_tokens.write_records(data, random_tokens.random_sequences(lengths))
    config = {
        "name": "article5", "runs_dir": str(work / "runs"), "model": {"base": str(base)},
        "data": {"train_file": str(data), "eval_fraction": 0.0},
        "train": {"epochs": a.epochs, "learning_rate": 2e-4, "weight_decay": 0.01, "loss_on": "all",
                  "device": a.device, "low_memory": low_memory, **({"max_steps": a.max_steps} if a.max_steps else {})},
    }
    path = work / "config.yaml"
    path.write_text(json.dumps(config))  # JSON is YAML
    if a.log:
        with open(a.log, "a") as f:
            f.write(f"==== tunesmith train ({'low_memory' if low_memory else 'normal'})\n")
    code, wall, lines = random_tokens.timed_lines([sys.executable, "-m", "tunesmith.cli", "train", "--config",
                                                   str(path)], env={**os.environ, "COLUMNS": "400"},
                                                  timeout=a.timeout, log=a.log)
    text = "\n".join(line for _, line in lines)
    # "adapter saved to ..." (or "model saved to" for a full fine-tune); rich wraps at the terminal's width, so the
    # command runs with COLUMNS=400. On 2026-12-02 a run whose CLI said only "saved to" was missed.
    done = re.search(r"saved to (\S+) \((\d+) steps", text)
    adapter = work / "runs" / "article5" / "adapter" / "adapter_model.safetensors"
    if code or not done or not adapter.exists():
        return {"error": f"exit {code}: " + " | ".join(line for _, line in lines[-3:])[-400:]}
    steps = int(done.group(2))
    logs = random_tokens.log_times(lines)
    packed = re.search(r"packed (\d+) examples into (\d+) buffers of (\d+) tokens", text)
    first_log = logs[0] if logs else float("nan")
    # Steady step time: between the first and the last full log window (10 steps each), checkpoints included.
    full = [t for t in logs[: steps // 10]]
    steady = (full[-1] - full[0]) / (10 * (len(full) - 1)) if len(full) > 1 else float("nan")
    return {"wall_to_adapter_s": round(wall, 1), "steps": steps, "epochs": a.epochs,
            "tokens": sum(trained) * a.epochs, "buffers": int(packed.group(2)) if packed else None,
            "seq_len": int(packed.group(3)) if packed else None,
            "first_log_s": round(first_log, 1), "steady_ms_per_step": round(1000 * steady, 2),
            "useful_tok_per_s_whole_run": round(sum(trained) * a.epochs / wall),
            "checkpoints": steps // 50}


def run_article(a) -> dict:
    env = {}
    site = os.environ.get("UNSLOTH_SITE")
    if site:  # Unsloth's packages only in its own process: they shadow others
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [site, os.environ.get("PYTHONPATH")]))
    if a.log:
        with open(a.log, "a") as f:
            f.write("==== article recipe\n")
    code, wall, lines = random_tokens.timed_lines([sys.executable, a.recipe, a.lengths, str(a.article_epochs)],
                                                  env=env, timeout=a.timeout, log=a.log)
    found = [json.loads(line) for _, line in lines if line.startswith("{\"epochs\"")]
    if code or not found:
        return {"error": f"exit {code}: " + " | ".join(line for _, line in lines[-3:])[-400:]}
    r = found[-1]
    examples = len(json.loads(Path(a.lengths).read_text()))
    per_epoch = math.ceil(math.ceil(examples / ARTICLE_BATCH) / ARTICLE_ACCUM)
    save_s = r["wall_to_adapter_s"] - r["setup_s"] - r["train_s"]
    r.update(process_wall_s=round(wall, 1), steps_per_epoch=per_epoch,
             extrapolated_wall_s=round(r["setup_s"] + r["steady_s_per_step"] * per_epoch * a.epochs + save_s),
             timed_steady_steps=r["steps"] - 20)
    return r


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--lengths", default=str(HERE.parent.parent / "shared" / "bench" / "godrive_qwen_lengths.json"))
    ap.add_argument("--recipe", default=str(HERE.parent.parent / "shared" / "bench" / "article_recipe.py"))
    ap.add_argument("--model", default=os.path.join(tempfile.gettempdir(), "qwen3-0.6b-random"))
    ap.add_argument("--epochs", type=float, default=5.0)
    ap.add_argument("--article-epochs", type=float, default=0.05)
    ap.add_argument("--max-steps", type=int, help="cap tunesmith's run (a quick check, not the measurement)")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--modes", default="normal", help="tunesmith's runs: normal, low_memory or both (comma)")
    ap.add_argument("--skip-article", action="store_true")
    ap.add_argument("--timeout", type=int, default=400)
    ap.add_argument("--log")
    ap.add_argument("--json")
    a = ap.parse_args()
    ours = {}
    for mode in a.modes.split(","):
        with tempfile.TemporaryDirectory() as tmp:
            ours[mode] = run_tunesmith(a, Path(tmp), mode == "low_memory")
        print("tunesmith", mode, json.dumps(ours[mode]), flush=True)
    theirs = {"error": "skipped"} if a.skip_article else run_article(a)
    print("article", json.dumps(theirs), flush=True)
    if a.json:
        Path(a.json).write_text(json.dumps({"tunesmith": ours, "article": theirs, "args": vars(a)}, indent=1))
    rows = ["| run | wall time | how | steps | steady step |", "|---|---|---|---|---|"]
    for mode, r in ours.items():
        if "wall_to_adapter_s" in r:
            rows.append(f"| tunesmith train ({mode}), {a.epochs:g} epochs | {r['wall_to_adapter_s']} s | measured "
                        f"whole, command to saved adapter | {r['steps']} of {r['seq_len']} tokens | "
                        f"{r['steady_ms_per_step']} ms |")
        else:
            rows.append(f"| tunesmith train ({mode}) | ERROR {r.get('error')} | | | |")
    if "extrapolated_wall_s" in theirs:
        rows.append(f"| article recipe, {a.epochs:g} epochs | {theirs['extrapolated_wall_s']} s | extrapolated from "
                    f"{theirs['timed_steady_steps']} steady steps ({theirs['steps']} run, {theirs['process_wall_s']} s) "
                    f"| {theirs['steps_per_epoch'] * a.epochs:g} of 8 sequences | "
                    f"{1000 * theirs['steady_s_per_step']:.0f} ms |")
        for mode, r in ours.items():
            if "wall_to_adapter_s" in r:
                rows.append(f"- tunesmith ({mode}) takes {theirs['extrapolated_wall_s'] / r['wall_to_adapter_s']:.1f}x "
                            "less wall time (target: >= 10x)")
    else:
        rows.append(f"| article recipe | ERROR {theirs.get('error')} | | | |")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
