"""LoRA projections that read the same input, computed as one matmul with the adapter folded in.

A decoder layer's seven LoRA projections form four groups by input: q/k/v (the normed hidden state), o (the
attention output), gate/up (the normed hidden state after attention), down (the SwiGLU product). Each group
keeps one matrix

    E = [[W, B],      W: the members' frozen weights stacked (out x in)
         [A, 0]]      A: their LoRA A stacked (R x in);  B: their LoRA B, block-diagonal (out x R)

and computes, for x (tokens x in) and xa = scaling * x A^T (tokens x R):

    forward      y      = [x | xa] @ [W | B]^T             one GEMM: the frozen product and the adapter's
    backward     g_xa   = scaling * (g_y @ B)              tokens x R
                 g_x    = g_y @ W + g_xa @ A               one GEMM accumulating onto a rank-R product
                 g_B    = g_y^T @ xa,  g_A = g_xa^T @ x    small

instead of, per projection, the frozen product, two rank-r products, an add of the full output, and in
backward two more full-size adds. At 8B that is ~3 GB less memory traffic per layer and step (bench/RESULTS.md,
issue 31); the frozen GEMMs also get wider (q/k/v: N = 6,144 instead of 4,096 + 2 x 1,024).

The frozen weights are moved into E once (the Hugging Face modules keep views of them, so generation and
export see the same weights and no memory is doubled). The trainable A and B stay where the fast path keeps
them (views of its flat buffer, which the optimizer updates); `sync()` copies them into E after each update.
With a 4-bit base, W is dequantized on every call and E is assembled around it (cat fuses into the
dequantization kernel when compiled).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from tunesmith.train.fast.lora import LoraLinear
from tunesmith.train.fast.nf4 import NF4Linear

GROUPS = (("self_attn", ("q_proj", "k_proj", "v_proj")), ("self_attn", ("o_proj",)),
          ("mlp", ("gate_proj", "up_proj")), ("mlp", ("down_proj",)))
ALIGN = 8
"""E's width and the adapter block are padded to multiples of 8 elements (16-byte rows for cuBLAS)."""


class _GroupMatmul(torch.autograd.Function):
    """y = [x | scaling * x A^T] @ E[:out]^T, gradients for x and the members' A and B (never for W)."""

    @staticmethod
    def forward(ctx, x, E, n_in, n_out, rank, ranks, scaling, *params):
        xa = nn.functional.linear(x, E[n_out:, :n_in]) * scaling  # (tokens, R_padded)
        xcat = torch.cat((x, xa), dim=1)
        ctx.save_for_backward(xcat, E)
        ctx.shape = (n_in, n_out, rank, ranks, scaling)
        return nn.functional.linear(xcat, E[:n_out])

    @staticmethod
    def backward(ctx, gy):
        xcat, E = ctx.saved_tensors
        n_in, n_out, _, ranks, scaling = ctx.shape
        x, xa = xcat[:, :n_in], xcat[:, n_in:]
        g_xa = (gy @ E[:n_out, n_in:]) * scaling
        gx = torch.addmm(g_xa @ E[n_out:, :n_in], gy, E[:n_out, :n_in])
        g_b = gy.t() @ xa  # (out, R): only the diagonal blocks are the members' B gradients
        g_a = g_xa.t() @ x  # (R, in)
        grads_a, grads_b, row, col = [], [], 0, 0
        for r, out in ranks:
            grads_a.append(g_a[col:col + r])
            grads_b.append(g_b[row:row + out, col:col + r])
            row, col = row + out, col + r
        return (gx, None, None, None, None, None, None, *grads_a, *grads_b)


class LoraGroup(nn.Module):
    """The LoRA projections of one group, called on their shared input: returns the members' outputs
    side by side (tokens, sum of outs)."""

    def __init__(self, members: list[LoraLinear]):
        super().__init__()
        self.members = members  # a plain list: the modules stay registered in the Hugging Face model only
        bases = [m.base_layer for m in members]
        self.n_in = bases[0].in_features
        self.outs = [b.out_features for b in bases]
        self.n_out = sum(self.outs)
        self.rank = math.ceil(sum(m.r for m in members) / ALIGN) * ALIGN
        self.ranks = tuple((m.r, b.out_features) for m, b in zip(members, bases, strict=True))
        self.scaling = members[0].scaling
        self.four_bit = isinstance(bases[0], NF4Linear)
        dtype, device = members[0].lora_A.dtype, members[0].lora_A.device
        n_in_padded = self.n_in + self.rank
        if self.four_bit:  # W comes from the 4-bit weights each call; E's other blocks are kept here
            self.register_buffer("b_block", torch.zeros(self.n_out, self.rank, dtype=dtype, device=device),
                                 persistent=False)
            self.register_buffer("a_block", torch.zeros(self.rank, n_in_padded, dtype=dtype, device=device),
                                 persistent=False)
        else:
            E = torch.zeros(self.n_out + self.rank, n_in_padded, dtype=dtype, device=device)
            row = 0
            for base in bases:  # the frozen weights move into E; the modules keep views (no second copy)
                E[row:row + base.out_features, :self.n_in].copy_(base.weight.detach())
                base.weight.data = E[row:row + base.out_features, :self.n_in]
                row += base.out_features
            self.register_buffer("E", E, persistent=False)
            self.b_block = E[:self.n_out, self.n_in:]
            self.a_block = E[self.n_out:]
        self.sync()

    def sync(self) -> None:
        """Copy the members' current A and B into E (after every optimizer step)."""
        with torch.no_grad():
            row, col = 0, 0
            for m in self.members:
                r, out = m.r, m.base_layer.out_features
                self.a_block[col:col + r, :self.n_in].copy_(m.lora_A)
                self.b_block[row:row + out, col:col + r].copy_(m.lora_B)
                row, col = row + out, col + r

    def matrix(self) -> torch.Tensor:
        if not self.four_bit:
            return self.E
        w = torch.cat([m.base_layer.dequantized() for m in self.members], dim=0)
        return torch.cat((torch.cat((w, self.b_block), dim=1), self.a_block), dim=0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        params = [m.lora_A for m in self.members] + [m.lora_B for m in self.members]
        return _GroupMatmul.apply(x, self.matrix(), self.n_in, self.n_out, self.rank, self.ranks, self.scaling,
                                  *params)


class LayerGroups(nn.Module):
    """The four groups of one decoder layer."""

    def __init__(self, qkv: LoraGroup, o: LoraGroup, gate_up: LoraGroup, down: LoraGroup):
        super().__init__()
        self.qkv, self.o, self.gate_up, self.down = qkv, o, gate_up, down

    def all(self) -> tuple[LoraGroup, ...]:
        return self.qkv, self.o, self.gate_up, self.down


def layer_groups(layer: nn.Module) -> LayerGroups | None:
    """The groups of a decoder layer, or None when it cannot be grouped: a projection without LoRA, LoRA
    dropout, biases, or members whose ranks or scalings differ."""
    groups = []
    for parent, names in GROUPS:
        owner = getattr(layer, parent, None)
        members = [getattr(owner, name, None) for name in names]
        if not all(isinstance(m, LoraLinear) for m in members):
            return None
        if any(not isinstance(m.dropout, nn.Identity) or getattr(m.base_layer, "bias", None) is not None
               for m in members):
            return None
        if len({m.scaling for m in members}) > 1 or len({m.base_layer.in_features for m in members}) > 1:
            return None
        groups.append(members)
    if not isinstance(getattr(layer.mlp, "act_fn", None), nn.Module):
        return None
    return LayerGroups(*(LoraGroup(members) for members in groups))
