"""The fast path's grouped projections and its 4-bit (QLoRA) base, on the CPU at tiny shapes, in float32.

Grouped (train/fast/grouped.py): the seven LoRA projections of a layer as four matmuls with the adapters folded
in must compute what the projections one by one compute. 4-bit (train/fast/nf4.py): the fast path on an NF4 base
must give the loss and LoRA gradients of the transformers + peft loop on the same weights dequantized (the
weights QLoRA trains on), and the adapter it trains, merged by export into those weights, the same logits.
bitsandbytes has no CPU kernels here, so the base is quantized by tunesmith's own NF4 quantizer; on the GPU
bench/train_gpu.py checks the dequantizer against bitsandbytes' kernel, bit for bit, on bitsandbytes' storage.

Tolerances (float32 throughout): losses within 1e-5 relative, LoRA gradients cosine > 0.9999 and within
rtol 1e-3 / atol 1e-5 (test_fast_path.py's), merged logits within export's TOLERANCE (1e-4 of the largest).
"""

from __future__ import annotations

import copy

import pytest
import torch
from peft import LoraConfig as PeftLoraConfig
from peft import get_peft_model, set_peft_model_state_dict
from test_fast_path import assert_close_grads, assert_matches_peft, examples, tiny_qwen3

from tunesmith.config import PROJECTIONS, LoraConfig
from tunesmith.export import merge
from tunesmith.train.fast import (
    NF4Linear,
    make_optimizer,
    make_train_step,
    pack,
    prepare_fast_model,
    save_adapter,
)
from tunesmith.train.fast.nf4 import (
    NF4_CODE,
    NF4Weight,
    block_scales,
    dequantize,
    quantize,
    quantize_projections,
)


def adapter_state(fast, seed: int = 2) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {k: torch.randn(v.shape, generator=g) * 0.1 for k, v in fast.adapter_state_dict().items()}


def four_bit_pair(arch: str):
    """A fast model on an NF4 base, and peft on a plain model holding the NF4 weights dequantized."""
    base = tiny_qwen3(0, arch)
    assert quantize_projections(base, tuple(PROJECTIONS)) == 7 * 2
    plain = merge.dequantized(copy.deepcopy(base))
    assert not any(isinstance(m, NF4Linear) for m in plain.modules())
    ref = get_peft_model(plain, PeftLoraConfig(r=16, lora_alpha=16, target_modules=PROJECTIONS))
    fast = prepare_fast_model(base, LoraConfig())
    state = adapter_state(fast)
    fast.load_adapter_state_dict(state)
    assert not set_peft_model_state_dict(ref, state).unexpected_keys
    return fast, ref


def test_nf4_codes_pack_high_nibble_first_and_scale_by_block():
    w = torch.zeros(2, 64)
    w[0, 0], w[0, 1], w[0, 2] = 3.0, -3.0, 1.5  # block 0: absmax 3
    w[1, 0] = -0.5  # block 1: absmax 0.5
    q = quantize(w)
    assert q.packed[0] == (15 << 4) | 0  # +absmax -> level 15, -absmax -> level 0, first in the high nibble
    assert q.packed[1] >> 4 == 12  # 1.5 / 3 = 0.5: nearest level 0.5626 (index 12)
    assert torch.equal(q.absmax, torch.tensor([3.0, 0.5]))
    back = dequantize(q, torch.float32)
    assert back[0, 0] == 3.0 and back[0, 1] == -3.0 and back[1, 0] == -0.5
    assert back[0, 2] == torch.tensor(NF4_CODE[12]) * 3.0
    assert back[0, 3] == 0.0  # zero -> level 7, exactly 0


def test_nf4_roundtrip_is_nearest_level_and_double_quant_decodes():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(8, 128, generator=g)
    q = quantize(w)
    code = torch.tensor(NF4_CODE)
    blocks = w.reshape(-1, 64)
    scaled = blocks / blocks.abs().amax(1, keepdim=True)
    nearest = code[(scaled[..., None] - code).abs().argmin(-1)] * blocks.abs().amax(1, keepdim=True)
    assert torch.equal(dequantize(q, torch.float32), nearest.reshape(8, 128))
    # Double quantization: the same block scales stored as 8-bit codes of a 256-level table per 256 blocks.
    code2 = torch.linspace(-1, 1, 256)
    absmax_q = torch.tensor([255, 0, 128, 7, 200, 13, 64, 100, 31, 90, 17, 250, 1, 2, 3, 4], dtype=torch.uint8)
    nested = NF4Weight(q.packed, absmax_q, q.shape, q.code, code2=code2, absmax2=torch.tensor([2.0]),
                       offset=torch.tensor(0.25))
    assert torch.equal(block_scales(nested), code2[absmax_q.long()] * 2.0 + 0.25)


