"""Put LoRA adapters on a model (peft), with the article's defaults and errors that name what the model has."""

from __future__ import annotations

from typing import Any

from tunesmith.config import LoraConfig
from tunesmith.errors import ModelError


def linear_module_names(model: Any) -> list[str]:
    """The distinct leaf names of the model's Linear layers (what `target_modules` can name)."""
    import torch

    names = {name.rsplit(".", 1)[-1] for name, module in model.named_modules() if isinstance(module, torch.nn.Linear)}
    names.discard("lm_head")
    return sorted(names)


def check_lora(model: Any, lora: LoraConfig) -> None:
    """The targeted modules exist, and lora.r is no larger than the narrowest of them: a rank above a layer's
    width adds nothing and can exhaust memory (`lora.r: 200000` failed as a torch allocation error)."""
    import torch

    if lora.target_modules != "all-linear":
        available = linear_module_names(model)
        missing = [name for name in lora.target_modules if name not in available]
        if missing:
            raise ModelError(
                f"lora.target_modules: the model has no module named {', '.join(missing)}",
                f"its linear modules are: {', '.join(available)} (or use all-linear)",
            )
    widths = [min(module.in_features, module.out_features) for name, module in model.named_modules()
              if isinstance(module, torch.nn.Linear) and name.rsplit(".", 1)[-1] != "lm_head"
              and (lora.target_modules == "all-linear" or name.rsplit(".", 1)[-1] in lora.target_modules)]
    if widths and lora.r > min(widths):
        raise ModelError(f"lora.r: {lora.r} is larger than the narrowest targeted layer ({min(widths)} wide)",
                         f"use lora.r of at most {min(widths)}; 8 to 64 is usual")


def apply_lora(model: Any, lora: LoraConfig, seed: int) -> Any:
    """Wrap `model` in a peft LoRA model; only the adapter weights train."""
    import torch
    from peft import LoraConfig as PeftLoraConfig
    from peft import get_peft_model

    check_lora(model, lora)
    # The adapter's A matrices are initialized from the torch RNG: seeding here is what the article's
    # random_state=3407 does, so two runs with one seed start from identical adapters.
    torch.manual_seed(seed)
    peft_config = PeftLoraConfig(
        r=lora.r,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        bias=lora.bias,
        target_modules=lora.target_modules,
        use_rslora=lora.use_rslora,
        layers_to_transform=layer_indices(model, lora.layers_to_transform),
        task_type="CAUSAL_LM",
    )
    return get_peft_model(model, peft_config)


def layer_indices(model: Any, wanted: list[int] | None) -> list[int] | None:
    """`lora.layers_to_transform` with negative numbers counted from the top, checked against the model."""
    if wanted is None:
        return None
    count = getattr(model.config, "num_hidden_layers", None)
    if count is None:
        raise ModelError("lora.layers_to_transform: the model's config does not say how many layers it has",
                         "leave lora.layers_to_transform unset")
    resolved = sorted({index + count if index < 0 else index for index in wanted})
    if not resolved or resolved[0] < 0 or resolved[-1] >= count:
        raise ModelError(f"lora.layers_to_transform: {wanted} is outside the model's {count} layers (0..{count - 1})",
                         f"use numbers from 0 to {count - 1}, or -1 for the last layer")
    return resolved
