"""QLoRA against LoRA on one GPU, through tunesmith's own code: peak memory, loss curves, and the merged model.

The Qwen3-0.6B architecture (DESIGN.md) with random weights (seed 0, bf16 on disk), the real Qwen3 tokenizer and
chat template (tunesmith/testing.py), and a memorisation task (a fixed code word for each of 200 keys, in a few
phrasings). `tunesmith.train.loop.train` runs twice on the same data, seed and schedule, each in its own process:
`train.method: lora` (bf16 base) and `train.method: qlora` (NF4 base through bitsandbytes, double quant, bf16
compute, prepared for k-bit training); both on the transformers loop (`train.fast: false`: this bench measures
that loop; bench/train_gpu.py's fast_qlora measures the fast path's QLoRA), adamw_8bit, gradient checkpointing,
100 steps of 8 examples, the loss logged every 10 steps.
Then `tunesmith.export.merge.merge_adapter(..., four_bit=True)` merges the QLoRA adapter into the dequantized NF4
base in float32, as `tunesmith export` does, and the merged model is compared with the QLoRA model itself (4-bit
base + adapter): greedy answers on 32 held-out prompts and logits at every prompt position. For contrast, the same
adapter merged into the original (never quantized) weights.

Prepare once, on a machine with the package registry (it writes the folder the GPU machine needs):

    python bench/qlora_gpu.py prepare .carry/qlora     # bitsandbytes 0.50.2 (CUDA 13 + CPU libs), rapidfuzz, pydantic,
                                                       # the Qwen3 tokenizer: ~38 MiB

Run on the GPU machine, that folder carried:

    PYTHONPATH=.carry/qlora/site python3 bench/qlora_gpu.py run .carry/qlora --out $OUT

It prints a markdown section for bench/RESULTS.md and writes qlora.json (and the section) under --out.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(HERE))

from train_gpu import QWEN3_06B

# Qwen3-1.7B's shape (its config.json on the hub): linear layers are 82% of it, against 74% for 0.6B.
QWEN3_17B = QWEN3_06B | {"hidden_size": 2048, "intermediate_size": 6144}
MODELS = {"Qwen3-0.6B": QWEN3_06B, "Qwen3-1.7B": QWEN3_17B}
# (label, model, train.method, steps): the first three train on the same data, seed and schedule; the 1.7B pair
# measures memory only. "qlora, peft cast" is peft's prepare_model_for_kbit_training in place of tunesmith's
# prepare_4bit (its float32 cast of everything that is not 4-bit), for contrast.
RUNS = [("lora", "Qwen3-0.6B", "lora", 100), ("qlora", "Qwen3-0.6B", "qlora", 100),
        ("qlora, peft cast", "Qwen3-0.6B", "qlora", 100),
        ("lora", "Qwen3-1.7B", "lora", 20), ("qlora", "Qwen3-1.7B", "qlora", 20)]

BATCH, LOG_EVERY, SEED = 8, 10, 3407
WHEELS = ["bitsandbytes==0.50.2", "rapidfuzz==3.14.6", "pydantic==2.14.4", "pydantic-core==2.50.5", "annotated-types==0.7.0",
          "typing-inspection==0.4.5"]
PLATFORMS = ["manylinux_2_24_x86_64", "manylinux_2_28_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64"]
WORDS = ["amber", "basil", "cedar", "delta", "ember", "fjord", "grove", "heron", "iris", "juniper", "kestrel", "lumen", "maple", "nectar", "onyx", "pewter", "quartz", "raven", "sable", "tundra", "umber", "violet", "willow", "xenon", "yarrow", "zephyr"]


# ------------------------------------------------------------------------------------------ prepare (CPU)

def prepare(folder: Path) -> None:
    from tunesmith.testing import real_tokenizer

    site = folder / "site"
    shutil.rmtree(folder, ignore_errors=True)
    site.mkdir(parents=True)
    with tempfile.TemporaryDirectory() as scratch:
        platforms = [arg for name in PLATFORMS for arg in ("--platform", name)]
        subprocess.run([sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--only-binary=:all:",
                        "--python-version", "3.12", "--implementation", "cp", *platforms, "-d", scratch, *WHEELS],
                       check=True)
        for wheel in Path(scratch).glob("*.whl"):
            with zipfile.ZipFile(wheel) as archive:
                archive.extractall(site)
    # bitsandbytes ships a library per CUDA version; the GPU machine's torch is built for CUDA 13.
    for library in (site / "bitsandbytes").glob("libbitsandbytes_*.so"):
        if "cuda13" not in library.name and "cpu" not in library.name:
            library.unlink()
    shutil.copytree(real_tokenizer("qwen3"), folder / "tokenizer")
    size = sum(path.stat().st_size for path in folder.rglob("*") if path.is_file())
    print(f"{folder}: {size / 2**20:.1f} MiB (carry it; add it to .git/info/exclude)")


# ------------------------------------------------------------------------------------------ the run (GPU)

def make_base(folder: Path, tokenizer: Path, name: str = "Qwen3-0.6B") -> Path:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, Qwen3Config

    base = folder / ("base" if name == "Qwen3-0.6B" else f"base-{name}")
    if (base / "config.json").exists():
        return base
    torch.manual_seed(0)
    config = Qwen3Config(**MODELS[name])
    config.architectures = ["Qwen3ForCausalLM"]
    with torch.device("cuda"):  # random init of 2B parameters is minutes on the CPU
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    model.save_pretrained(base)
    del model
    torch.cuda.empty_cache()
    AutoTokenizer.from_pretrained(tokenizer).save_pretrained(base)
    return base


def make_data(folder: Path) -> tuple[Path, list[str], dict[str, str]]:
    rng = random.Random(0)
    keys = [f"{rng.choice(WORDS)}-{rng.randrange(1000):03d}" for _ in range(200)]
    codes = {key: " ".join(rng.choice(WORDS) for _ in range(3)) for key in keys}
    phrasings = ["What is the code word for {}?", "Code for {}, please.", "{}: which code?", "Give me {}'s code."]
    rows = [{"input": phrasing.format(key), "output": codes[key]} for key in keys for phrasing in phrasings[:3]]
    rng.shuffle(rows)
    path = folder / "train.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    held_out = [phrasings[3].format(key) for key in keys[:32]]  # a phrasing never trained on
    return path, held_out, codes


def config_for(folder: Path, base: Path, data: Path, method: str, name: str, steps: int) -> dict:
    return {"name": name, "runs_dir": str(folder / "runs"), "model": {"base": str(base)},
            "data": {"train_file": str(data), "eval_fraction": 0.0},
            "train": {"method": method, "fast": False, "max_steps": steps, "batch_size": BATCH, "log_steps": LOG_EVERY,
                      "save_steps": steps, "eval_steps": steps, "learning_rate": 1e-3, "seed": SEED,
                      "optimizer": "adamw_8bit"}}


def train_one(folder: Path, name: str) -> dict:
    """One training run in this process (called in a child process per run)."""
    import torch
    from rich.console import Console

    from tunesmith.config import Config
    from tunesmith.train import loop

    if name.endswith("peft-cast"):
        from peft import prepare_model_for_kbit_training

        loop.prepare_4bit = lambda model, checkpointing: prepare_model_for_kbit_training(
            model, use_gradient_checkpointing=checkpointing, gradient_checkpointing_kwargs={"use_reentrant": False})
    config = Config.model_validate(json.loads((folder / f"{name}.json").read_text()))
    torch.cuda.reset_peak_memory_stats()
    started = time.perf_counter()
    result = loop.train(config, Console(quiet=True))
    seconds = time.perf_counter() - started
    metrics = [json.loads(line) for line in (config.run_dir / "metrics.jsonl").read_text().splitlines()]
    memory = json.loads((config.run_dir / "run.json").read_text())["final"]["gpu_memory_gib"]
    return {"peak_gib": torch.cuda.max_memory_allocated() / 2**30, "memory": memory,
            "reserved_gib": torch.cuda.max_memory_reserved() / 2**30, "seconds": round(seconds, 1),
            "curve": [(m["step"], m["loss"]) for m in metrics if "loss" in m], "adapter": str(result.output_dir)}


def agreement(folder: Path, base: Path, adapter: Path, held_out: list[str]) -> dict:
    """The QLoRA model (4-bit base + adapter) against the adapter merged into the dequantized base, and into the
    original weights: greedy tokens and logits."""
    import torch
    from peft import PeftModel

    from tunesmith.config import DataConfig
    from tunesmith.data.render import template_kwargs
    from tunesmith.export import merge
    from tunesmith.models import load_model, load_tokenizer

    tokenizer = load_tokenizer(base)
    kwargs = template_kwargs(DataConfig())
    prompts = [tokenizer(tokenizer.apply_chat_template([{"role": "user", "content": p}], tokenize=False,
                                                       add_generation_prompt=True, **kwargs),
                         add_special_tokens=False)["input_ids"] for p in held_out]

    def greedy(model) -> list[list[int]]:
        out = []
        for ids in prompts:
            x = torch.tensor([ids], device="cuda")
            with torch.no_grad():
                # use_cache: the base's config has it off (as training sets it), which would recompute every step
                y = model.generate(input_ids=x, attention_mask=torch.ones_like(x), max_new_tokens=16, do_sample=False,
                                   pad_token_id=tokenizer.pad_token_id, use_cache=True)
            out.append(y[0, len(ids):].tolist())
        return out

    qlora = PeftModel.from_pretrained(load_model(base, four_bit=True), adapter).eval()
    reference_tokens, reference_logits = greedy(qlora), merge.logits(qlora, prompts)
    del qlora
    torch.cuda.empty_cache()
    results = {}
    default_tolerance = {True: merge.TOLERANCE_4BIT, False: merge.TOLERANCE}
    for name, four_bit in (("merged into the dequantized NF4 base (export)", True),
                           ("merged into the original weights (contrast)", False)):
        target = folder / ("merged-nf4" if four_bit else "merged-original")
        started = time.perf_counter()
        # Measured, not enforced (inf): the table reports how far the check was from export's tolerance.
        check = merge.merge_adapter(base, adapter, target, "f32", four_bit=four_bit, template_kwargs=kwargs,
                                    tolerance=float("inf"))
        seconds = time.perf_counter() - started
        model = load_model(target, dtype=torch.float32).to("cuda").eval()
        tokens, logits = greedy(model), merge.logits(model, prompts)
        same = sum(a == b for a, b in zip(tokens, reference_tokens))
        position = sum(x == y for a, b in zip(tokens, reference_tokens) for x, y in zip(a, b))
        total = sum(min(len(a), len(b)) for a, b in zip(tokens, reference_tokens))
        diffs = [(a - b).abs() for a, b in zip(logits, reference_logits)]
        top1 = sum(int((a.argmax(-1) == b.argmax(-1)).sum()) for a, b in zip(logits, reference_logits))
        positions = sum(a.shape[0] for a in logits)
        results[name] = {"merge_check_relative": check.relative, "export_tolerance": default_tolerance[four_bit],
                         "merge_seconds": round(seconds, 1),
                         "greedy_identical": f"{same}/{len(prompts)}", "greedy_token_agreement": position / max(1, total),
                         "logit_max_abs_diff": max(float(d.max()) for d in diffs),
                         "logit_mean_abs_diff": sum(float(d.sum()) for d in diffs) / sum(d.numel() for d in diffs),
                         "top1_agreement": top1 / positions}
        del model
        torch.cuda.empty_cache()
    return results


def run(folder: Path, out: Path | None, work: Path) -> None:
    import bitsandbytes
    import peft
    import torch
    import transformers

    assert torch.cuda.is_available(), "needs a CUDA GPU"
    work.mkdir(parents=True, exist_ok=True)
    bases = {name: make_base(work, folder / "tokenizer", name) for name in MODELS}
    base = bases["Qwen3-0.6B"]
    data, held_out, _ = make_data(work)
    runs = {}
    for label, model, method, steps in RUNS:
        name = f"{model}-{label}".replace(", ", "-").replace(" ", "-")
        (work / f"{name}.json").write_text(json.dumps(config_for(work, bases[model], data, method, name, steps)))
        done = subprocess.run([sys.executable, __file__, "train-one", str(work), name], capture_output=True, text=True,
                              check=False)
        if done.returncode != 0:
            sys.exit(f"{name} failed:\n{done.stdout[-3000:]}\n{done.stderr[-5000:]}")
        runs[name] = json.loads(done.stdout.strip().splitlines()[-1]) | {"label": label, "model": model,
                                                                          "steps": steps}
    merged = agreement(work, base, Path(runs["Qwen3-0.6B-qlora"]["adapter"]), held_out)
    versions = (f"torch {torch.__version__} (CUDA {torch.version.cuda}), transformers {transformers.__version__}, "
                f"peft {peft.__version__}, bitsandbytes {bitsandbytes.__version__}")
    section = report(runs, merged, torch.cuda.get_device_name(0), versions)
    print(section)
    if out:
        out.mkdir(parents=True, exist_ok=True)
        (out / "qlora.json").write_text(json.dumps({"runs": runs, "merged": merged, "versions": versions}, indent=1))
        (out / "qlora.md").write_text(section)


def report(runs: dict, merged: dict, card: str, versions: str) -> str:
    lines = [f"### QLoRA vs LoRA, {card} ({time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())})", versions, "",
             "    PYTHONPATH=.carry/qlora/site python3 bench/qlora_gpu.py run .carry/qlora --out $OUT", "",
             ("| model | method | GiB after load | load peak | training peak | whole run peak (reserved) | steps | "
              "seconds (load included) |"), "|---|---|---|---|---|---|---|---|"]
    for r in runs.values():
        m = r["memory"]
        lines.append(f"| {r['model']} | {r['label']} | {m['after_load']:.2f} | {m['load_peak']:.2f} | "
                     f"{m['training_peak']:.2f} | {r['peak_gib']:.2f} ({r['reserved_gib']:.2f}) | {r['steps']} | "
                     f"{r['seconds']} |")
    curves = {name: r for name, r in runs.items() if r["model"] == "Qwen3-0.6B"}
    steps = [step for step, _ in runs["Qwen3-0.6B-lora"]["curve"]]
    lines += ["", "| Qwen3-0.6B, step | " + " | ".join(str(s) for s in steps) + " |",
              "|---" * (len(steps) + 1) + "|"]
    for r in curves.values():
        lines.append(f"| {r['label']} loss | " + " | ".join(f"{loss:.4f}" for _, loss in r["curve"]) + " |")
    lines += ["", ("| QLoRA model (4-bit base + adapter) against | merge check (rel.) | greedy answers identical | "
                   "greedy tokens agree | top-1 agree | logit max abs diff | mean abs diff |"),
              "|---|---|---|---|---|---|---|"]
    for name, m in merged.items():
        lines.append(f"| {name} | {m['merge_check_relative']:.2g} (export allows {m['export_tolerance']:g}) | "
                     f"{m['greedy_identical']} | "
                     f"{m['greedy_token_agreement']:.3f} | {m['top1_agreement']:.3f} | {m['logit_max_abs_diff']:.3g} | "
                     f"{m['logit_mean_abs_diff']:.3g} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("prepare").add_argument("folder", type=Path)
    running = sub.add_parser("run")
    running.add_argument("folder", type=Path)
    running.add_argument("--out", type=Path, default=Path(os.environ["OUT"]) if os.environ.get("OUT") else None)
    running.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "qlora-bench")
    one = sub.add_parser("train-one")
    one.add_argument("work", type=Path)
    one.add_argument("name")
    args = parser.parse_args()
    if args.command == "prepare":
        prepare(args.folder)
    elif args.command == "run":
        run(args.folder, args.out, args.work)
    else:
        print(json.dumps(train_one(args.work, args.name)))


if __name__ == "__main__":
    main()
