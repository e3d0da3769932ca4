"""4-bit NormalFloat (NF4) weights for the fast path: bitsandbytes' storage, dequantized by plain torch ops.

QLoRA's base is what `load_model(..., four_bit=True)` makes: bitsandbytes quantizes each linear layer while
loading (blocks of 64 weights, one absmax each, two 4-bit codes per byte, high nibble first; the absmaxes
themselves quantized to 8 bits in blocks of 256, plus an offset: "double quantization"). The fast path keeps
those very tensors (no copy, no second quantization) and dequantizes them with the torch ops below instead of
bitsandbytes' kernel. Inside a compiled decoder layer Inductor turns them into one fused Triton kernel per weight
that writes the bf16 matrix the frozen matmul reads (bitsandbytes' own kernel would be an opaque call that
breaks the graph); on the CPU the same ops run eagerly, so the 4-bit path is tested without a GPU.

The arithmetic is bitsandbytes' CUDA kernel's: code[nibble] * absmax in float32, then one rounding to the
compute dtype; the absmax is code2[byte] * absmax2[block of 256] + offset in float32 (bench/train_gpu.py
checks the result against `bitsandbytes.functional.dequantize_4bit`, bit for bit, on the GPU).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

NF4_CODE = (
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
    -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
    0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
)
"""The 16 NF4 levels (quantiles of a normal distribution scaled to [-1, 1]; the QLoRA paper, bitsandbytes)."""
BLOCKSIZE = 64


@dataclass
class NF4Weight:
    """One matrix in NF4: `packed` (numel / 2 bytes), its block scales, and what is needed to read them.

    Single quantization: `absmax` float32, one per block. Double quantization (bitsandbytes' default for
    QLoRA): `absmax` uint8 codes into `code2` (256 float32 levels), scaled per block of `blocksize2` absmaxes
    by `absmax2`, plus `offset`.
    """

    packed: torch.Tensor
    absmax: torch.Tensor
    shape: tuple[int, int]
    code: torch.Tensor
    blocksize: int = BLOCKSIZE
    code2: torch.Tensor | None = None
    absmax2: torch.Tensor | None = None
    blocksize2: int = 256
    offset: torch.Tensor | None = None
    """A 0-d float32 tensor (not a Python float: the compiled layers, shared by all layers, must not see a
    constant that differs between them)."""

    def tensors(self) -> dict[str, torch.Tensor]:
        out = {"packed": self.packed, "absmax": self.absmax, "code": self.code}
        if self.code2 is not None:
            out |= {"code2": self.code2, "absmax2": self.absmax2, "offset": self.offset}
        return out


def block_scales(w: NF4Weight) -> torch.Tensor:
    """The float32 absmax of every block (double quantization undone)."""
    if w.code2 is None:
        return w.absmax
    blocks = w.absmax.numel()
    which = torch.arange(blocks, device=w.absmax.device) // w.blocksize2
    return w.code2[w.absmax.long()] * w.absmax2[which] + w.offset


def dequantize(w: NF4Weight, dtype: torch.dtype) -> torch.Tensor:
    """The (out, in) matrix in `dtype`: code[nibble] * absmax in float32, rounded once."""
    packed = w.packed.reshape(-1)
    nibbles = torch.stack((packed >> 4, packed & 15), dim=-1).reshape(-1).long()  # high nibble first
    values = w.code[nibbles].view(-1, w.blocksize) * block_scales(w)[:, None]
    return values.to(dtype).view(w.shape)


def quantize(weight: torch.Tensor, blocksize: int = BLOCKSIZE) -> NF4Weight:
    """NF4 with single quantization (float32 absmax), for tests and CPU runs: each weight to the nearest level
    of its block's scaled range. (On CUDA the base is quantized by bitsandbytes while loading, not here.)"""
    code = torch.tensor(NF4_CODE, dtype=torch.float32, device=weight.device)
    flat = weight.detach().float().reshape(-1, blocksize)
    absmax = flat.abs().amax(dim=1)
    scaled = (flat / absmax.clamp_min(torch.finfo(torch.float32).tiny)[:, None]).clamp(-1, 1)
    midpoints = (code[1:] + code[:-1]) / 2
    index = torch.bucketize(scaled, midpoints).to(torch.uint8).reshape(-1)
    packed = (index[0::2] << 4) | index[1::2]
    return NF4Weight(packed, absmax, tuple(weight.shape), code, blocksize)


class NF4Linear(nn.Module):
    """A frozen linear layer whose weight is stored in NF4 and dequantized on every call (as bitsandbytes'
    Linear4bit computes: dequantize to the compute dtype, then an ordinary matmul)."""

    def __init__(self, w: NF4Weight, bias: torch.Tensor | None, compute_dtype: torch.dtype):
        super().__init__()
        self.in_features, self.out_features = w.shape[1], w.shape[0]
        self.compute_dtype = compute_dtype
        self._meta = {"shape": w.shape, "blocksize": w.blocksize, "blocksize2": w.blocksize2}
        for name, tensor in w.tensors().items():
            self.register_buffer(name, tensor, persistent=False)
        self.bias = None if bias is None else nn.Parameter(bias.detach(), requires_grad=False)

    @property
    def nf4(self) -> NF4Weight:
        return NF4Weight(self.packed, self.absmax, code=self.code, code2=getattr(self, "code2", None),
                         absmax2=getattr(self, "absmax2", None), offset=getattr(self, "offset", None), **self._meta)

    @property
    def device(self) -> torch.device:
        return self.packed.device

    def dequantized(self) -> torch.Tensor:
        return dequantize(self.nf4, self.compute_dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.linear(x, self.dequantized(), self.bias)

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> NF4Linear:
        return cls(quantize(linear.weight), linear.bias, linear.weight.dtype)

    @classmethod
    def from_bnb(cls, module: nn.Module) -> NF4Linear:
        """Wrap a bitsandbytes Linear4bit's own tensors (no copy)."""
        state = module.weight.quant_state
        if state.quant_type != "nf4":
            raise ValueError(f"the fast path reads NF4 weights, not {state.quant_type}")
        nested = getattr(state, "nested", False) or state.state2 is not None
        w = NF4Weight(
            packed=module.weight.data.view(torch.uint8).reshape(-1), absmax=state.absmax,
            shape=tuple(state.shape), code=state.code.float(), blocksize=state.blocksize,
            code2=state.state2.code if nested else None, absmax2=state.state2.absmax if nested else None,
            blocksize2=state.state2.blocksize if nested else 256,
            offset=state.offset.float().reshape(()) if nested else None,
        )
        return cls(w, module.bias, state.dtype)


def is_bnb_4bit(module: nn.Module) -> bool:
    return type(module).__name__ == "Linear4bit" and hasattr(getattr(module, "weight", None), "quant_state")


def take_over_4bit(model: nn.Module) -> int:
    """Replace every bitsandbytes Linear4bit of `model` by an NF4Linear over the same tensors; returns how many."""
    count = 0
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if is_bnb_4bit(child):
                setattr(module, name, NF4Linear.from_bnb(child))
                count += 1
    return count


def quantize_projections(model: nn.Module, names: tuple[str, ...]) -> int:
    """Replace the nn.Linear children named `names` by NF4Linear (torch quantizer): a 4-bit base without
    bitsandbytes, for tests on the CPU."""
    count = 0
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if name in names and type(child) is nn.Linear:
                setattr(module, name, NF4Linear.from_linear(child))
                count += 1
    return count
