"""LoRA for the fast path: a plain LoRA linear in the model's dtype, and adapters in peft's format.

peft's LoRA layer casts activations to the adapter's float32 weights on every call and back (several
extra kernels per projection, fp32 matmuls); this one keeps A and B in the base weight's dtype (bf16
on GPU) and lets the optimizer hold the float32 master copy (see `step.py`). The state dict it exports
uses peft's key names, so `PeftModel.from_pretrained` loads what the fast path trained.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
from torch import nn

from tunesmith.atomic import atomic_path
from tunesmith.config import PROJECTIONS, LoraConfig
from tunesmith.errors import ConfigError
from tunesmith.train.fast.nf4 import NF4Linear

PEFT_PREFIX = "base_model.model."
ADAPTER_WEIGHTS = "adapter_model.safetensors"


class LoraLinear(nn.Module):
    """y = base(x) + scaling * (dropout(x) A^T) B^T, with A (r, in) and B (out, r) trainable."""

    def __init__(self, base_layer: nn.Linear | NF4Linear, r: int, alpha: int, dropout: float, use_rslora: bool):
        super().__init__()
        self.base_layer = base_layer
        for p in base_layer.parameters():
            p.requires_grad_(False)
        if isinstance(base_layer, NF4Linear):  # a 4-bit base: the adapter is in the compute dtype
            dtype, device = base_layer.compute_dtype, base_layer.device
        else:
            dtype, device = base_layer.weight.dtype, base_layer.weight.device
        self.r = r
        self.lora_A = nn.Parameter(torch.empty(r, base_layer.in_features, dtype=dtype, device=device))
        self.lora_B = nn.Parameter(torch.zeros(base_layer.out_features, r, dtype=dtype, device=device))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))  # peft's default initialization
        self.scaling = alpha / math.sqrt(r) if use_rslora else alpha / r
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lora = nn.functional.linear(nn.functional.linear(self.dropout(x), self.lora_A), self.lora_B)
        return self.base_layer(x) + lora * self.scaling


def inject_lora(model: nn.Module, cfg: LoraConfig) -> dict[str, LoraLinear]:
    """Replace the targeted nn.Linear modules of `model` by LoraLinear, in place; freeze everything else. (As peft's
    `inject_adapter_in_model`, not its `get_peft_model`, which train/lora.py's `apply_lora` calls: no wrapper model.)

    Returns the LoRA modules by their qualified name in `model` (peft's names without its prefix).
    """
    if cfg.bias != "none":
        raise ConfigError(f"the GPU fast path trains no biases (lora.bias={cfg.bias!r})",
                          hint="set lora.bias: none, or train.device: cpu")
    targets = set(PROJECTIONS) if cfg.target_modules == "all-linear" else set(cfg.target_modules)
    for p in model.parameters():
        p.requires_grad_(False)
    found: dict[str, LoraLinear] = {}
    for name, module in list(model.named_modules()):
        for child_name, child in list(module.named_children()):
            full = f"{name}.{child_name}" if name else child_name
            if child_name in targets and isinstance(child, (nn.Linear, NF4Linear)) and child_name != "lm_head":
                lora = LoraLinear(child, cfg.r, cfg.alpha, cfg.dropout, cfg.use_rslora)
                setattr(module, child_name, lora)
                found[full] = lora
    missing = targets - {n.rsplit(".", 1)[-1] for n in found}
    if missing:
        raise ConfigError(f"lora.target_modules names modules this model lacks: {sorted(missing)}",
                          hint=f"this model's projections are among {PROJECTIONS}")
    return found


def save_adapter(
    state: dict[str, torch.Tensor], cfg: LoraConfig, path: str | Path, base_model: str | None = None
) -> Path:
    """Write `adapter_config.json` and `adapter_model.safetensors` that `PeftModel.from_pretrained` loads."""
    import peft
    from safetensors.torch import save_file

    targets = sorted({k.rsplit(".", 2)[0].rsplit(".", 1)[-1] for k in state})  # ...q_proj.lora_A.weight
    peft_cfg = peft.LoraConfig(
        r=cfg.r, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout, bias=cfg.bias, target_modules=targets,
        use_rslora=cfg.use_rslora, task_type="CAUSAL_LM", base_model_name_or_path=base_model,
    )
    with atomic_path(path, directory=True) as tmp:
        peft_cfg.save_pretrained(str(tmp))
        save_file(state, str(tmp / ADAPTER_WEIGHTS), metadata={"format": "pt"})
    return Path(path)
