"""The fast model: a Hugging Face decoder run over packed buffers, LoRA in bf16, chunked cross-entropy.

It reuses the Hugging Face model's own modules (norms, projections, MLP, rotary embedding) and replaces
only what costs time: attention becomes flex attention with a per-document block mask over one packed
buffer, the loss never materializes the full logits, each decoder layer is compiled once for one static
shape, and the LoRA weights live in one flat bf16 buffer mirrored by one fp32 master for the optimizer.
Supported: Llama, Mistral (no sliding window), Qwen2 and Qwen3 decoders.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import torch
from torch import nn
from torch.nn.attention.flex_attention import BlockMask, create_block_mask, flex_attention
from torch.utils.checkpoint import checkpoint

from tunesmith.config import LoraConfig
from tunesmith.errors import ModelError
from tunesmith.train.fast.grouped import LayerGroups, layer_groups
from tunesmith.train.fast.lora import PEFT_PREFIX, LoraLinear, inject_lora
from tunesmith.train.fast.nf4 import NF4Linear, take_over_4bit
from tunesmith.train.fast.packing import IGNORE_INDEX, PackedBatch

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3")
ATTENTION_BLOCK = 128
"""Flex attention's block size (its default): the mask is kept or skipped per block of this many query and key
tokens. Smaller blocks skip more of a buffer of short documents (bench/RESULTS.md, issue 31)."""


class FastPathUnsupported(ModelError):
    """The GPU fast path cannot train this model; the plain transformers + peft loop can."""


def check_supported(model: nn.Module) -> None:
    cfg = model.config
    problem = None
    if cfg.model_type not in SUPPORTED_MODEL_TYPES:
        problem = f"model type {cfg.model_type!r}"
    elif getattr(cfg, "use_sliding_window", False) or (cfg.model_type == "mistral" and cfg.sliding_window):
        problem = "sliding-window attention"
    elif getattr(model.lm_head, "bias", None) is not None:
        problem = "a biased lm_head"
    if problem:
        raise FastPathUnsupported(
            f"the GPU fast path does not support {problem} (it runs {', '.join(SUPPORTED_MODEL_TYPES)})",
            hint="set train.device: cpu or use the transformers + peft loop",
        )


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary position embedding of x (tokens, heads, head_dim), cos/sin (tokens, head_dim)."""
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos[:, None, :] + rotated * sin[:, None, :]


class FastDecoderLayer(nn.Module):
    """One Hugging Face decoder layer run on a packed buffer: (tokens, hidden) in, (tokens, hidden) out.
    With `groups` (grouped.py) its seven LoRA projections run as four matmuls with the adapters folded in."""

    def __init__(self, layer: nn.Module, low_memory: bool, groups: LayerGroups | None = None):
        super().__init__()
        self.layer = layer
        self.low_memory = low_memory
        self.groups = groups
        self.run_body = self.body  # compile_layers may compile it alone (4-bit bases)
        # The checkpoint's recompute must replay the same dropout masks only where there is dropout; saving the
        # CUDA RNG state otherwise would be a host read that stops CUDA-graph capture.
        self.needs_rng = any(isinstance(m, LoraLinear) and not isinstance(m.dropout, nn.Identity)
                             for m in layer.modules())

    def forward(self, h: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, mask: BlockMask) -> torch.Tensor:
        if self.low_memory:
            # Activation checkpointing: keep only each layer's input, recompute the rest in backward.
            # Buys memory for ~1/3 more compute; measured (H200, 8,192-token buffers, CUDA graphs):
            # peak 12.3 -> 2.6 GiB, 106k -> 86k tokens/s.
            return checkpoint(self.run_body, h, cos, sin, mask, use_reentrant=False,
                              preserve_rng_state=self.needs_rng)
        return self.run_body(h, cos, sin, mask)

    def body(self, h: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, mask: BlockMask) -> torch.Tensor:
        if self.groups is not None:
            return self.grouped_body(h, cos, sin, mask)
        layer, attn = self.layer, self.layer.self_attn
        tokens, d = h.shape[0], attn.head_dim
        x = layer.input_layernorm(h)
        q = attn.q_proj(x).view(tokens, -1, d)
        k = attn.k_proj(x).view(tokens, -1, d)
        v = attn.v_proj(x).view(tokens, -1, d)
        if hasattr(attn, "q_norm"):  # Qwen3 normalizes each head
            q, k = attn.q_norm(q), attn.k_norm(k)
        q, k = rotate(q, cos, sin), rotate(k, cos, sin)
        o = document_attention(q, k, v, mask, attn.scaling)
        h = h + attn.o_proj(o.reshape(tokens, -1))
        return h + layer.mlp(layer.post_attention_layernorm(h))

    def grouped_body(self, h: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, mask: BlockMask) -> torch.Tensor:
        """`body` with the grouped projections: the same function of the same weights."""
        layer, attn, groups = self.layer, self.layer.self_attn, self.groups
        tokens, d = h.shape[0], attn.head_dim
        q, k, v = groups.qkv(layer.input_layernorm(h)).split(groups.qkv.outs, dim=1)
        q, k, v = q.view(tokens, -1, d), k.view(tokens, -1, d), v.view(tokens, -1, d)
        if hasattr(attn, "q_norm"):
            q, k = attn.q_norm(q), attn.k_norm(k)
        q, k = rotate(q, cos, sin), rotate(k, cos, sin)
        o = document_attention(q, k, v, mask, attn.scaling)
        h = h + groups.o(o.reshape(tokens, -1))
        gate, up = groups.gate_up(layer.post_attention_layernorm(h)).split(groups.gate_up.outs, dim=1)
        return h + groups.down(layer.mlp.act_fn(gate) * up)


