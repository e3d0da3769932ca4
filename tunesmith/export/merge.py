"""Merge a run's LoRA adapter into the base weights and save a plain Hugging Face checkpoint (`merged/`).

The merge happens in float32 (how the adapter was trained on CPU), then the weights are cast once to the
export dtype, so the rounding is that of a single cast. The tokenizer and its chat template are saved
alongside: llama.cpp's converter embeds them in the GGUF, and transformers/vLLM load the folder as is.

A QLoRA adapter was trained on the base's NF4-quantized weights, not on the originals: it is merged into those
weights dequantized to float32 (quantized again exactly as training quantized them), so the merged model is the
model that was trained. Merging into the 4-bit layers themselves (peft's merge on bitsandbytes layers) would
quantize the sum again and round most of the adapter away.

The merge is checked by what the model computes, not by "a weight moved": the merged model's logits on a few
probe prompts must equal the adapter model's (`check_logits`), else the export stops.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tunesmith.atomic import atomic_path
from tunesmith.errors import ModelError, TunesmithError

DTYPES = {"f16": "float16", "bf16": "bfloat16", "f32": "float32"}
TOLERANCE = 1e-4
"""Largest |merged - adapter| logit allowed, relative to the largest |logit| (both in float32). Merging only
reorders the float32 sums ((W + BA)x against Wx + B(Ax)): measured differences are ~1e-7 relative."""
TOLERANCE_4BIT = 2e-2
"""The same for QLoRA: the adapter model computes in bf16 (bitsandbytes' compute dtype), the merged one in
float32, so they differ by bf16 rounding (~1e-2 relative), not by what was merged."""
PROBES = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [{"role": "system", "content": "Answer in one word."}, {"role": "user", "content": "汉字 and emoji 🙂?"}],
    [{"role": "user", "content": "Hi!"}, {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "Go on."}],
]


class MergeMismatch(TunesmithError):
    """The merged model does not compute what base + adapter computed (a bug, or an adapter from another base)."""


@dataclass
class MergeCheck:
    max_difference: float
    """Largest |merged - adapter| logit over the probe prompts."""
    scale: float
    """Largest |adapter logit|: the difference is judged relative to it."""
    tolerance: float

    @property
    def relative(self) -> float:
        return self.max_difference / max(1.0, self.scale)


def check_four_bit() -> None:
    """A QLoRA adapter merges into the base quantized as in training: that needs what training needed."""
    import torch

    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        available = False
    else:
        available = torch.cuda.is_available()
    if not available:
        raise ModelError("this run was trained with train.method: qlora: its adapter is merged into the base "
                         "quantized to 4 bits exactly as in training, which needs a CUDA GPU and bitsandbytes",
                         "export it on the GPU machine that trained it (pip install 'tunesmith[gpu]')")


def has_adapter(adapter: Path) -> bool:
    return (adapter / "adapter_config.json").is_file() and any(adapter.glob("adapter_model.*"))


def merge_adapter(base: Path, adapter: Path, out: Path, outtype: str = "f16", trust_remote_code: bool = False,
                  *, four_bit: bool = False, template_kwargs: dict[str, Any] | None = None,
                  tolerance: float | None = None) -> MergeCheck:
    """Write base + adapter, merged, as safetensors in `outtype` (f16, bf16 or f32) to the folder `out`.

    `four_bit`: the adapter was trained with QLoRA: merge into the dequantized NF4 weights (needs CUDA and
    bitsandbytes, as training did). Returns the logit check; raises MergeMismatch when it fails (`tolerance`:
    TOLERANCE or TOLERANCE_4BIT unless given; a benchmark passes inf to measure without stopping).
    """
    import torch
    from peft import PeftModel

    from tunesmith.models import load_model, load_tokenizer, save_tokenizer

    if not has_adapter(adapter):
        raise ModelError(f"{adapter}: no trained adapter here", "run `tunesmith train` first")
    # The tokenizer as trained: training saves it next to the adapter; older adapters fall back to the base's.
    tokenizer = load_tokenizer(adapter if (adapter / "tokenizer_config.json").is_file() else base)
    probes = probe_ids(tokenizer, template_kwargs or {})
    if four_bit:
        check_four_bit()
        # The model that was trained: the 4-bit base + the adapter, as bitsandbytes computes it.
        quantized = PeftModel.from_pretrained(load_model(base, trust_remote_code=trust_remote_code, four_bit=True),
                                              adapter)
        expected = logits(quantized, probes)
        del quantized
        torch.cuda.empty_cache()
        model = dequantized(load_model(base, trust_remote_code=trust_remote_code, four_bit=True))
        tolerance = TOLERANCE_4BIT if tolerance is None else tolerance
    else:
        model = load_model(base, trust_remote_code=trust_remote_code)
        tolerance = TOLERANCE if tolerance is None else tolerance
    model = PeftModel.from_pretrained(model, adapter)
    if not four_bit:
        expected = logits(model, probes)
    model = model.merge_and_unload()
    check = check_logits(expected, logits(model, probes), tolerance)
    model = model.to(getattr(torch, DTYPES[outtype]))
    with atomic_path(out, directory=True) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        save_tokenizer(tokenizer, tmp, base)
    return check


def dequantized(model: Any) -> Any:
    """A QLoRA base as plain float32 layers holding its dequantized 4-bit weights: the weights the adapter was
    trained on (bitsandbytes and the GPU fast path both dequantize to the compute dtype, bf16, for every forward
    pass), held in float32 for the merge. bitsandbytes' layers go through transformers' `dequantize()`; the fast
    path's NF4Linear layers (train/fast/nf4.py: the same tensors, read by torch ops) through their own."""
    import torch
    from torch import nn

    from tunesmith.train.fast.nf4 import NF4Linear

    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if isinstance(child, NF4Linear):
                linear = nn.Linear(child.in_features, child.out_features, bias=child.bias is not None,
                                   device=child.device)
                linear.weight.data = child.dequantized()
                if child.bias is not None:
                    linear.bias.data = child.bias.data
                setattr(module, name, linear)
    if getattr(model, "is_loaded_in_4bit", False):
        model = model.dequantize()
        model.is_loaded_in_4bit = False  # plain Linear layers now: peft must treat it as a full-precision model
    return model.to(torch.float32)


def probe_ids(tokenizer: Any, template_kwargs: dict[str, Any]) -> list[list[int]]:
    """The probe conversations' prompts as training renders them (chat template, no added special tokens)."""
    from jinja2.exceptions import TemplateError

    prompts = []
    for messages in PROBES:
        try:
            text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True,
                                                 **template_kwargs)
        except TemplateError:  # a template that refuses a system turn or a role order: the plain user question
            text = tokenizer.apply_chat_template(PROBES[0], tokenize=False, add_generation_prompt=True,
                                                 **template_kwargs)
        prompts.append(tokenizer(text, add_special_tokens=False)["input_ids"])
    return prompts


def logits(model: Any, prompts: list[list[int]]) -> list[Any]:
    """Float32 logits at every position of each prompt, on the CPU."""
    import torch

    device = next(model.parameters()).device
    with torch.no_grad():
        return [model(input_ids=torch.tensor([ids], device=device)).logits[0].float().cpu() for ids in prompts]


def check_logits(expected: list[Any], got: list[Any], tolerance: float) -> MergeCheck:
    difference = max(float((a - b).abs().max()) for a, b in zip(expected, got, strict=True))
    scale = max(float(a.abs().max()) for a in expected)
    check = MergeCheck(difference, scale, tolerance)
    if not check.relative <= tolerance:  # also catches NaN
        raise MergeMismatch(f"the merged model's logits differ from base + adapter by {difference:.3g} "
                            f"({check.relative:.2g} of the largest logit {scale:.3g}; allowed {tolerance:g})",
                            "the adapter may belong to another base model; run with --debug and report it")
    return check
