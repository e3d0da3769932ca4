"""tunesmith's GPU training path: packed buffers, per-document attention, bf16 LoRA, compiled layers.

    fast = prepare_fast_model(hf_model, config.lora, low_memory=config.train.low_memory)
    optimizer = make_optimizer(fast, lr=config.train.learning_rate)
    step = make_train_step(fast, optimizer, max_grad_norm=1.0)
    for batch in pack(examples, DEFAULT_SEQ_LEN):   # examples: [(input_ids, labels), ...]
        loss = step(batch)
    save_adapter(fast.adapter_state_dict(), config.lora, "runs/x/adapter", base_model=...)

The optimizer is a plain `torch.optim.AdamW`, so learning-rate schedulers and `state_dict()` work.
"""

from __future__ import annotations

from torch import nn

from tunesmith.config import LoraConfig
from tunesmith.train.fast.lora import LoraLinear, save_adapter
from tunesmith.train.fast.model import ATTENTION_BLOCK, FastCausalLM, FastPathUnsupported, check_supported
from tunesmith.train.fast.nf4 import NF4Linear
from tunesmith.train.fast.packing import IGNORE_INDEX, PackedBatch, pack
from tunesmith.train.fast.step import make_optimizer, make_train_step

DEFAULT_SEQ_LEN = 4096
"""Tokens per packed buffer: the largest that keeps Qwen3-0.6B under 8 GiB (bench/RESULTS.md); smaller for
larger models (`normal_buffer_tokens`)."""
ACTIVATION_BUDGET = 10 * 2**30
"""Bytes of saved activations a normal-mode buffer may take (see `normal_buffer_tokens`)."""
LOW_MEMORY_SEQ_LEN = 8192
"""With activation checkpointing a buffer costs far less memory, and larger buffers run faster."""
FOUR_BIT_SEQ_LEN = 4096
"""QLoRA (checkpointed): 4,096-token buffers keep an 8B model's peak under 12 GiB (bench/RESULTS.md, issue 31)."""


def prepare_fast_model(model: nn.Module, lora_cfg: LoraConfig, low_memory: bool = False,
                       compile: bool | None = None, grouped: bool = True,
                       attention_block: int = ATTENTION_BLOCK) -> FastCausalLM:
    """Add LoRA to a Hugging Face causal LM (in place) and wrap it for packed training.

    `model` should already be on its device in its training dtype (bf16 on CUDA), or loaded 4-bit by
    bitsandbytes (QLoRA: its NF4 weights are kept, and its layers checkpointed). `compile` defaults to True
    on CUDA; `grouped=False` runs each LoRA projection on its own (grouped.py says what grouping buys);
    `attention_block` is flex attention's block size (64 skips more of a buffer of short documents).
    Raises FastPathUnsupported for architectures the fast path does not run.
    """
    return FastCausalLM(model, lora_cfg, low_memory=low_memory, compile=compile, grouped=grouped,
                        attention_block=attention_block).train()


def buffer_tokens(fast: FastCausalLM) -> int:
    """The packed buffer size for this model's mode."""
    if fast.four_bit:
        return FOUR_BIT_SEQ_LEN
    return LOW_MEMORY_SEQ_LEN if fast.low_memory else normal_buffer_tokens(fast.model.config)


def normal_buffer_tokens(config) -> int:
    """DEFAULT_SEQ_LEN, halved (not below 1,024) while the activations a step saves would pass ACTIVATION_BUDGET.

    Without checkpointing a layer keeps ~(8 x hidden + 3 x intermediate) bf16 numbers a token (its input, the
    normed inputs of the grouped matmuls, q/k/v and the attention output, the MLP's gate/up and product). Qwen3-0.6B:
    ~1 MB a token, so 4,096 tokens (4 GiB); an 8B model: ~5 MB a token, so 2,048 (10 GiB, where 4,096 would add
    ~9 GiB to a 15 GiB model for no speed: its matmuls already run at the card's rate at 2,048 rows)."""
    per_token = config.num_hidden_layers * (8 * config.hidden_size + 3 * config.intermediate_size) * 2
    tokens = DEFAULT_SEQ_LEN
    while tokens > 1024 and tokens * per_token > ACTIVATION_BUDGET:
        tokens //= 2
    return tokens


__all__ = [
    "DEFAULT_SEQ_LEN",
    "FOUR_BIT_SEQ_LEN",
    "IGNORE_INDEX",
    "LOW_MEMORY_SEQ_LEN",
    "FastCausalLM",
    "FastPathUnsupported",
    "LoraLinear",
    "NF4Linear",
    "PackedBatch",
    "buffer_tokens",
    "check_supported",
    "make_optimizer",
    "make_train_step",
    "normal_buffer_tokens",
    "pack",
    "prepare_fast_model",
    "save_adapter",
]
