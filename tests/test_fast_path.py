"""The GPU fast path's math, checked on the CPU at tiny shapes against transformers + peft (fp32).

Packing and per-document attention, the LoRA layer and its fp32 master weights, the chunked loss, the
train step and the exported adapter. bench/train_gpu.py runs the same checks in bf16 on a GPU.
"""

from __future__ import annotations

import copy

import pytest
import torch
from peft import LoraConfig as PeftLoraConfig
from peft import PeftModel, get_peft_model, set_peft_model_state_dict
from torch.nn.attention.flex_attention import create_block_mask, flex_attention
from transformers import LlamaConfig, LlamaForCausalLM, Qwen3Config, Qwen3ForCausalLM

from tunesmith.config import PROJECTIONS, LoraConfig
from tunesmith.train.fast import (
    IGNORE_INDEX,
    FastPathUnsupported,
    make_optimizer,
    make_train_step,
    pack,
    prepare_fast_model,
    save_adapter,
)
from tunesmith.train.fast.model import dense_document_mask, document_mask_mod, flex_configs_within

LENGTHS = [5, 17, 9, 30, 12, 3]


def tiny_qwen3(seed: int = 0, arch: str = "qwen3"):
    """A tiny random Qwen3 (per-head q/k norms), or Llama (SmolLM2's architecture, none)."""
    torch.manual_seed(seed)
    shape = {"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
             "head_dim": 16, "intermediate_size": 128, "vocab_size": 256, "tie_word_embeddings": True,
             "max_position_embeddings": 256}
    if arch == "llama":
        return LlamaForCausalLM(LlamaConfig(**shape)).float()
    return Qwen3ForCausalLM(Qwen3Config(**shape)).float()


def examples(lengths=LENGTHS, seed: int = 1) -> list[tuple[list[int], list[int]]]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for n in lengths:
        ids = torch.randint(0, 256, (n,), generator=g).tolist()
        labels = [IGNORE_INDEX] * min(2, n - 1) + ids[min(2, n - 1):]  # a prompt without loss
        out.append((ids, labels))
    return out


def padded(exs):
    width = max(len(ids) for ids, _ in exs)
    ids = torch.zeros(len(exs), width, dtype=torch.long)
    labels = torch.full((len(exs), width), IGNORE_INDEX)
    mask = torch.zeros(len(exs), width, dtype=torch.long)
    for i, (a, b) in enumerate(exs):
        ids[i, :len(a)], labels[i, :len(b)], mask[i, :len(a)] = torch.tensor(a), torch.tensor(b), 1
    return {"input_ids": ids, "labels": labels, "attention_mask": mask}


def pair(low_memory: bool = False, seed: int = 0, arch: str = "qwen3"):
    """A fast model and a peft reference with identical weights, LoRA B nonzero so every LoRA weight
    gets a gradient."""
    base = tiny_qwen3(seed, arch)
    ref = get_peft_model(copy.deepcopy(base), PeftLoraConfig(r=16, lora_alpha=16, target_modules=PROJECTIONS))
    fast = prepare_fast_model(base, LoraConfig(), low_memory=low_memory)
    g = torch.Generator().manual_seed(2)
    state = {k: torch.randn(v.shape, generator=g) * 0.1 for k, v in fast.adapter_state_dict().items()}
    fast.load_adapter_state_dict(state)
    assert not set_peft_model_state_dict(ref, state).unexpected_keys
    return fast, ref


def ref_grads(ref) -> dict[str, torch.Tensor]:
    return {k.replace(".default", ""): p.grad.clone() for k, p in ref.named_parameters() if p.requires_grad}


def assert_close_grads(fast_grads, reference, min_cos=0.9999):
    assert fast_grads.keys() == reference.keys()
    for k in fast_grads:
        cos = torch.nn.functional.cosine_similarity(fast_grads[k].flatten(), reference[k].flatten(), dim=0)
        assert cos > min_cos, (k, float(cos))
        assert torch.allclose(fast_grads[k], reference[k], rtol=1e-3, atol=1e-5), k


