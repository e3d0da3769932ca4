"""One goDrive CPU step three ways, timed: torch's 2 threads on the whole batch, 1 thread on the whole batch, and the
batch in two parts computed at once by two Python threads of 1 torch thread each (what train/workers.py does).

    .venv/bin/python bench/step_parts.py intra 12      # MODE: intra | one | split; STEPS timed after 3 warm-up
    ( timeout 200 .venv/bin/python -c "while True: pass" ) & .venv/bin/python bench/step_parts.py split 12

The model, adapter and batches are goDrive's (Gemma 3 270M, LoRA r=16 on 7 projections, batches of 4 grouped by
length); each part's loss is divided by the whole batch's trained tokens, as the engine does. Prints seconds a step
and input tokens/s. Run it on a quiet machine, or beside exactly the load you mean to measure.
"""

from __future__ import annotations

import sys
import threading
import time
from pathlib import Path

import torch

from tunesmith.config import load_config
from tunesmith.data import prepare
from tunesmith.models import load_model, load_tokenizer, resolve_base
from tunesmith.train import batches
from tunesmith.train.lora import apply_lora
from tunesmith.train.loss import completion_loss

ROOT = Path(__file__).resolve().parent.parent


def main() -> None:
    mode, steps = sys.argv[1], int(sys.argv[2])
    config = load_config(ROOT / "examples/godrive/config.yaml", ["runs_dir=/tmp/step_parts", "name=step_parts"])
    base = resolve_base(config.model.base, None)
    tokenizer = load_tokenizer(base)
    data = prepare(config, tokenizer)
    model = load_model(base, dtype=torch.float32)
    model.config.use_cache = False
    model = apply_lora(model, config.lora, config.train.seed)
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    plan = batches.epoch_batches([len(e["input_ids"]) for e in data.train], 4, 0, 0)
    torch.set_num_threads(2 if mode == "intra" else 1)

    def part(examples: list[dict], total: int) -> None:
        if mode == "split":
            torch.set_num_threads(1)  # OpenMP's thread count is per calling thread
        loss, _ = completion_loss(model, batches.collate(examples, tokenizer.pad_token_id, 8))
        (loss / total).backward()

    def step(i: int) -> int:
        examples = [data.train[j] for j in plan[i]]
        total = sum(sum(t != -100 for t in e["labels"][1:]) for e in examples)
        if mode == "split":
            workers = [threading.Thread(target=part, args=(examples[k::2], total)) for k in range(2)]
            for worker in workers:
                worker.start()
            for worker in workers:
                worker.join()
        else:
            part(examples, total)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return sum(len(e["input_ids"]) for e in examples)

    for i in range(3):
        step(i)
    started, tokens = time.perf_counter(), 0
    for i in range(3, 3 + steps):
        tokens += step(i)
    seconds = time.perf_counter() - started
    print(f"{mode}: {seconds / steps:.3f} s/step {tokens / seconds:.0f} tok/s", flush=True)


if __name__ == "__main__":
    main()
