"""The fast path's optimizer and train step: one screen, as nanoGPT's loop, then the same step
replayed as CUDA graphs."""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence

import torch

from tunesmith.train.fast.model import FastCausalLM
from tunesmith.train.fast.packing import PackedBatch

AllReduce = Callable[[torch.Tensor], None]
BLOCK_MASK_TENSORS = ("kv_num_blocks", "kv_indices", "full_kv_num_blocks", "full_kv_indices",
                      "q_num_blocks", "q_indices", "full_q_num_blocks", "full_q_indices")


def make_optimizer(model: FastCausalLM, lr: float, weight_decay: float = 0.0,
                   betas: tuple[float, float] = (0.9, 0.999)) -> torch.optim.AdamW:
    """AdamW over the fp32 master weights. On CUDA: fused (one kernel) and capturable, with the learning
    rate a device tensor, so a CUDA graph replays it and LR schedulers still change it."""
    if model.master.device.type != "cuda":
        return torch.optim.AdamW(model.master_parameters(), lr=lr, betas=betas, weight_decay=weight_decay)
    return torch.optim.AdamW(model.master_parameters(), lr=torch.tensor(lr, device=model.master.device),
                             betas=betas, weight_decay=weight_decay, fused=True, capturable=True)


def make_train_step(model: FastCausalLM, optimizer: torch.optim.Optimizer, max_grad_norm: float | None = None,
                    cuda_graphs: bool | None = None, all_reduce: AllReduce | None = None) -> EagerStep | CudaGraphStep:
    """Return step(batches) -> mean loss (a device tensor): one optimizer step over one packed batch or
    several (gradient accumulation, every target token weighted the same). `step.grad_norm` is then the
    step's gradient norm before clipping (a device tensor). Nothing in a step reads a number back to the
    host, so the CPU queues the next step while the GPU runs this one: read the loss only when it is shown.

    On CUDA with a capturable optimizer (make_optimizer's), the step is captured as CUDA graphs after
    a few eager steps; `cuda_graphs=False` keeps it eager. The graphs hold the optimizer's state tensors:
    load a checkpoint (`optimizer.load_state_dict`, `model.load_adapter_state_dict`) before the first
    step. Learning-rate schedulers work (they fill the lr tensor in place).

    Data-parallel (train/distributed.py): `all_reduce` sums the flat master gradient over ranks in place,
    before clipping; `step(batches, normalizer=n)` divides the summed loss by the global group's trained
    tokens instead of these batches'. On CUDA the all-reduce runs eagerly between the graphs' replays.
    """
    capturable = bool(optimizer.defaults.get("capturable"))
    if cuda_graphs is None:
        cuda_graphs = model.master.device.type == "cuda" and capturable
    if cuda_graphs:
        return CudaGraphStep(model, optimizer, max_grad_norm, all_reduce=all_reduce)
    return EagerStep(model, optimizer, max_grad_norm, all_reduce=all_reduce)


class EagerStep:
    """The step, launched op by op (CPU, or CUDA without a capturable optimizer). After each call
    `grad_norm` is the step's gradient norm before clipping, a device tensor (None without clipping)."""

    def __init__(self, model: FastCausalLM, optimizer: torch.optim.Optimizer, max_grad_norm: float | None,
                 all_reduce: AllReduce | None = None):
        self.model, self.optimizer, self.max_grad_norm, self.all_reduce = model, optimizer, max_grad_norm, all_reduce
        self.grad_norm: torch.Tensor | None = None

    def __call__(self, batches: PackedBatch | Sequence[PackedBatch], normalizer: int | None = None) -> torch.Tensor:
        loss, self.grad_norm = eager_step(self.model, self.optimizer, batches, self.max_grad_norm, normalizer,
                                          self.all_reduce)
        return loss


