"""`train.gradient_checkpointing: auto`: recompute activations in the backward pass only where they would not fit.

Checkpointing trades memory for time: every decoder layer's forward runs twice. Where memory is plentiful (a
135M model on a 24 GB machine) that is time spent for nothing, so `auto` turns it on only when the activations
of the largest batch would take more than half of the memory free once the model is loaded.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

SHARE = 0.5
"""Of the free memory, the part activations may take: the rest is for the optimizer, the allocator's slack and
the other programs of a shared machine."""


def activation_bytes(model_config: Any, batch_tokens: int, bytes_per_value: int) -> int:
    """What one forward keeps for the backward, for `batch_tokens` tokens: per decoder layer and token about
    18 hidden-wide tensors (norm inputs and outputs, q/k/v before and after rotary, attention output,
    projections, residuals) and 4 MLP-wide ones (gate, up, the activation, their product). An upper estimate:
    some of these are views or are freed early."""
    hidden = int(getattr(model_config, "hidden_size", 0) or 0)
    mlp = int(getattr(model_config, "intermediate_size", 0) or 4 * hidden)
    layers = int(getattr(model_config, "num_hidden_layers", 0) or 0)
    return batch_tokens * layers * (18 * hidden + 4 * mlp) * bytes_per_value


def free_bytes(device: str) -> int:
    """Memory free now: the GPU's (after the model was put there), or the machine's MemAvailable."""
    if device == "cuda":
        import torch

        return int(torch.cuda.mem_get_info()[0])
    try:
        with open("/proc/meminfo", encoding="utf-8") as handle:
            for line in handle:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    import os

    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def checkpointing_needed(model_config: Any, batch_tokens: int, bytes_per_value: int, free: int) -> tuple[bool, str]:
    """(on?, the reason in a few words) for `auto`, with `free` bytes of memory (`free_bytes`)."""
    need = activation_bytes(model_config, batch_tokens, bytes_per_value)
    return need > SHARE * free, (f"activations of the largest batch ({batch_tokens} tokens) need about "
                                 f"{_size(need)}, {_size(free)} of memory are free")


def _size(n: float) -> str:
    return f"{n / 2**30:.1f} GiB" if n >= 2**30 else f"{n / 2**20:.0f} MiB"


def use_checkpointing(train: Any, model_config: Any, examples: list[dict[str, Any]], bf16: bool, device: str,
                      say: Callable[[str], None]) -> bool:
    """`train.gradient_checkpointing` (TrainConfig), with `auto` decided for the largest batch and said once."""
    if train.gradient_checkpointing != "auto":
        return bool(train.gradient_checkpointing)
    longest = max(len(example["input_ids"]) for example in examples)
    on, why = checkpointing_needed(model_config, train.batch_size * longest, 2 if bf16 else 4, free_bytes(device))
    say(f"gradient checkpointing {'on' if on else 'off'}: {why} (train.gradient_checkpointing: auto)")
    return on

