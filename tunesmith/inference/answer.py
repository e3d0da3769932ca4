"""Greedy answers of one of a run's models, by the name evaluation gives it: `base` (the base checkpoint),
`finetuned` (base + the run's adapter, or the fully fine-tuned checkpoint) or the path of a GGUF file."""

from __future__ import annotations

from pathlib import Path

from tunesmith.config import Config
from tunesmith.inference import hf
from tunesmith.inference.gguf import gguf_answers
from tunesmith.run import Run


def answers(name: str, config: Config, run: Run, conversations: list[list[dict[str, str]]],
            references: list[str] | None = None) -> list[str]:
    """Greedy answers, each at most `eval.max_new_tokens` long, or `hf.answer_limit` given the references."""
    if name not in ("base", "finetuned"):
        from tunesmith.models import load_tokenizer, resolve_base

        tokenizer = load_tokenizer(resolve_base(config.model.base, config.model.revision))
        max_new = hf.answer_limit(tokenizer, references, config.eval.max_new_tokens)
        return gguf_answers(Path(name), config, conversations, max_new, tokenizer=tokenizer)
    model, tokenizer = hf.load_finetuned(run, config) if name == "finetuned" else hf.load(config, None)
    if name == "finetuned" and config.train.method == "lora":
        model = model.merge_and_unload()  # same answers, no per-layer adapter overhead while generating
    max_new = hf.answer_limit(tokenizer, references, config.eval.max_new_tokens)
    return hf.generate_batch(model, tokenizer, conversations, config, max_new)
