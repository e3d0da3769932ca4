"""The two ways a training step is computed; the loop in loop.py drives either.

- `HFEngine`: transformers + peft, eager, on CPU or GPU. Length-grouped batches of `train.batch_size`
  sequences; the LM head runs only at trained positions (`completion_loss`).
- `FastEngine`: tunesmith's GPU path (train/fast): documents packed into fixed 4096/8192-token buffers with
  per-document attention, compiled layers, bf16 LoRA and CUDA graphs; about 6x Unsloth (bench/RESULTS.md).

Both expose the same few methods, so checkpoints, resume, logging and eval are written once.
"""

from __future__ import annotations

import math
import random
from pathlib import Path
from typing import Any

from tunesmith.config import Config
from tunesmith.train import batches


class HFEngine:
    def __init__(self, model: Any, data: Any, config: Config, device: str, pad_id: int, optimizer: Any):
        self.model, self.data, self.config, self.device, self.pad_id = model, data, config, device, pad_id
        self.optimizer = optimizer
        self.params = [p for p in model.parameters() if p.requires_grad]
        model.train()  # from_pretrained returns eval mode, where gradient checkpointing is off
        cfg = config.train
        self.lengths = [len(example["input_ids"]) for example in data.train]
        self.micro_per_epoch = len(batches.epoch_batches(self.lengths, cfg.batch_size, cfg.seed, 0))
        self.steps_per_epoch = math.ceil(self.micro_per_epoch / cfg.grad_accum)
        self._plan: dict[int, list[list[int]]] = {}

    def _micro_batch(self, micro: int) -> dict[str, Any]:
        cfg = self.config.train
        epoch, index = divmod(micro, self.micro_per_epoch)
        if epoch not in self._plan:  # the order is a function of (seed, epoch): resumable anywhere
            self._plan = {epoch: batches.epoch_batches(self.lengths, cfg.batch_size, cfg.seed, epoch)}
        return batches.collate([self.data.train[i] for i in self._plan[epoch][index]], self.pad_id)

    def step(self, step: int) -> tuple[float, float, int, int]:
        """One optimizer step; returns (loss, grad_norm, input tokens, trained tokens)."""
        import torch

        from tunesmith.train.loop import autocast, completion_loss

        accum = self.config.train.grad_accum
        group = [self._micro_batch(step * accum + k) for k in range(accum)]
        targets = sum(int((b["labels"][:, 1:] != -100).sum()) for b in group)
        loss_value, inputs = 0.0, 0
        for batch in group:
            batch = {key: value.to(self.device) for key, value in batch.items()}
            with autocast(self.device, self.config):
                loss_sum, _ = completion_loss(self.model, batch)
            loss = loss_sum / max(1, targets)  # every trained token of the whole group weighs the same
            loss.backward()
            loss_value += loss.item()
            inputs += int(batch["attention_mask"].sum())
        grad_norm = torch.nn.utils.clip_grad_norm_(self.params, 1.0).item()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return loss_value, grad_norm, inputs, targets

    def eval_loss(self) -> float:
        from tunesmith.train.loop import evaluate_loss

        return evaluate_loss(self.model, self.data.eval, self.config.train.batch_size, self.pad_id, self.device,
                             self.config)

    def trainable(self) -> dict[str, Any]:
        from tunesmith.train.checkpoint import trainable_of

        return trainable_of(self.model)

    def load_trainable(self, state: dict[str, Any]) -> None:
        from tunesmith.train.checkpoint import copy_into

        copy_into(self.model, state)

    def save_adapter(self, directory: Path, base: str) -> None:
        self.model.save_pretrained(directory)


class FastEngine:
    def __init__(self, model: Any, data: Any, config: Config, device: str, pad_id: int):
        from tunesmith.train import fast

        cfg = config.train
        self.config, self.device = config, device
        self.fast = fast.prepare_fast_model(model, config.lora, low_memory=cfg.low_memory)
        longest = max(len(example["input_ids"]) for example in data.train + data.eval)
        seq_len = fast.LOW_MEMORY_SEQ_LEN if cfg.low_memory else fast.DEFAULT_SEQ_LEN
        self.seq_len = max(seq_len, 256 * math.ceil(longest / 256))  # static shape: one buffer size for all
        examples = [(e["input_ids"], e["labels"]) for e in data.train]
        self.buffers = fast.pack(examples, self.seq_len, pad_id)
        self.eval_buffers = fast.pack([(e["input_ids"], e["labels"]) for e in data.eval], self.seq_len, pad_id)
        self.optimizer = fast.make_optimizer(self.fast, lr=cfg.learning_rate, weight_decay=cfg.weight_decay)
        self._step = None  # built on first use, after a resume has loaded its state (CUDA graphs hold it)
        self.steps_per_epoch = math.ceil(len(self.buffers) / cfg.grad_accum)
        self._plan: dict[int, list[int]] = {}

    def _buffer(self, micro: int) -> Any:
        epoch, index = divmod(micro, len(self.buffers))
        if epoch not in self._plan:
            order = list(range(len(self.buffers)))
            random.Random(self.config.train.seed * 1_000_003 + epoch).shuffle(order)
            self._plan = {epoch: order}
        return self.buffers[self._plan[epoch][index]]

    def step(self, step: int) -> tuple[float, float, int, int]:
        from tunesmith.train import fast

        if self._step is None:
            self._step = fast.make_train_step(self.fast, self.optimizer, max_grad_norm=1.0)
        accum = self.config.train.grad_accum
        group = [self._buffer(step * accum + k) for k in range(accum)]
        loss = self._step(group)
        # The grad norm would cost a host sync every step; the loss is read only because the log needs it.
        return float(loss), float("nan"), sum(b.num_tokens for b in group), sum(b.num_targets for b in group)

    def eval_loss(self) -> float:
        import torch

        total, count = 0.0, 0
        with torch.no_grad():
            for buffer in self.eval_buffers:
                loss = self.fast(buffer.to(self.device))
                total += float(loss) * buffer.num_targets
                count += buffer.num_targets
        return total / max(1, count)

    def trainable(self) -> dict[str, Any]:
        return self.fast.adapter_state_dict()

    def load_trainable(self, state: dict[str, Any]) -> None:
        self.fast.load_adapter_state_dict(state)

    def save_adapter(self, directory: Path, base: str) -> None:
        from tunesmith.train import fast

        fast.save_adapter(self.fast.adapter_state_dict(), self.config.lora, directory, base_model=base)


def fast_path_wanted(config: Config, device: str, model: Any) -> bool:
    """The fast path where it runs: CUDA (or forced with train.fast: true), LoRA, a supported architecture."""
    from tunesmith.train.fast import FastPathUnsupported, check_supported

    wanted = config.train.fast
    if wanted is False or config.train.method != "lora":
        return False
    if wanted == "auto" and device != "cuda":
        return False
    try:
        check_supported(model)
    except FastPathUnsupported:
        if wanted is True:
            raise
        return False
    return True
