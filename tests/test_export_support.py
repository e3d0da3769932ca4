"""Helpers for the export tests (no tests here): make a run folder as `tunesmith train` leaves it, in seconds."""

from __future__ import annotations

import json
from pathlib import Path

QUESTIONS = [
    ("What is the capital of France?", "The capital of France is Paris."),
    ("What is the capital of Germany?", "The capital of Germany is Berlin."),
    ("What is 2 + 2?", "2 + 2 = 4."),
    ("Name a primary colour.", "Red is a primary colour."),
    ("What is the capital of Italy?", "The capital of Italy is Rome."),
    ("What is the largest planet?", "Jupiter is the largest planet."),
    ("What language is spoken in Spain?", "Spanish is spoken in Spain."),
    ("How many days are in a week?", "There are seven days in a week."),
]


def make_run(tmp: Path, base: Path, name: str = "exp", *, system_prompt: str | None = None,
             lora_b: float = 0.0, tokenizer_from: Path | None = None, **config: dict) -> Path:
    """runs/<name>/ with run.json, a real PEFT adapter on `base` and the held-out split (data/validation.jsonl).

    `lora_b` > 0 fills the adapter's B matrices with noise of that size (a fresh adapter is a no-op),
    so the merge visibly changes the weights.
    """
    import torch

    from tunesmith.config import Config, LoraConfig
    from tunesmith.models import load_model, load_tokenizer
    from tunesmith.run import Run
    from tunesmith.train.lora import apply_lora

    settings = Config.model_validate({
        "name": name, "runs_dir": str(tmp / "runs"), "model": {"base": str(base)},
        "data": {"system_prompt": system_prompt}, **config})
    run = Run.of(settings)
    run.data.mkdir(parents=True, exist_ok=True)
    run.write_record({"config": settings.model_dump(mode="json")})
    model = apply_lora(load_model(base), LoraConfig(r=4, alpha=8), seed=0)
    if lora_b:
        generator = torch.Generator().manual_seed(0)
        with torch.no_grad():
            for key, parameter in model.named_parameters():
                if "lora_B" in key:
                    parameter.copy_(torch.randn(parameter.shape, generator=generator) * lora_b)
    model.save_pretrained(run.adapter)
    load_tokenizer(tokenizer_from or base).save_pretrained(run.adapter)
    with run.eval_split.open("w", encoding="utf-8") as handle:
        for question, answer in QUESTIONS:
            system = [{"role": "system", "content": system_prompt}] if system_prompt else []
            messages = system + [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]
            handle.write(json.dumps({"messages": messages}) + "\n")
    return run.dir