def eager_step(model: FastCausalLM, optimizer: torch.optim.Optimizer,
               batches: PackedBatch | Sequence[PackedBatch], max_grad_norm: float | None,
               normalizer: int | None = None,
               all_reduce: AllReduce | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """One optimizer step; returns (mean loss, gradient norm before clipping or None), both on the device:
    nothing here waits for the GPU."""
    batches = [batches] if isinstance(batches, PackedBatch) else list(batches)
    device = model.master.device
    targets = normalizer or max(sum(b.num_targets for b in batches), 1)
    total = torch.zeros((), device=device)
    for i, batch in enumerate(batches):
        loss = model(batch.to(device), normalizer=targets)
        loss.backward()
        model.grads_to_master(accumulate=i > 0)
        total += loss.detach()
    if all_reduce is not None:
        all_reduce(model.master.grad)
    grad_norm = None
    if max_grad_norm is not None:  # on the device: the norm is computed, compared and applied without a host read
        grad_norm = torch.nn.utils.clip_grad_norm_(model.master_parameters(), max_grad_norm, foreach=True)
    optimizer.step()
    model.master_to_weights()
    return total, grad_norm


class CudaGraphStep:
    """The same step, replayed as two CUDA graphs: forward + backward of one buffer, then the update.

    Buys: the CPU launches ~3,000 kernels per step no more (two replays instead), which is what bounds
    a compiled step at 4,096 tokens; the GPU runs back to back. Measured (H200): 4,096-token buffers
    51.4k -> 99.7k tokens/s (79 -> 41 ms/step); 8,192: 96.7k -> 106k. Needs static shapes (every buffer the
    same seq_len) and no host syncs, which the packed model has. Inputs are copied into fixed buffers;
    the document mask is rebuilt eagerly and copied into the captured mask's tensors. Keep no loss with
    its autograd graph alive across steps (detach it): that pins autograd nodes to the default stream
    and capture fails (the step then warns and stays eager, which is correct but slower).
    """

    def __init__(self, model: FastCausalLM, optimizer: torch.optim.Optimizer, max_grad_norm: float | None,
                 warmup: int = 3, all_reduce: AllReduce | None = None):
        self.model, self.optimizer, self.max_grad_norm, self.warmup = model, optimizer, max_grad_norm, warmup
        self.all_reduce = all_reduce
        self.device = model.master.device
        self.stream = torch.cuda.Stream(self.device)
        self.seq_len: int | None = None
        self.graphs: tuple[torch.cuda.CUDAGraph, torch.cuda.CUDAGraph] | None = None
        self.failed = False
        self.grad_norm: torch.Tensor | None = None
        """The last step's gradient norm before clipping, on the device; the update graph overwrites it."""

    def __call__(self, batches: PackedBatch | Sequence[PackedBatch], normalizer: int | None = None) -> torch.Tensor:
        batches = [batches] if isinstance(batches, PackedBatch) else list(batches)
        if self.graphs is None:
            if self.failed or self.warmup > 0 or any(b.input_ids.shape[0] != batches[0].input_ids.shape[0]
                                                     for b in batches):
                self.warmup -= 1
                return self._eager(batches, normalizer)
            self._capture(batches[0])
            if self.graphs is None:
                return self._eager(batches, normalizer)
        if any(b.input_ids.shape[0] != self.seq_len for b in batches):
            return self._eager(batches, normalizer)  # another shape: correct, just not graphed
        self.normalizer.fill_(normalizer or max(sum(b.num_targets for b in batches), 1))
        total = torch.zeros((), device=self.device)
        for batch in batches:
            self._load(batch)
            self.graphs[0].replay()
            total = total + self.loss
        if self.all_reduce is not None:
            self.all_reduce(self.model.master.grad)
        self.graphs[1].replay()
        return total

    @property
    def graphed(self) -> bool:
        return self.graphs is not None

    def _eager(self, batches: list[PackedBatch], normalizer: int | None = None) -> torch.Tensor:
        # Eager steps run on the side stream the graphs are captured on (lazy cuBLAS/optimizer init).
        self.stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(self.stream):
            loss, self.grad_norm = eager_step(self.model, self.optimizer, batches, self.max_grad_norm, normalizer,
                                              self.all_reduce)
            self.model.master.grad.zero_()  # the graphs accumulate into it
        torch.cuda.current_stream(self.device).wait_stream(self.stream)
        return loss

    def _load(self, batch: PackedBatch) -> None:
        for name in ("input_ids", "position_ids", "targets", "doc_ids"):
            getattr(self.static, name).copy_(getattr(batch, name), non_blocking=True)
        mask = self.model.document_block_mask(self.static.doc_ids)
        for name in BLOCK_MASK_TENSORS:
            if getattr(mask, name, None) is not None:
                getattr(self.mask, name).copy_(getattr(mask, name))

    def _capture(self, batch: PackedBatch) -> None:
        model, device = self.model, self.device
        self.seq_len = batch.input_ids.shape[0]
        self.static = batch.to(device)
        self.static = type(batch)(**{k: v.clone() if torch.is_tensor(v) else v for k, v in vars(self.static).items()})
        self.mask = model.document_block_mask(self.static.doc_ids)
        self.normalizer = torch.ones((), device=device)
        torch.cuda.synchronize(device)
        model.master.grad.zero_()
        try:
            micro, update = torch.cuda.CUDAGraph(), torch.cuda.CUDAGraph()
            with torch.cuda.graph(micro, stream=self.stream):
                s = self.static
                loss = model.summed_loss(s.input_ids, s.position_ids, s.targets, self.mask) / self.normalizer
                loss.backward()
                model.grads_to_master(accumulate=True)
                self.loss = loss.detach()  # holding the autograd graph would pin its AccumulateGrad nodes
            # The all-reduce stays outside the graphs, between the micro-batches' replays and the update's:
            # a rank whose capture failed then still runs exactly one all-reduce per step, as the others do
            # (a collective captured on one rank only would hang them all); eager, it costs ~0.2 ms a step.
            with torch.cuda.graph(update, pool=micro.pool(), stream=self.stream):
                if self.max_grad_norm is not None:
                    grad_norm = torch.nn.utils.clip_grad_norm_(model.master_parameters(), self.max_grad_norm,
                                                               foreach=True)
                self.optimizer.step()
                model.master_to_weights()
                model.master.grad.zero_()
            self.graphs = (micro, update)
            if self.max_grad_norm is not None:
                self.grad_norm = grad_norm
        except (RuntimeError, NotImplementedError, TypeError, ValueError) as exc:  # stay eager
            warnings.warn(f"CUDA graph capture failed, training eagerly: {exc}", stacklevel=2)
            self.failed = True
            torch.cuda.synchronize(device)
            model._flat_grad.zero_()