def test_pack_shapes_boundaries_and_shifted_targets():
    exs = examples()
    batches = pack(exs, 40)
    assert all(b.input_ids.shape == (40,) for b in batches)
    assert sorted(n for b in batches for n in (b.cu_seqlens[1:] - b.cu_seqlens[:-1]).tolist()[
        : len(b.cu_seqlens) - (2 if b.num_tokens < 40 else 1)]) == sorted(LENGTHS)
    assert sum(b.num_tokens for b in batches) == sum(LENGTHS)
    found = 0
    for b in batches:
        for d, (start, end) in enumerate(zip(b.cu_seqlens[:-1].tolist(), b.cu_seqlens[1:].tolist(), strict=True)):
            assert b.position_ids[start:end].tolist() == list(range(end - start))
            assert (b.doc_ids[start:end] == d).all()
            assert b.targets[end - 1] == IGNORE_INDEX  # never predicts the next document's first token
        ids, targets = b.input_ids.tolist(), b.targets.tolist()
        for ex_ids, ex_labels in exs:  # each example's targets are its labels shifted by one
            n = len(ex_ids)
            for s in range(40 - n + 1):
                if ids[s:s + n] == ex_ids and b.position_ids[s] == 0:
                    assert targets[s:s + n] == ex_labels[1:] + [IGNORE_INDEX]
                    found += 1
    assert found == len(exs)  # every example was found, at the start of a document, and checked
    assert sum(b.num_targets for b in batches) == sum(sum(x != IGNORE_INDEX for x in lab[1:]) for _, lab in exs)
    with pytest.raises(ValueError, match="does not fit"):
        pack([([1] * 50, [1] * 50)], 40)


def test_flex_block_mask_is_the_dense_document_mask():
    b = pack(examples(), 80)[0]
    dense = dense_document_mask(b.doc_ids)
    q_idx, kv_idx = torch.meshgrid(torch.arange(80), torch.arange(80), indexing="ij")
    assert torch.equal(document_mask_mod(b.doc_ids)(0, 0, q_idx, kv_idx), dense)
    # And flex attention (forward; it has no CPU backward) with its block mask equals SDPA with the dense mask.
    q, k, v = (torch.randn(1, 4, 80, 16) for _ in range(3))
    block = create_block_mask(document_mask_mod(b.doc_ids), None, None, 80, 80, device="cpu")
    out = flex_attention(q, k, v, block_mask=block)
    ref = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=dense)
    assert torch.allclose(out, ref, atol=1e-5)


def test_flex_blocks_of_64_keep_the_document_mask():
    """attention_block=64: the 64-token block mask is the same mask, and inductor's own kernel configs for it
    (H100's defaults use 128-row tiles) are cut to tiles that divide 64, warps and stages kept."""
    from torch._inductor.template_heuristics.triton import FlexBwDConfig, FlexConfig

    b = pack(examples(), 128)[0]
    q, k, v = (torch.randn(1, 4, 128, 16) for _ in range(3))
    block = create_block_mask(document_mask_mod(b.doc_ids), None, None, 128, 128, device="cpu", BLOCK_SIZE=64)
    assert block.BLOCK_SIZE == (64, 64)
    ref = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=dense_document_mask(b.doc_ids))
    assert torch.allclose(flex_attention(q, k, v, block_mask=block), ref, atol=1e-5)
    fwd = flex_configs_within([FlexConfig(128, 64, 3, 8), FlexConfig(64, 64, 3, 8)], 64)
    assert fwd == [FlexConfig(64, 64, 3, 8)]
    bwd = flex_configs_within([FlexBwDConfig(64, 128, 128, 64, 3, 8)], 64)
    assert bwd == [FlexBwDConfig(64, 64, 64, 64, 3, 8)]


def assert_matches_peft(fast, ref) -> None:
    """One packed buffer through the fast model, the same examples padded through peft: loss within 1e-5
    relative, LoRA gradients as assert_close_grads."""
    exs = examples()
    batches = pack(exs, 96)
    assert len(batches) == 1
    loss = fast(batches[0])
    loss.backward()
    fast.grads_to_master()
    out = ref(**padded(exs))
    out.loss.backward()
    assert abs(loss.item() - out.loss.item()) < 1e-5 * out.loss.item()
    assert_close_grads(fast.adapter_state_dict(grads=True), ref_grads(ref))


@pytest.mark.parametrize(("arch", "low_memory"), [("qwen3", False), ("qwen3", True), ("llama", False)])
def test_packed_loss_and_lora_grads_match_peft(arch, low_memory):
    assert_matches_peft(*pair(low_memory, arch=arch))