def document_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: BlockMask | torch.Tensor,
                       scale: float) -> torch.Tensor:
    """Causal attention inside each packed document, (tokens, heads, head_dim) in and out.

    On CUDA, flex attention visits only the blocks the block-diagonal mask keeps, so a buffer of many
    short documents costs what the documents cost (measured: forward + backward 11.6 ms of an 83 ms step
    at 8,192 tokens, H200; dense SDPA over the whole buffer would do ~14x the attention work). Elsewhere
    (flex has no CPU backward) the same mask is a dense (tokens, tokens) boolean for SDPA.
    """
    q, k, v = q.transpose(0, 1)[None], k.transpose(0, 1)[None], v.transpose(0, 1)[None]
    gqa = q.shape[1] != k.shape[1]
    if isinstance(mask, BlockMask):
        out = flex_attention(q, k, v, block_mask=mask, scale=scale, enable_gqa=gqa)
    else:
        out = nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, enable_gqa=gqa)
    return out[0].transpose(0, 1)


def flex_configs_within(configs: list, size: int) -> list:
    """Inductor's flex attention kernel configs with every tile side cut to at most `size` (warps and stages
    kept), so that the kernels fit a block mask of `size`-token blocks."""
    out = []
    for conf in configs:
        tiles = {f.name: min(getattr(conf, f.name), size) for f in dataclasses.fields(conf)
                 if f.name.startswith("block_")}
        if (shrunk := dataclasses.replace(conf, **tiles)) not in out:
            out.append(shrunk)
    return out


def use_flex_blocks(size: int) -> None:
    """Make inductor pick flex attention kernels whose tiles divide `size` (its defaults on Hopper use 128-row
    tiles, which a mask of 64-token blocks rejects). Process-wide: inductor asks one handler for its choices."""
    # Imported here: inductor's import takes seconds, and only CUDA runs need it.
    from torch._inductor.virtualized import V

    if getattr(V.choices, "flex_tile", None) == size:
        return

    class SmallFlexTiles(type(V.choices)):
        flex_tile = size

        def get_flex_attention_fwd_configs(self, head_dim, dtype, device_type="cuda"):
            return flex_configs_within(super().get_flex_attention_fwd_configs(head_dim, dtype, device_type), size)

        def get_flex_attention_bwd_configs(self, head_dim, dtype, device_type="cuda"):
            return flex_configs_within(super().get_flex_attention_bwd_configs(head_dim, dtype, device_type), size)

    V.set_choices_handler(SmallFlexTiles())


def dense_document_mask(doc_ids: torch.Tensor) -> torch.Tensor:
    """The block-diagonal causal mask as a (tokens, tokens) boolean: True where attention is allowed."""
    n = doc_ids.shape[0]
    causal = torch.ones(n, n, dtype=torch.bool, device=doc_ids.device).tril()
    return causal & (doc_ids[:, None] == doc_ids[None, :])


def document_mask_mod(doc_ids: torch.Tensor) -> Callable:
    def mask_mod(b, h, q_idx, kv_idx):
        return (doc_ids[q_idx] == doc_ids[kv_idx]) & (q_idx >= kv_idx)

    return mask_mod


def _cross_entropy_chunk(h: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor):
    """Summed cross-entropy of one chunk of tokens and its gradient with respect to h."""
    logits = (h @ weight.T).float()
    lse = torch.logsumexp(logits, dim=-1)
    valid = targets != IGNORE_INDEX
    safe = torch.where(valid, targets, 0)
    loss = ((lse - logits.gather(1, safe[:, None])[:, 0]) * valid).sum()
    probs = torch.exp(logits - lse[:, None])
    onehot = torch.arange(logits.shape[1], device=h.device)[None, :] == safe[:, None]
    grad_logits = ((probs - onehot.float()) * valid[:, None]).to(h.dtype)
    return loss, grad_logits @ weight


