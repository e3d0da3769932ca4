"""The fast path's optimizer and train step: one screen, as nanoGPT's loop."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from tunesmith.train.fast.model import FastCausalLM
from tunesmith.train.fast.packing import PackedBatch


def make_optimizer(model: FastCausalLM, lr: float, weight_decay: float = 0.0,
                   betas: tuple[float, float] = (0.9, 0.999)) -> torch.optim.AdamW:
    """AdamW over the fp32 master weights; fused (one kernel) on CUDA."""
    fused = model.master.device.type == "cuda"
    return torch.optim.AdamW(model.master_parameters(), lr=lr, betas=betas, weight_decay=weight_decay, fused=fused)


def make_train_step(model: FastCausalLM, optimizer: torch.optim.Optimizer,
                    max_grad_norm: float | None = None) -> Callable[[PackedBatch | Sequence[PackedBatch]], torch.Tensor]:
    """Return step(batches) -> mean loss: one optimizer step over one packed batch or several
    (gradient accumulation, every target token weighted the same). The loss stays on the device."""
    device = model.master.device

    def step(batches: PackedBatch | Sequence[PackedBatch]) -> torch.Tensor:
        batches = [batches] if isinstance(batches, PackedBatch) else list(batches)
        targets = sum(b.num_targets for b in batches)
        total = torch.zeros((), device=device)
        for i, batch in enumerate(batches):
            loss = model(batch.to(device), normalizer=targets)
            loss.backward()
            model.grads_to_master(accumulate=i > 0)
            total += loss.detach()
        if max_grad_norm is not None:
            torch.nn.utils.clip_grad_norm_(model.master_parameters(), max_grad_norm, foreach=True)
        optimizer.step()
        model.master_to_weights()
        return total

    return step
