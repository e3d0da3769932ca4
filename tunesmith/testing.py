"""Tiny random-weight checkpoints for fast tests: real architectures, real tokenizer, seconds to build.

They use the built-in SmolLM2 tokenizer (vocab 49152) and its ChatML chat template, so they convert to
GGUF and load in llama.cpp like the real thing; their answers are noise.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from tunesmith.atomic import atomic_path
from tunesmith.models.builtin import materialize_smollm2

Architecture = Literal["qwen3", "llama"]


def tiny_checkpoint(out: str | Path, arch: Architecture = "qwen3", seed: int = 0, chat_template: str | None = None) -> Path:
    """Write a 2-layer, 64-wide random model of `arch` with the SmolLM2 tokenizer to `out`."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, Qwen3Config

    out = Path(out)
    if (out / "config.json").exists():
        return out
    tokenizer = AutoTokenizer.from_pretrained(materialize_smollm2())
    if chat_template is not None:
        tokenizer.chat_template = chat_template
    shape = {
        "vocab_size": len(tokenizer),
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": 2048,
        "tie_word_embeddings": True,
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
    }
    if arch == "qwen3":
        config = Qwen3Config(head_dim=16, rope_theta=1e6, rms_norm_eps=1e-6, **shape)
    elif arch == "llama":
        config = LlamaConfig(head_dim=16, **shape)
    else:
        raise ValueError(f"unknown tiny architecture {arch!r}")
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with atomic_path(out, directory=True) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
    return out
