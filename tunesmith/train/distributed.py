"""Data-parallel training over several processes, on PyTorch's own stack (torchrun, DDP, FSDP2).

    tunesmith train --gpus 2 -c config.yaml                          # re-launches itself under torchrun
    torchrun --nproc-per-node 2 -m tunesmith.cli train -c config.yaml  # or launched by the user
    accelerate launch --num_processes 2 -m tunesmith.cli train -c config.yaml

Every rank reads the whole data set and computes the same batch plan (a pure function of seed and epoch), then
trains on its own slice of each global batch; gradients are averaged by DDP (or reduce-scattered by FSDP2 with
`train.fsdp: true`). Global batch = train.batch_size × train.grad_accum × world size: a run on N processes
takes the optimizer steps of a single-process run with batch_size × N. Rank 0 alone writes files and prints.
On CPU (`train.device: cpu`) the ranks are processes talking over gloo: that is how the tests run it.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import torch
import torch.distributed as dist
from torch import nn

from tunesmith.children import die_with_parent

T = TypeVar("T")


@dataclass(frozen=True)
class World:
    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        """Rank 0: the one process that writes checkpoints, metrics, the adapter and run.json, and prints."""
        return self.rank == 0

    def shard(self, items: Sequence[T]) -> list[T]:
        """This rank's part of a global batch: every `size`-th item from `rank`, so that the ranks together take
        each item once, and (the plan being sorted by length inside a batch) get sequences of similar length."""
        return list(items[self.rank::self.size])

    def sum(self, value: float) -> float:
        """The sum of a number over all ranks (the logged loss: each rank holds its slice's share of the mean)."""
        if self.size == 1:
            return value
        tensor = torch.tensor([value], dtype=torch.float64,
                              device="cuda" if dist.get_backend() == "nccl" else "cpu")
        dist.all_reduce(tensor)
        return float(tensor.item())

    def first(self, value: T) -> T:
        """Rank 0's value on every rank: decisions taken from one rank's clock (the time budget) must agree."""
        if self.size == 1:
            return value
        found = [value]
        dist.broadcast_object_list(found, src=0)
        return found[0]

    def weight_digests(self, weights: dict[str, torch.Tensor]) -> list[str]:
        """Every rank's sha256 of its trainable weights, rank order. Data parallelism is correct only if these
        are all equal at the end; recorded in run.json, so a desynchronized run shows."""
        import hashlib

        digest = hashlib.sha256()
        for name in sorted(weights):
            digest.update(name.encode())
            digest.update(weights[name].detach().float().cpu().contiguous().numpy().tobytes())
        if self.size == 1:
            return [digest.hexdigest()]
        found: list[str | None] = [None] * self.size
        dist.all_gather_object(found, digest.hexdigest())
        return [str(value) for value in found]

    def barrier(self) -> None:
        if self.size > 1:
            dist.barrier()


ALONE = World()
"""One process, no process group: what training always was."""


def launched() -> bool:
    """True inside a process started by torchrun or accelerate launch (they set WORLD_SIZE and LOCAL_RANK)."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def is_main_process() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


def relaunch(processes: int, argv: list[str]) -> int:
    """Run this same `tunesmith` command line under torch.distributed.run with `processes` ranks on this host;
    return its exit code. `--standalone` picks a free rendezvous port, so two runs on one host do not collide."""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={processes}",
               "-m", "tunesmith.cli", *argv]
    return subprocess.call(command, preexec_fn=die_with_parent)


def init(device: str) -> World:
    """Join the process group torchrun set up (NCCL on CUDA, gloo on CPU); one process alone gets World().

    On CUDA each rank takes the GPU of its LOCAL_RANK as the current device, so that "cuda" everywhere in the
    loop means this rank's card."""
    if not launched():
        return ALONE
    die_with_parent()
    local_rank = int(os.environ["LOCAL_RANK"])
    if device == "cuda":
        torch.cuda.set_device(local_rank)
        dist.init_process_group("nccl", device_id=torch.device("cuda", local_rank))
    else:
        dist.init_process_group("gloo")
    return World(dist.get_rank(), dist.get_world_size(), local_rank)


def teardown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


class LossModule(nn.Module):
    """`loss_fn(model, batch)` as a module's forward: DDP synchronizes gradients, and FSDP2 gathers the root's
    weights, only for work that runs through the wrapper's forward (the loss calls the decoder directly)."""

    def __init__(self, model: nn.Module, loss_fn: Any):
        super().__init__()
        self.model, self.loss_fn = model, loss_fn

    def forward(self, batch: dict[str, torch.Tensor]) -> Any:
        return self.loss_fn(self.model, batch)


def wrap(model: nn.Module, loss_fn: Any, world: World, device: str, fsdp: bool, bf16: bool) -> nn.Module:
    """The module the HF engine runs its loss through: plain on one process, DDP, or FSDP2 (fully_shard each
    decoder layer, then the rest as the root: a layer's weights exist in full only while it computes).

    Under FSDP2 the parameters become DTensors, so the optimizer must be built from them after this call."""
    module = LossModule(model, loss_fn)
    if world.size == 1:
        return module
    if fsdp:
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        # FSDP2 gathers a group's weights in one dtype: the bf16 base and the fp32 LoRA weights compute in
        # bf16, and gradients are reduced in fp32 into the fp32 adapter.
        policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if bf16 else None
        kwargs = {"mp_policy": policy} if policy else {}
        for layer in decoder_layers(model):
            fully_shard(layer, **kwargs)
        return fully_shard(module, **kwargs)
    from torch.nn.parallel import DistributedDataParallel

    # DDP broadcasts rank 0's weights once, here, then averages the gradients of the weights that train (the
    # LoRA adapter) after each backward, in buckets overlapped with the backward itself.
    return DistributedDataParallel(module, device_ids=[world.local_rank] if device == "cuda" else None)


def decoder_layers(model: nn.Module) -> list[nn.Module]:
    causal = model.get_base_model() if hasattr(model, "get_base_model") else model
    return list(getattr(causal, causal.base_model_prefix).layers)


@contextlib.contextmanager
def gradient_sync(module: nn.Module, now: bool) -> Iterator[None]:
    """Communicate gradients only on the last micro-batch of an accumulation group (once per optimizer step)."""
    if hasattr(module, "no_sync") and not now:  # DDP
        with module.no_sync():
            yield
        return
    if hasattr(module, "set_requires_gradient_sync"):  # FSDP2
        module.set_requires_gradient_sync(now)
    yield


def full(tensor: torch.Tensor) -> torch.Tensor:
    """A whole tensor from an FSDP2 shard (every rank must call it: it is an all-gather), or the tensor itself."""
    return tensor.full_tensor() if hasattr(tensor, "full_tensor") else tensor


def all_reduce_sum(tensor: torch.Tensor) -> None:
    dist.all_reduce(tensor)
