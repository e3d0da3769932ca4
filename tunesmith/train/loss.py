"""The training loss and the number format it is computed in, shared by both engines, the loop, `doctor` and
the benchmarks.

- `completion_loss`: cross-entropy at trained positions only (the LM head never runs on prompt positions);
- `evaluate_loss`: the same over the eval split, in batches;
- `use_bf16` / `autocast` / `model_dtype`: bf16 where the hardware does bf16 matmuls natively, else fp32.
"""

from __future__ import annotations

from typing import Any

from tunesmith.config import Config
from tunesmith.train import batches


def completion_loss(model: Any, batch: dict[str, Any]) -> tuple[Any, Any]:
    """Summed cross-entropy over trained positions and their count.

    The decoder runs on every position, but the LM head only on positions whose next token is trained:
    for goDrive that is ~20% of positions, and the 49k-wide head is ~20% of SmolLM2's forward cost.
    A batch with `prefix_ids` (batches.collate_shared_prefix) runs the decoder on that common prefix once and on
    each example's rest with the prefix's keys and values: the same numbers, without computing the template's
    start and the system prompt once per example (18% of a goDrive example's tokens).
    """
    import torch.nn.functional as F

    causal = model.get_base_model() if hasattr(model, "get_base_model") else model
    decoder = getattr(causal, causal.base_model_prefix)
    if "prefix_ids" in batch:
        hidden = _after_prefix(causal, decoder, batch)
    else:
        # A packed row (batches.collate_packed) has no attention mask but position ids that restart at each
        # example: transformers then masks attention to each example's own tokens (only without a KV cache).
        hidden = decoder(input_ids=batch["input_ids"], attention_mask=batch.get("attention_mask"),
                         position_ids=batch.get("position_ids"), use_cache=False).last_hidden_state
    targets = batch["labels"][:, 1:]
    keep = targets != -100
    logits = causal.get_output_embeddings()(hidden[:, :-1][keep])
    return F.cross_entropy(logits.float(), targets[keep], reduction="sum"), keep.sum()


def _after_prefix(causal: Any, decoder: Any, batch: dict[str, Any]) -> Any:
    """Hidden states of each example's tokens after the shared prefix, the prefix computed once: its keys and
    values go into a cache (gradients flow through it as through the whole sequence), repeated for the batch."""
    import torch
    from transformers import DynamicCache

    prefix, rest, mask = batch["prefix_ids"], batch["input_ids"], batch["attention_mask"]
    cache = DynamicCache(config=causal.config)
    decoder(input_ids=prefix, cache=cache, use_cache=True)
    cache.batch_repeat_interleave(rest.shape[0])
    mask = torch.cat([mask.new_ones(rest.shape[0], prefix.shape[1]), mask], dim=1)
    return decoder(input_ids=rest, attention_mask=mask, cache=cache, use_cache=True).last_hidden_state


EVAL_LOSS_EXAMPLES = 64
"""The eval loss is the loss over the first this many examples of the eval split: a signal, not a score (the eval
stage scores the held-out file), and on a CPU the pass over a 100-example split cost 33 s of a 15-minute budget
(SmolLM2, the address example, bench/RESULTS.md)."""


def evaluate_loss(forward: Any, examples: list[dict[str, list[int]]], batch_size: int, pad_id: int, device: str,
                  config: Config) -> float:
    """`forward`: the loss module (`distributed.wrap`), which computes `completion_loss` of its model. Every rank
    evaluates the whole eval set: it is small, and the number comes out the same on all of them."""
    import torch

    forward.eval()
    total, count = 0.0, 0
    order = sorted(range(len(examples)), key=lambda i: len(examples[i]["input_ids"]))
    with torch.no_grad():
        for start in range(0, len(order), batch_size):
            batch = batches.collate([examples[i] for i in order[start:start + batch_size]], pad_id,
                                    batches.pad_multiple(device))
            batch = {key: value.to(device) for key, value in batch.items()}
            with autocast(device, config):
                loss_sum, n = forward(batch)
            total, count = total + loss_sum.item(), count + int(n)
    forward.train()
    return total / max(1, count)


def use_bf16(config: Config, device: str) -> bool:
    """bf16 compute where the hardware does bf16 matmuls natively: GPUs that support it, and CPUs with AMX or
    AVX512-BF16 (`train.bf16: auto`); `true` forces it, `false` keeps fp32.

    Measured on this project's 2-core Sapphire Rapids VMs (AMX), quiet machine, `tunesmith train` on goDrive,
    16 steps each: fp32 417 input tokens/s, bf16 base + fp32 adapter under autocast 618 (1.48x). An earlier
    measurement under a load of 3-5 had shown no gain; that one was noise. Without bf16 instructions the
    casts cost more than they save, so such CPUs stay in fp32."""
    import torch

    if config.train.bf16 is False:
        return False
    if config.train.bf16 is True:
        return True
    if device == "cuda":
        return torch.cuda.is_bf16_supported()
    return cpu_has_bf16()


def cpu_has_bf16() -> bool:
    """AMX-BF16 or AVX512-BF16 among the CPU's flags (Linux); elsewhere False, so fp32."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as handle:
            flags = next((line for line in handle if line.startswith("flags")), "").split()
    except OSError:
        return False
    return "amx_bf16" in flags or "avx512_bf16" in flags


def model_dtype(config: Config, device: str):
    import torch

    if config.model.dtype != "auto":
        return getattr(torch, config.model.dtype)
    if config.train.method == "full":
        # Every weight trains: AdamW's small updates vanish in bf16 weights, so they stay fp32 (autocast computes
        # in bf16 where the hardware does).
        return torch.float32
    # The frozen base is stored in bf16 when computing in bf16: half the memory and no per-step casts.
    # peft keeps the adapter weights themselves in fp32 (autocast_adapter_dtype), so updates stay exact.
    return torch.bfloat16 if use_bf16(config, device) else torch.float32


def autocast(device: str, config: Config):
    import contextlib

    import torch

    if use_bf16(config, device):
        return torch.autocast(device, dtype=torch.bfloat16)
    return contextlib.nullcontext()
