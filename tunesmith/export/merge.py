"""Merge a run's LoRA adapter into the base weights and save a plain Hugging Face checkpoint (`merged/`).

The merge happens in float32 (how the adapter was trained on CPU), then the weights are cast once to the
export dtype, so the rounding is that of a single cast. The tokenizer and its chat template are saved
alongside: llama.cpp's converter embeds them in the GGUF, and transformers/vLLM load the folder as is.
"""

from __future__ import annotations

from pathlib import Path

from tunesmith.atomic import atomic_path
from tunesmith.errors import ModelError

DTYPES = {"f16": "float16", "bf16": "bfloat16", "f32": "float32"}


def has_adapter(adapter: Path) -> bool:
    return (adapter / "adapter_config.json").is_file() and any(adapter.glob("adapter_model.*"))


def merge_adapter(base: Path, adapter: Path, out: Path, outtype: str = "f16",
                  trust_remote_code: bool = False) -> Path:
    """Write base + adapter, merged, as safetensors in `outtype` (f16, bf16 or f32) to the folder `out`."""
    import torch
    from peft import PeftModel

    from tunesmith.models import load_model, load_tokenizer

    if not has_adapter(adapter):
        raise ModelError(f"{adapter}: no trained adapter here", "run `tunesmith train` first")
    model = load_model(base, trust_remote_code=trust_remote_code)
    model = PeftModel.from_pretrained(model, adapter).merge_and_unload()
    model = model.to(getattr(torch, DTYPES[outtype]))
    # The tokenizer as trained: training saves it next to the adapter; older adapters fall back to the base's.
    tokenizer = load_tokenizer(adapter if (adapter / "tokenizer_config.json").is_file() else base)
    with atomic_path(out, directory=True) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
    return out
