"""CPU training speed: `tunesmith train` against a plain TRL SFTTrainer + peft run, side by side.

Same model (the built-in SmolLM2-135M), same goDrive examples in the same chat template, same LoRA
(r=16, alpha=16, dropout 0, the seven projections), same batch size, steps and learning rate, both
training only on the completion. Measures trained-on tokens per second (non-pad input tokens fed to the
model / wall time of the training steps, warm-up step excluded) and appends a table to bench/RESULTS.md.

    .venv/bin/pip install -e '.[bench]'   # TRL, which tunesmith itself does not need
    .venv/bin/python bench/train_cpu.py [--steps 12] [--batch-size 8]
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import tempfile
import time
from importlib import metadata
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SYSTEM = "你是驾驶教练，根据车辆特征给出指令。"


def _examples(n: int) -> list[dict]:
    lines = (ROOT / "examples/godrive/train.jsonl").read_text(encoding="utf-8").splitlines()[:n]
    return [json.loads(line) for line in lines]


def run_trl(steps: int, batch_size: int, gradient_checkpointing: bool, bf16: bool) -> dict:
    """The article's stack without Unsloth: TRL's SFTTrainer over peft, as TRL's docs show it (bf16: its
    `bf16=True`, autocast over fp32 weights, which is what a TRL user would switch on for this CPU)."""
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, TrainerCallback
    from trl import SFTConfig, SFTTrainer

    from tunesmith.models import load_tokenizer, resolve_base

    torch.set_num_threads(2)
    base = resolve_base("builtin:smollm2-135m")
    tokenizer = load_tokenizer(base)
    records = [{"prompt": [{"role": "system", "content": SYSTEM}, {"role": "user", "content": r["input"]}],
                "completion": [{"role": "assistant", "content": r["output"]}]}
               for r in _examples(steps * batch_size)]
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    times: list[float] = []
    tokens: list[int] = []

    class Clock(TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            self.started = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            times.append(time.perf_counter() - self.started)

    with tempfile.TemporaryDirectory() as out:
        config = SFTConfig(output_dir=out, per_device_train_batch_size=batch_size, max_steps=steps,
                           learning_rate=2e-3, logging_steps=1000, save_strategy="no", report_to=[],
                           gradient_checkpointing=gradient_checkpointing, dataloader_num_workers=0,
                           use_cpu=True, seed=3407, max_length=1024, bf16=bf16)
        lora = LoraConfig(r=16, lora_alpha=16, lora_dropout=0.0, bias="none", task_type="CAUSAL_LM",
                          target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
        trainer = SFTTrainer(model=model, args=config, train_dataset=Dataset.from_list(records),
                             processing_class=tokenizer, peft_config=lora, callbacks=[Clock()])
        original = trainer.compute_loss

        def counting(model, inputs, *args, **kwargs):
            tokens.append(int(inputs["attention_mask"].sum()))
            return original(model, inputs, *args, **kwargs)

        trainer.compute_loss = counting
        trainer.train()
    # Every step counts, the first too, as in tunesmith's own figure; only the time inside the steps counts
    # here (tunesmith's figure is wall time from its first step, data loading included).
    return {"seconds": sum(times), "tokens": sum(tokens), "steps": len(times)}


def run_tunesmith(steps: int, batch_size: int, gradient_checkpointing: bool, bf16: str) -> dict:
    from rich.console import Console

    from tunesmith.config import load_config
    from tunesmith.train.loop import train

    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "train.jsonl"
        data.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in _examples(steps * batch_size)))
        config = load_config(None, [
            f"runs_dir={tmp}/runs", "name=bench", f"data.train_file={data}", f"data.system_prompt={SYSTEM}",
            "data.eval_fraction=0", f"train.max_steps={steps}", f"train.batch_size={batch_size}",
            "train.learning_rate=2e-3", f"train.gradient_checkpointing={str(gradient_checkpointing).lower()}",
            f"train.bf16={bf16}", f"train.save_steps={steps}", "train.log_steps=1"])
        train(config, Console(quiet=True))
        metrics = [json.loads(line) for line in (Path(tmp) / "runs/bench/metrics.jsonl").read_text().splitlines()]
    # tokens_per_second in metrics.jsonl: input tokens of every step so far / wall time since the first began
    first = metrics[0]
    last = metrics[-1]
    return {"tokens_per_second_reported": last["tokens_per_second"], "first": first, "last": last}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--only", choices=["trl", "trl-bf16", "tunesmith", "tunesmith-fp32"], default=None)
    parser.add_argument("--gc", choices=["on", "off"], default="on")
    args = parser.parse_args()
    gc = args.gc == "on"
    if args.only:
        if args.only.startswith("trl"):
            result = run_trl(args.steps, args.batch_size, gc, args.only == "trl-bf16")
            result["tokens_per_second"] = result["tokens"] / result["seconds"]
        else:
            result = run_tunesmith(args.steps, args.batch_size, gc, "false" if args.only == "tunesmith-fp32" else "auto")
            result["tokens_per_second"] = result["tokens_per_second_reported"]
        print(json.dumps(result))
        return
    # Each stack in its own process, one after the other, so neither inherits the other's warm caches.
    rows = []
    for name in ["trl", "trl-bf16", "tunesmith-fp32", "tunesmith"]:
        done = subprocess.run([sys.executable, __file__, "--only", name, "--steps", str(args.steps),
                               "--batch-size", str(args.batch_size), "--gc", args.gc],
                              capture_output=True, text=True, check=True)
        rows.append((name, json.loads(done.stdout.strip().splitlines()[-1])["tokens_per_second"]))
    reference = rows[0][1]
    table = ["| stack | tokens/s | vs TRL |", "|---|---|---|"]
    table += [f"| {name} | {tps:,.0f} | {tps / reference:.2f}x |" for name, tps in rows]
    versions = ", ".join(f"{p} {metadata.version(p)}" for p in ("torch", "transformers", "peft", "trl"))
    print("\n".join(table))
    with open(ROOT / "bench/RESULTS.md", "a", encoding="utf-8") as results:
        results.write(f"\n### CPU training: tunesmith vs TRL SFTTrainer ({time.strftime('%Y-%m-%d %H:%M')})\n"
                      f"Machine: {platform.processor() or platform.machine()}, 2 cores; {versions}. "
                      f"Command: `.venv/bin/python bench/train_cpu.py --steps {args.steps} --batch-size "
                      f"{args.batch_size} --gc {args.gc}`. SmolLM2-135M, goDrive examples, LoRA r=16 on 7 "
                      f"projections, completion-only loss, gradient checkpointing {args.gc}.\n"
                      "tunesmith = length-grouped batches, LM head only at trained positions, bf16 on AMX CPUs; "
                      "tunesmith-fp32 = the same with train.bf16=false; trl-bf16 = SFTConfig(bf16=True). Tokens/s = non-pad "
                      "input tokens of all steps / their time.\n\n" + "\n".join(table) + "\n")


if __name__ == "__main__":
    main()
