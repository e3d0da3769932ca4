"""A CPU training step as independent parts of its batch, each computed by its own thread at once: how a step
runs while other processes hold cores.

torch splits every matrix product of one forward and backward between its threads, which then wait for each other
at every operation. On 2 cores beside one busy single-threaded process, the thread that shares a core runs at half
speed and its partner waits, thousands of times a step: goDrive's step went from 2.68 s to 7.57 s; the thread
governor (threads.py) then dropped to one thread, 4.44 s. Split the batch instead, one part per worker thread, each
worker computing its part alone: the workers meet once a step, so a busy core slows one part, not every
operation: 3.81 s (0.70x quiet). Quiet, a step in parts measured 2.55-2.59 s against 2.68 s for goDrive's step
alone (bench/step_parts.py), but inside `tunesmith train` on the address example it was 2% slower than one piece
(each part computes the shared prefix of train.share_prefix again): so the loop uses parts only while the governor
sees other processes take cores (loop.py `_adjust_threads`). bench/RESULTS.md, "A CPU step in two parts at once".

Each part's gradient is computed with torch.autograd.grad and the parts are summed in a fixed order, so a step's
result does not depend on which worker finishes first.
"""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

WORKERS = 2
"""Parts a batch is split into. Two is what was measured (2 cores); on more cores each worker gets its share of
torch's threads."""


class StepWorkers:
    def __init__(self, count: int, threads_each: int):
        self.count, self.threads_each = count, threads_each
        self._pool = ThreadPoolExecutor(count, thread_name_prefix="tunesmith-step")

    def parts(self, indices: list[int]) -> list[list[int]]:
        """The batch's examples dealt out in turn: length-grouped batches give parts of about the same length."""
        return [part for k in range(self.count) if (part := indices[k::self.count])]

    def gradients(self, params: list[Any], parts: list[Any], loss_of: Callable[[Any], Any]) -> float:
        """Adds the gradient of the sum of `loss_of(part)` over `parts` to each of `params`' .grad; returns the
        summed loss. `loss_of` runs in a worker thread (grad mode, autocast and torch's thread count are
        per thread)."""
        import torch

        def work(part: Any) -> tuple[float, tuple[Any, ...]]:
            torch.set_num_threads(self.threads_each)  # OpenMP's count is per calling thread
            loss = loss_of(part)
            return loss.item(), torch.autograd.grad(loss, params, allow_unused=True)

        mine = torch.get_num_threads()
        try:
            done = list(self._pool.map(work, parts))  # in the parts' order, whichever finished first
        finally:
            # torch's count is also process-wide (at::get_num_threads, MKL's): a worker's 1 would leave this
            # thread's eval passes and answers on one thread.
            torch.set_num_threads(mine)
        with torch.no_grad():
            for k, param in enumerate(params):
                total = None
                for _, grads in done:
                    if grads[k] is not None:
                        total = grads[k] if total is None else total + grads[k]
                if total is not None:
                    param.grad = total if param.grad is None else param.grad + total
        return sum(loss for loss, _ in done)

    def set_threads(self, threads: int) -> None:
        """Each worker's torch threads from the next step on (the thread governor's setter)."""
        self.threads_each = threads

    def close(self) -> None:
        self._pool.shutdown(wait=True)


def step_workers(device: str, batch_size: int, threads: str | int, world_size: int, fsdp: bool,
                 torch_threads: int) -> StepWorkers | None:
    """Workers for a busy machine's CPU steps where they apply: on CPU, one process, `train.threads: auto` (a
    number fixes torch's threads: one piece), at least 2 cores and 2 examples a batch."""
    if device != "cpu" or world_size != 1 or fsdp or threads != "auto" or batch_size < 2 or torch_threads < 2:
        return None
    return StepWorkers(WORKERS, max(1, torch_threads // WORKERS))
