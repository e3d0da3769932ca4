"""QLoRA's preparation of the base (train/loop.py: prepare_4bit), on CPU.

bitsandbytes' 4-bit layers need CUDA, so the 4-bit load itself is measured on the GPU (bench/qlora_gpu.py); what
runs here is the part tunesmith wrote instead of peft's `prepare_model_for_kbit_training`: the base frozen, bf16
left bf16 (peft's float32 cast made QLoRA's training peak higher than LoRA's), and gradients still reaching the
adapter through checkpointed layers.
"""

from __future__ import annotations

import torch

from tunesmith.config import LoraConfig
from tunesmith.models import load_model
from tunesmith.train.loop import prepare_4bit
from tunesmith.train.lora import apply_lora


def test_prepare_4bit_freezes_keeps_bf16_and_trains_the_adapter_through_checkpointing(tiny_qwen3):
    model = load_model(tiny_qwen3, dtype=torch.bfloat16)
    dtypes = {name: param.dtype for name, param in model.named_parameters()}
    prepare_4bit(model, checkpointing=True)

    assert not any(param.requires_grad for param in model.parameters())
    assert {name: param.dtype for name, param in model.named_parameters()} == dtypes  # no float32 cast
    assert set(dtypes.values()) == {torch.bfloat16}
    assert model.is_gradient_checkpointing

    model = apply_lora(model, LoraConfig(), seed=3407)
    model.train()
    ids = torch.tensor([[1, 5, 9, 14, 3, 7]])
    model(input_ids=ids, labels=ids).loss.backward()
    trained = {name: param.grad for name, param in model.named_parameters() if param.requires_grad}
    assert trained and all("lora_" in name for name in trained)
    # lora_B starts at zero, so lora_A's first gradient is zero; every lora_B's is not, the first layer's too:
    # the loss's gradient went back through every checkpointed layer of the frozen base.
    assert all(grad is not None and grad.abs().sum() > 0 for name, grad in trained.items() if "lora_B" in name)


def test_prepare_4bit_without_checkpointing_leaves_it_off(tiny_qwen3):
    model = load_model(tiny_qwen3, dtype=torch.bfloat16)
    prepare_4bit(model, checkpointing=False)
    assert not model.is_gradient_checkpointing
