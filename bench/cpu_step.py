"""Seconds per LoRA training step on CPU for one batch shape: what a goDrive step costs with each lever.

    OMP_NUM_THREADS=2 python bench/cpu_step.py --base builtin:gemma3-270m --length 120 --batch 4
    OMP_NUM_THREADS=2 python bench/cpu_step.py --base builtin:smollm2-135m --length 256 --batch 8
    OMP_NUM_THREADS=2 python bench/cpu_step.py --length 120 --batch 8 --layers -9      # LoRA on the top 9 layers
    OMP_NUM_THREADS=2 python bench/cpu_step.py --length 120 --batch 8 --compile        # torch.compile each layer

The step is the training loop's: LoRA r16 on the seven projections (the config's `lora:`), the bf16 base under
autocast, `completion_loss` over the last `--trained` positions (goDrive trains ~15 answer tokens), AdamW. The
tokens are random: the cost of a step does not depend on which tokens they are. Time it on a quiet machine:
other work on the 2 cores shows up in every number. The first steps are slower (allocation, compilation); read the
steady ones.
"""

from __future__ import annotations

import argparse
import time

import torch

from tunesmith.config import load_config
from tunesmith.models import load_model, resolve_base
from tunesmith.train.lora import apply_lora
from tunesmith.train.loss import completion_loss


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base", default="builtin:gemma3-270m")
    parser.add_argument("--length", type=int, default=120, help="tokens a sequence (goDrive: Gemma 120, SmolLM2 256)")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--trained", type=int, default=15, help="positions at the end that carry labels")
    parser.add_argument("--layers", type=int, help="lora.layers_to_transform: negative counts from the top")
    parser.add_argument("--compile", action="store_true", help="torch.compile each decoder layer (static shapes)")
    parser.add_argument("--steps", type=int, default=8)
    args = parser.parse_args()

    overrides = [f"model.base={args.base}"] + ([f"lora.layers_to_transform={args.layers}"] if args.layers else [])
    config = load_config(None, overrides)
    model = apply_lora(load_model(resolve_base(args.base), dtype=torch.bfloat16), config.lora, 0)
    model.train()
    model.config.use_cache = False
    if args.compile:
        for layer in model.get_base_model().model.layers:
            layer.compile(dynamic=False)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    ids = torch.randint(1000, 20000, (args.batch, args.length))
    labels = ids.clone()
    labels[:, : args.length - args.trained] = -100
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}
    print(f"{args.base} batch {args.batch} x {args.length} tokens, threads {torch.get_num_threads()}")
    for step in range(1, args.steps + 1):
        start = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss, count = completion_loss(model, batch)
        (loss / count).backward()
        optimizer.step()
        optimizer.zero_grad()
        print(f"step {step}: {time.perf_counter() - start:.2f} s", flush=True)


if __name__ == "__main__":
    main()