class ChunkedLinearCrossEntropy(torch.autograd.Function):
    """Cross-entropy of (h @ weight.T) summed over tokens, computed `chunk` tokens at a time.

    Never holds more than one chunk's logits (151,936 x 2,048 bf16 is 0.6 GB; all 8,192 tokens in
    fp32 would be 5 GB) and computes the gradient during the forward pass, so backward is free.
    The weight (the frozen lm_head) gets no gradient. Measured: lm_head matmuls + loss 9 ms of an
    83 ms step at 8,192 tokens (H200), of which ~3 ms is the fused softmax/gradient kernel.
    """

    @staticmethod
    def forward(ctx, h, weight, targets, chunk, chunk_fn):
        loss = torch.zeros((), dtype=torch.float32, device=h.device)
        grad = torch.empty_like(h)
        for start in range(0, h.shape[0], chunk):
            part_loss, grad[start:start + chunk] = chunk_fn(
                h[start:start + chunk], weight, targets[start:start + chunk])
            loss += part_loss
        ctx.save_for_backward(grad)
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        (grad,) = ctx.saved_tensors
        return grad * grad_loss.to(grad.dtype), None, None, None, None


class FastCausalLM(nn.Module):
    """A causal LM with LoRA adapters, trained on `PackedBatch`es. Call it to get the mean token loss."""

    def __init__(self, model: nn.Module, lora_cfg: LoraConfig, low_memory: bool = False,
                 compile: bool | None = None, ce_chunk: int | None = None, grouped: bool = True,
                 attention_block: int = ATTENTION_BLOCK):
        super().__init__()
        check_supported(model)
        self.model = model
        self.attention_block = attention_block
        if attention_block < ATTENTION_BLOCK:
            use_flex_blocks(attention_block)
        # A QLoRA base (bitsandbytes' 4-bit layers, or NF4Linear already): its NF4 tensors are read by torch
        # ops the compiler fuses (nf4.py). Its point is memory, so its layers are always checkpointed.
        self.four_bit = take_over_4bit(model) > 0 or any(isinstance(m, NF4Linear) for m in model.modules())
        low_memory = low_memory or self.four_bit
        self.low_memory = low_memory
        self.loras: dict[str, LoraLinear] = inject_lora(model, lora_cfg)
        device = model.lm_head.weight.device
        compile = device.type == "cuda" if compile is None else compile
        self.ce_chunk = ce_chunk or (1024 if low_memory else 2048)
        self.layers = [FastDecoderLayer(layer, low_memory, layer_groups(layer) if grouped else None)
                       for layer in model.model.layers]
        self.groups = [g for layer in self.layers if layer.groups is not None for g in layer.groups.all()]
        self.ce_fn = _cross_entropy_chunk
        if compile:
            compile_layers(self.layers)
            self.ce_fn = torch.compile(_cross_entropy_chunk, fullgraph=True, dynamic=False)
        self.master = flatten_lora_weights(self)
        self._doc_id_buffers: dict[tuple, tuple[torch.Tensor, Callable]] = {}

    # Forward ----------------------------------------------------------------------------------------
    def forward(self, batch: PackedBatch, normalizer: int | torch.Tensor | None = None) -> torch.Tensor:
        """Mean cross-entropy over the batch's targets (or their sum over `normalizer`)."""
        mask = self.document_block_mask(batch.doc_ids)
        loss = self.summed_loss(batch.input_ids, batch.position_ids, batch.targets, mask)
        return loss / (normalizer if normalizer is not None else max(batch.num_targets, 1))

    def summed_loss(self, input_ids: torch.Tensor, position_ids: torch.Tensor, targets: torch.Tensor,
                    mask: BlockMask | torch.Tensor) -> torch.Tensor:
        """Summed cross-entropy of one packed buffer; every shape static, no host sync (graph-capturable)."""
        inner = self.model.model
        h = inner.embed_tokens(input_ids)
        cos, sin = (t[0] for t in inner.rotary_emb(h, position_ids[None]))
        for layer in self.layers:
            h = layer(h, cos, sin, mask)
        h = inner.norm(h)
        return ChunkedLinearCrossEntropy.apply(h, self.model.lm_head.weight, targets, self.ce_chunk, self.ce_fn)

    def document_block_mask(self, doc_ids: torch.Tensor) -> BlockMask | torch.Tensor:
        if doc_ids.device.type != "cuda":
            return dense_document_mask(doc_ids)
        # One doc-id buffer per buffer length, refilled in place, so the mask function is the same object
        # every step (the compiled layers never see a new closure) and a captured CUDA graph, which reads
        # that buffer, stays valid even after batches of another length went through.
        key = (doc_ids.shape[0], doc_ids.device)
        if key not in self._doc_id_buffers:
            buffer = torch.empty_like(doc_ids)
            self._doc_id_buffers[key] = (buffer, document_mask_mod(buffer))
        buffer, mask_mod = self._doc_id_buffers[key]
        buffer.copy_(doc_ids)
        n = doc_ids.shape[0]
        return create_block_mask(mask_mod, None, None, n, n, device=doc_ids.device, BLOCK_SIZE=self.attention_block)

    # LoRA weights: bf16 working copy, fp32 master ---------------------------------------------------
    def master_parameters(self) -> list[nn.Parameter]:
        """What the optimizer updates: one flat fp32 tensor holding every LoRA weight."""
        return [self.master]

    def grads_to_master(self, accumulate: bool = False) -> None:
        if accumulate:
            self.master.grad.add_(self._flat_grad)
        else:
            self.master.grad.copy_(self._flat_grad)
        self._flat_grad.zero_()

    def master_to_weights(self) -> None:
        with torch.no_grad():
            self._flat.copy_(self.master)
        for group in self.groups:
            group.sync()

    def adapter_state_dict(self, grads: bool = False) -> dict[str, torch.Tensor]:
        """The adapter in peft's format (`base_model.model.<module>.lora_A.weight`), fp32, on the CPU.
        With `grads`, the master gradients under the same keys instead (for checks)."""
        flat = (self.master.grad if grads else self.master).detach().cpu()
        return {key: flat[start:start + shape.numel()].view(shape).clone() for key, start, shape in self._slots}

    def load_adapter_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Set the LoRA weights from a peft-format state dict (with or without peft's adapter name)."""
        clean = {k.replace(".default.weight", ".weight"): v for k, v in state.items()}
        with torch.no_grad():
            for key, start, shape in self._slots:
                self.master[start:start + shape.numel()].copy_(clean[key].reshape(-1))
        self.master_to_weights()


def compile_layers(layers: list[FastDecoderLayer]) -> None:
    """Compile each decoder layer for one static shape: fuses norms, rotary, residuals and the SiLU
    gate into a few kernels and cuts per-operator dispatch. All layers share one compiled graph
    (parameters are graph inputs), so compile time is one layer's (~20 s of warm-up on H100).
    Measured: 96.7k tokens/s at 8,192 tokens without CUDA graphs (H200); there is no eager baseline
    worth timing, since flex attention uncompiled materializes the scores.

    A 4-bit base's layers compile their body only and checkpoint it eagerly around the compiled call: compiled
    whole (checkpoint inside the graph), the partitioner kept every layer's dequantized weights for backward
    (an 8B QLoRA step ran out of a 14.5 GiB cap in its first forward, H100, 2026-12-07); the eager checkpoint
    drops whatever the compiled body saves and recomputes it layer by layer in backward."""
    for layer in layers:
        if layer.groups is not None and layer.groups.qkv.four_bit or any(
                isinstance(m, NF4Linear) for m in layer.layer.modules()):
            layer.run_body = torch.compile(layer.body, dynamic=False)
        else:
            layer.compile(dynamic=False)


def flatten_lora_weights(fast: FastCausalLM) -> nn.Parameter:
    """Put every LoRA weight in one flat buffer (model dtype) with one flat gradient buffer, and
    return a flat fp32 master copy for the optimizer. Buys: no per-call dtype casts in the forward,
    fp32 optimizer math, and an optimizer step that is one fused kernel over ~10M numbers (not timed
    alone; the rank-16 LoRA matmuls themselves cost ~8 ms of the 83 ms step at 8,192 tokens, H200)."""
    params: list[tuple[str, nn.Parameter]] = []
    for name, m in fast.loras.items():
        params += [(f"{PEFT_PREFIX}{name}.lora_A.weight", m.lora_A), (f"{PEFT_PREFIX}{name}.lora_B.weight", m.lora_B)]
    total = sum(p.numel() for _, p in params)
    ref = params[0][1]
    flat = torch.empty(total, dtype=ref.dtype, device=ref.device)
    flat_grad = torch.zeros_like(flat)
    slots, start = [], 0
    for key, p in params:
        n = p.numel()
        flat[start:start + n].copy_(p.detach().reshape(-1))
        p.data = flat[start:start + n].view_as(p)
        p.grad = flat_grad[start:start + n].view_as(p)
        slots.append((key, start, p.shape))
        start += n
    fast._flat, fast._flat_grad, fast._slots = flat, flat_grad, slots
    master = nn.Parameter(flat.detach().float().clone())
    master.grad = torch.zeros_like(master)
    return master