def test_attention_never_crosses_documents():
    fast, _ = pair()
    exs = examples()
    alone = fast(pack(exs[:1], 96)[0]) * pack(exs[:1], 96)[0].num_targets
    # The same first document packed with others: its summed loss is unchanged.
    batch = pack(exs, 96)[0]
    with torch.no_grad():
        other = pack(exs[1:], 96)[0]
        together = fast(batch) * batch.num_targets - fast(other) * other.num_targets
    assert abs(float(alone) - float(together)) < 1e-4 * abs(float(alone))


def test_chunked_loss_equals_one_chunk():
    fast, _ = pair()
    batch = pack(examples(), 96)[0]
    fast.ce_chunk = 96
    whole = fast(batch)
    fast.ce_chunk = 7  # not a divisor: a short last chunk
    assert abs(float(fast(batch)) - float(whole)) < 1e-6 * float(whole)


def test_training_tracks_peft_and_accumulation_matches_one_batch():
    fast, ref = pair()
    exs = examples()
    opt = make_optimizer(fast, lr=1e-2)
    step = make_train_step(fast, opt, max_grad_norm=1.0)
    ref_opt = torch.optim.AdamW([p for p in ref.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.0)
    halves = [pack(exs[:3], 64)[0], pack(exs[3:], 64)[0]]  # gradient accumulation over two buffers
    curve, ref_curve = [], []
    for _ in range(6):
        curve.append(float(step(halves)))
        out = ref(**padded(exs))
        out.loss.backward()
        ref_norm = torch.nn.utils.clip_grad_norm_([p for p in ref.parameters() if p.requires_grad], 1.0)
        assert abs(float(step.grad_norm) - float(ref_norm)) < 1e-4 * float(ref_norm)  # the norm before clipping
        ref_opt.step()
        ref_opt.zero_grad()
        ref_curve.append(float(out.loss))
    assert curve[-1] < curve[0] - 0.1  # it learns
    for mine, theirs in zip(curve, ref_curve, strict=True):
        assert abs(mine - theirs) < 1e-4 * theirs
    state = fast.adapter_state_dict()
    for k, p in ref.named_parameters():  # Adam's first step moves every weight by ~lr: 1e-4 is 1% of that
        if p.requires_grad:
            assert torch.allclose(state[k.replace(".default", "")], p.detach(), atol=1e-4), k


def test_exported_adapter_loads_in_peft_and_gives_the_same_loss(tmp_path):
    fast, _ = pair()
    exs = examples()
    batch = pack(exs, 96)[0]
    with torch.no_grad():
        loss = float(fast(batch))
    path = save_adapter(fast.adapter_state_dict(), LoraConfig(), tmp_path / "adapter")
    assert (path / "adapter_config.json").exists() and (path / "adapter_model.safetensors").exists()
    loaded = PeftModel.from_pretrained(tiny_qwen3(), str(path))
    with torch.no_grad():
        ref_loss = float(loaded(**padded(exs)).loss)
    assert abs(loss - ref_loss) < 1e-5 * ref_loss


def test_unsupported_architecture_is_a_clear_error():
    from transformers import GPT2Config, GPT2LMHeadModel

    model = GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=1, n_head=2, vocab_size=64))
    with pytest.raises(FastPathUnsupported, match="gpt2"):
        prepare_fast_model(model, LoraConfig())


def _scan_best_fit(lengths: list[int], capacity: int) -> list[list[int]]:
    """Best fit by scanning every bin (the quadratic way packing used to do it): the reference."""
    bins, room = [], []
    for i, n in enumerate(lengths):
        best = min((j for j, r in enumerate(room) if r >= n), key=lambda j: room[j], default=None)
        if best is None:
            bins.append([i])
            room.append(capacity - n)
        else:
            bins[best].append(i)
            room[best] -= n
    return bins


@pytest.mark.parametrize(("low", "high", "capacity"), [(1, 40, 40), (129, 154, 4096), (150, 320, 4096), (1, 9, 10)])
def test_best_fit_places_every_example_as_the_full_scan_does(low, high, capacity):
    import random

    from tunesmith.train.fast.packing import best_fit

    rng = random.Random(low * 1000 + high)
    for count in (0, 1, 7, 500):
        lengths = sorted((rng.randint(low, high) for _ in range(count)), reverse=True)
        assert best_fit(lengths, capacity) == _scan_best_fit(lengths, capacity)
        shuffled = rng.sample(lengths, len(lengths))  # best fit (not decreasing) too: ties and reuse of rooms
        assert best_fit(shuffled, capacity) == _scan_best_fit(shuffled, capacity)