@pytest.mark.parametrize("arch", ["qwen3", "llama"])
def test_grouped_projections_equal_one_by_one(arch):
    losses, grads = [], []
    for grouped in (True, False):
        fast = prepare_fast_model(tiny_qwen3(0, arch), LoraConfig(), grouped=grouped)
        assert (len(fast.groups) == 4 * 2) == grouped  # 2 layers of 4 groups
        fast.load_adapter_state_dict(adapter_state(fast))
        loss = fast(pack(examples(), 96)[0])
        loss.backward()
        fast.grads_to_master()
        losses.append(float(loss))
        grads.append(fast.adapter_state_dict(grads=True))
    assert abs(losses[0] - losses[1]) < 1e-5 * losses[1]
    assert_close_grads(grads[0], grads[1])


def test_grouped_layers_share_the_modules_weights():
    fast = prepare_fast_model(tiny_qwen3(0), LoraConfig())
    attn = fast.model.model.layers[0].self_attn
    E = fast.layers[0].groups.qkv.E
    assert attn.q_proj.base_layer.weight.data_ptr() == E.data_ptr()  # a view, not a copy
    # After an optimizer step the group's copy of A and B follows the trained weights.
    step = make_train_step(fast, make_optimizer(fast, lr=1e-2))
    step(pack(examples(), 96)[0])
    n_in, r = attn.q_proj.base_layer.in_features, attn.q_proj.r
    assert torch.equal(E[fast.layers[0].groups.qkv.n_out:][:r, :n_in], attn.q_proj.lora_A.detach())
    assert torch.equal(E[:attn.q_proj.base_layer.out_features, n_in:n_in + r], attn.q_proj.lora_B.detach())


@pytest.mark.parametrize("arch", ["qwen3", "llama"])
def test_packed_4bit_loss_and_lora_grads_match_peft_on_the_dequantized_base(arch):
    fast, ref = four_bit_pair(arch)
    assert fast.four_bit and fast.low_memory and len(fast.groups) == 8  # always checkpointed; grouped
    assert_matches_peft(fast, ref)


def test_4bit_fast_path_trains_and_export_merge_gives_its_logits(tmp_path):
    base = tiny_qwen3(0)
    quantize_projections(base, tuple(PROJECTIONS))
    untouched = copy.deepcopy(base)  # the 4-bit base as export loads it: no adapter
    fast = prepare_fast_model(base, LoraConfig())
    step = make_train_step(fast, make_optimizer(fast, lr=1e-2), max_grad_norm=1.0)
    batch = pack(examples(), 96)[0]
    curve = [float(step(batch)) for _ in range(5)]
    assert curve[-1] < curve[0] - 0.05  # it learns on the 4-bit base
    adapter = save_adapter(fast.adapter_state_dict(), LoraConfig(), tmp_path / "adapter")
    prompts = [ids for ids, _ in examples()[:3]]
    with torch.no_grad():
        trained = merge.logits(fast.model.eval(), prompts)  # the trained model: NF4 base + the fast path's LoRA
        from peft import PeftModel

        base_logits = merge.logits(merge.dequantized(copy.deepcopy(untouched)), prompts)
        merged = PeftModel.from_pretrained(merge.dequantized(untouched), str(adapter)).merge_and_unload()
    assert not any(isinstance(m, NF4Linear) or hasattr(m, "lora_A") for m in merged.modules())
    check = merge.check_logits(trained, merge.logits(merged, prompts), merge.TOLERANCE)
    assert check.relative < merge.TOLERANCE
    # The adapter changed the model: the base alone is far from it (the check above can fail).
    with pytest.raises(merge.MergeMismatch):
        merge.check_logits(trained, base_logits, merge.TOLERANCE)


def test_qlora_takes_the_fast_path_with_checkpointed_4096_token_buffers():
    from types import SimpleNamespace

    from tunesmith.config import Config
    from tunesmith.train.engines import FastEngine, fast_path_wanted
    from tunesmith.train.fast import FOUR_BIT_SEQ_LEN

    config = Config.model_validate({"model": {"base": "x"}, "train": {"method": "qlora", "loss_on": "all"}})
    base = tiny_qwen3(0)
    assert fast_path_wanted(config, "cuda", base)  # QLoRA ran on the transformers loop before issue 31
    assert not fast_path_wanted(config.model_copy(update={"train": config.train.model_copy(
        update={"method": "full"})}), "cuda", base)
    quantize_projections(base, tuple(PROJECTIONS))
    data = SimpleNamespace(train=[{"input_ids": ids, "labels": labels} for ids, labels in examples()], eval=[])
    engine = FastEngine(base, data, config, "cpu", pad_id=0)
    assert engine.fast.four_bit and engine.fast.low_memory and engine.seq_len == FOUR_BIT_SEQ_LEN


def test_normal_buffers_shrink_for_large_models():
    from types import SimpleNamespace

    from tunesmith.train.fast import normal_buffer_tokens

    qwen3_06b = SimpleNamespace(num_hidden_layers=28, hidden_size=1024, intermediate_size=3072)
    qwen3_8b = SimpleNamespace(num_hidden_layers=36, hidden_size=4096, intermediate_size=12288)
    assert normal_buffer_tokens(qwen3_06b) == 4096  # ~4 GiB of activations
    assert normal_buffer_tokens(qwen3_8b) == 2048  # 4,096 would save ~20 GiB (measured peak at 2,048: 27.5 GiB)
