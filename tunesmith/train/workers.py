"""A CPU training step as independent parts of its batch, each computed by its own thread at once.

torch splits every matrix product of one forward and backward between its threads, which then wait for each other
at every operation. On 2 cores beside one busy single-threaded process, the thread that shares a core runs at half
speed and its partner waits, thousands of times a step: the goDrive step went from 2.68 s to 7.57 s. Split the
batch instead, one part per worker thread, each worker computing its part alone with one thread: the workers meet
once a step, so a busy core slows one part, not every operation. Measured on the 2-core VM, goDrive's batch of 4
(`bench/threads.py`; bench/RESULTS.md, "Workers"): quiet 2.59 s a step against 2.68 with torch's 2 threads, beside
the busy process 3.81 s against 4.44 with 1 thread and 7.57 with 2.

Each part's gradient is computed with torch.autograd.grad and the parts are summed in a fixed order, so a step's
result does not depend on which worker finishes first (a resumed run repeats an uninterrupted one).
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
    """Workers for a CPU step where they apply: on CPU, one process, `train.threads: auto` (a number fixes
    torch's threads, one worker), at least 2 cores and 2 examples a batch."""
    if device != "cpu" or world_size != 1 or fsdp or threads != "auto" or batch_size < 2 or torch_threads < 2:
        return None
    return StepWorkers(WORKERS, max(1, torch_threads // WORKERS))
