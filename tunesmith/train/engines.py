"""The two ways a training step is computed; the loop in loop.py drives either.

- `HFEngine`: transformers + peft, eager, on CPU or GPU. Length-grouped batches of `train.batch_size`
  sequences; the LM head runs only at trained positions (`completion_loss`).
- `FastEngine`: tunesmith's GPU path (train/fast): documents packed into fixed 4096/8192-token buffers with
  per-document attention, compiled layers, bf16 LoRA (grouped projections), CUDA graphs; QLoRA on an NF4 base
  too. ~3.1x Unsloth's fastest configuration at Qwen3-0.6B's shape (ratio of medians, bench/RESULTS.md).

Both expose the same few methods, so checkpoints, resume, logging and eval are written once.
"""

from __future__ import annotations

import math
import random
from pathlib import Path
from typing import Any

from tunesmith.config import Config
from tunesmith.errors import ConfigError
from tunesmith.train import batches
from tunesmith.train.distributed import ALONE, World
from tunesmith.train.loss import EVAL_LOSS_EXAMPLES, autocast, evaluate_loss
from tunesmith.train.workers import StepWorkers


class HFEngine:
    def __init__(self, model: Any, data: Any, config: Config, device: str, pad_id: int, optimizer: Any,
                 forward: Any, world: World = ALONE):
        """`forward`: the module the loss runs through, `distributed.wrap(model, completion_loss, ...)`:
        the plain loss on one process, DDP or FSDP2 around it on several."""
        self.model, self.data, self.config, self.device, self.pad_id = model, data, config, device, pad_id
        self.optimizer, self.world = optimizer, world
        # Set by the loop while other processes hold cores: a CPU step's batch in parts at once (train/workers.py).
        self.workers: StepWorkers | None = None
        self.forward = forward
        self.params = [p for p in model.parameters() if p.requires_grad]
        # The shared prefix goes through a KV cache, which gradient checkpointing turns off (transformers).
        checkpointing = any(getattr(module, "gradient_checkpointing", False) for module in model.modules())
        # FSDP2 frees each layer's gathered weights after its forward and gathers them again for its backward,
        # once per forward; the prefix and the rest are two forwards of the same layers in one step, and the
        # prefix's backward then finds the weights freed (tests/test_distributed.py). Off under FSDP.
        self.share_prefix = (config.train.share_prefix and not checkpointing and not config.train.fsdp
                             and config.train.loss_on == "completion")
        model.train()  # from_pretrained returns eval mode, where gradient checkpointing is off
        cfg = config.train
        self.lengths = [len(example["input_ids"]) for example in data.train]
        # The plan is made of global micro-batches of batch_size × world size sequences; each rank trains on
        # its shard of each (World.shard). On one process this is the plan it always was.
        self.global_batch = cfg.batch_size * world.size
        self.micro_per_epoch = len(batches.epoch_batches(self.lengths, self.global_batch, cfg.seed, 0))
        self.steps_per_epoch = math.ceil(self.micro_per_epoch / cfg.grad_accum)
        self._plan: dict[int, list[list[int]]] = {}

    def _micro_batch(self, micro: int) -> list[int]:
        """Indices of global micro-batch `micro`."""
        cfg = self.config.train
        epoch, index = divmod(micro, self.micro_per_epoch)
        if epoch not in self._plan:  # the order is a function of (seed, epoch): resumable anywhere
            self._plan = {epoch: batches.epoch_batches(self.lengths, self.global_batch, cfg.seed, epoch)}
        return self._plan[epoch][index]

    def _collate(self, indices: list[int]) -> dict[str, Any]:
        examples = [self.data.train[i] for i in self.world.shard(indices)]
        if not examples:
            # An epoch's last global batch can be smaller than the world: a rank left without sequences still
            # runs forward and backward (DDP and FSDP wait for every rank), on one whose loss is masked out.
            first = self.data.train[indices[0]]
            examples = [{**first, "labels": [-100] * len(first["labels"])}]
        if self.config.train.packing:
            return batches.collate_packed(examples)
        if self.share_prefix:
            return batches.collate_shared_prefix(examples, self.pad_id, batches.pad_multiple(self.device))
        return batches.collate(examples, self.pad_id, batches.pad_multiple(self.device))

    def step(self, step: int) -> tuple[float, float, int, int]:
        """One optimizer step; returns (loss, grad_norm, input tokens, trained tokens), over all ranks."""
        import torch

        from tunesmith.train import distributed

        accum, world = self.config.train.grad_accum, self.world
        group = [self._micro_batch(step * accum + k) for k in range(accum)]
        # Counted from the plan, which every rank knows whole: the global numbers without communication.
        targets = sum(sum(label != -100 for label in self.data.train[i]["labels"][1:])
                      for indices in group for i in indices)
        inputs = sum(self.lengths[i] for indices in group for i in indices)
        loss_value = 0.0
        for k, indices in enumerate(group):
            if self.workers is not None and len(indices) > 1:  # one process: no gradient sync to place
                loss_value += self._in_parts(indices, targets)
                continue
            batch = {key: value.to(self.device) for key, value in self._collate(indices).items()}
            with distributed.gradient_sync(self.forward, now=k == accum - 1):
                with autocast(self.device, self.config):
                    loss_sum, _ = self.forward(batch)
                # Every trained token of the whole global group weighs the same. DDP and FSDP average the
                # ranks' gradients: × world size turns that average into the sum of the shards.
                loss = loss_sum / max(1, targets)
                (loss * world.size).backward()
            loss_value += loss.item()
        grad_norm = torch.nn.utils.clip_grad_norm_(self.params, 1.0)
        grad_norm = distributed.full(grad_norm).item()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return world.sum(loss_value), grad_norm, inputs, targets

    def _in_parts(self, indices: list[int], targets: int) -> float:
        """The micro-batch's gradient added to .grad, its parts computed at once by the workers; its loss."""
        def loss_of(part: list[int]) -> Any:
            batch = {key: value.to(self.device) for key, value in self._collate(part).items()}
            with autocast(self.device, self.config):
                loss_sum, _ = self.forward(batch)
            return loss_sum / max(1, targets)

        return self.workers.gradients(self.params, self.workers.parts(indices), loss_of)

    def eval_loss(self, part: int = 1) -> float:
        """Over the first EVAL_LOSS_EXAMPLES of the eval split; `part` > 1: over that fraction of them."""
        examples = self.data.eval[:EVAL_LOSS_EXAMPLES]
        return evaluate_loss(self.forward, examples[:max(1, len(examples) // part)], self.config.train.batch_size,
                             self.pad_id, self.device, self.config)

    def generation_model(self) -> Any:
        """The model with its adapter, as `generate()` takes it (the accuracy probe)."""
        return self.model

    def trainable(self) -> dict[str, Any]:
        from tunesmith.train import distributed
        from tunesmith.train.checkpoint import trainable_of

        # Under FSDP2 each weight is gathered whole from its shards: every rank must call this.
        return {name: distributed.full(p) for name, p in trainable_of(self.model).items()}

    def load_trainable(self, state: dict[str, Any]) -> None:
        from tunesmith.train.checkpoint import copy_into

        copy_into(self.model, state)

    def optimizer_state(self) -> dict[str, Any]:
        """The optimizer's state for a checkpoint; under FSDP2 gathered whole (on rank 0), every rank calling."""
        if not self.config.train.fsdp or self.world.size == 1:
            return self.optimizer.state_dict()
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

        return get_optimizer_state_dict(self.forward, self.optimizer,
                                        options=StateDictOptions(full_state_dict=True, cpu_offload=True))

    def load_optimizer_state(self, state: dict[str, Any]) -> None:
        if not self.config.train.fsdp or self.world.size == 1:
            self.optimizer.load_state_dict(state)
            return
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

        set_optimizer_state_dict(self.forward, self.optimizer, state, options=StateDictOptions(full_state_dict=True))

    def save_adapter(self, directory: Path, base: str, trainable: dict[str, Any]) -> None:
        """`trainable`: this engine's `trainable()`, gathered by every rank; only rank 0 saves. With
        train.method: full `model` is the whole fine-tuned model, saved as a checkpoint."""
        if self.config.train.method == "full":
            self.model.config.use_cache = True  # off for training; the saved checkpoint is used for generation
        if self.config.train.fsdp and self.world.size > 1:
            self.model.save_pretrained(directory, state_dict=trainable)  # the model's own are shards
        else:
            self.model.save_pretrained(directory)


class FastEngine:
    def __init__(self, model: Any, data: Any, config: Config, device: str, pad_id: int, world: World = ALONE):
        from tunesmith.train import fast

        cfg = config.train
        self.config, self.device, self.world = config, device, world
        self.fast = fast.prepare_fast_model(model, config.lora, low_memory=cfg.low_memory)
        longest = max(len(example["input_ids"]) for example in data.train + data.eval)
        seq_len = fast.buffer_tokens(self.fast)  # QLoRA: the 4-bit base's own size (checkpointed)
        self.seq_len = max(seq_len, 256 * math.ceil(longest / 256))  # static shape: one buffer size for all
        examples = [(e["input_ids"], e["labels"]) for e in data.train]
        self.buffers = fast.pack(examples, self.seq_len, pad_id)
        if device == "cuda":
            self.buffers = [buffer.pin_memory() for buffer in self.buffers]
        self.eval_buffers = fast.pack([(e["input_ids"], e["labels"]) for e in data.eval[:EVAL_LOSS_EXAMPLES]],
                                      self.seq_len, pad_id)
        self.optimizer = fast.make_optimizer(self.fast, lr=cfg.learning_rate, weight_decay=cfg.weight_decay)
        self._step = None  # built on first use, after a resume has loaded its state (CUDA graphs hold it)
        # Every rank packs the same buffers; a global micro-batch is world-size buffers, one per rank.
        self.micro_per_epoch = math.ceil(len(self.buffers) / world.size)
        self.steps_per_epoch = math.ceil(self.micro_per_epoch / cfg.grad_accum)
        self._plan: dict[int, list[int]] = {}

    def _global_buffers(self, micro: int) -> list[int]:
        """Indices of the buffers of global micro-batch `micro`: world-size consecutive ones of the epoch's
        seeded shuffle (fewer at an epoch's end)."""
        epoch, index = divmod(micro, self.micro_per_epoch)
        if epoch not in self._plan:
            order = list(range(len(self.buffers)))
            random.Random(self.config.train.seed * 1_000_003 + epoch).shuffle(order)
            self._plan = {epoch: order}
        size = self.world.size
        return self._plan[epoch][index * size:(index + 1) * size]

    def step(self, step: int) -> tuple[Any, Any, int, int]:
        """One optimizer step; returns (loss, grad_norm, input tokens, trained tokens) over all ranks, the loss
        and the norm as device tensors: reading them waits for the GPU, so the loop reads them only when it
        logs (measured on an H200: a read every step cost 14% of the step)."""
        from tunesmith.train import distributed, fast

        world = self.world
        if self._step is None:
            # Across ranks, one all-reduce (sum) of the flat fp32 LoRA gradient per optimizer step: what DDP does
            # with a single bucket. DDP itself cannot wrap this model: its weights live in one flat buffer
            # outside the module's parameters.
            reduce = distributed.all_reduce_sum if world.size > 1 else None
            self._step = fast.make_train_step(self.fast, self.optimizer, max_grad_norm=1.0, all_reduce=reduce)
        accum = self.config.train.grad_accum
        group = [self._global_buffers(step * accum + k) for k in range(accum)]
        everything = [self.buffers[i] for indices in group for i in indices]
        mine = [self._mine(indices) for indices in group]
        # Normalized by the trained tokens of the whole global group, so the summed gradients are its mean.
        loss = self._step(mine, normalizer=max(1, sum(b.num_targets for b in everything)))
        if world.size > 1:  # each rank's loss is its share of the global mean; NCCL sums it without a host read
            distributed.all_reduce_sum(loss)
        return (loss, self._step.grad_norm, sum(b.num_tokens for b in everything),
                sum(b.num_targets for b in everything))

    def _mine(self, indices: list[int]) -> Any:
        if self.world.rank < len(indices):
            return self.buffers[indices[self.world.rank]]
        # An epoch's last global micro-batch can have fewer buffers than ranks: a rank left without one runs a
        # buffer with no targets, so it still takes part in the all-reduce and adds nothing to the gradient.
        return without_targets(self.buffers[indices[0]])

    def eval_loss(self, part: int = 1) -> float:
        """Over the packed eval buffers; `part` > 1: over that fraction of them."""
        import torch

        total, count = 0.0, 0
        with torch.no_grad():
            for buffer in self.eval_buffers[:max(1, len(self.eval_buffers) // part)]:
                loss = self.fast(buffer.to(self.device))
                total += float(loss) * buffer.num_targets
                count += buffer.num_targets
        return total / max(1, count)

    def generation_model(self) -> Any:
        """The Hugging Face model, whose linear layers the fast path's LoRA modules wrap in place."""
        return self.fast.model

    def trainable(self) -> dict[str, Any]:
        return self.fast.adapter_state_dict()

    def load_trainable(self, state: dict[str, Any]) -> None:
        self.fast.load_adapter_state_dict(state)

    def optimizer_state(self) -> dict[str, Any]:
        return self.optimizer.state_dict()

    def load_optimizer_state(self, state: dict[str, Any]) -> None:
        self.optimizer.load_state_dict(state)

    def save_adapter(self, directory: Path, base: str, trainable: dict[str, Any]) -> None:
        from tunesmith.train import fast

        fast.save_adapter(trainable, self.config.lora, directory, base_model=base)


def without_targets(buffer: Any) -> Any:
    import dataclasses

    import torch

    return dataclasses.replace(buffer, targets=torch.full_like(buffer.targets, -100), num_targets=0)


def fast_path_wanted(config: Config, device: str, model: Any) -> bool:
    """The fast path where it runs: CUDA (or forced with train.fast: true), LoRA or QLoRA (its NF4 base read by
    train/fast/nf4.py), a supported architecture.
    Not with train.fsdp: FSDP2 shards the Hugging Face modules, the fast path has its own flat LoRA buffer."""
    from tunesmith.train.fast import FastPathUnsupported, check_supported

    wanted = config.train.fast
    if wanted is True and (config.lora.layers_to_transform or config.train.loraplus_lr_ratio):
        raise ConfigError("train.fast: true does not take lora.layers_to_transform or train.loraplus_lr_ratio",
                          "the GPU fast path adapts every layer with one learning rate; set train.fast: auto")
    if config.lora.layers_to_transform or config.train.loraplus_lr_ratio:
        return False
    if wanted is True and config.train.fsdp:
        raise ConfigError("train.fast: true and train.fsdp: true don't go together",
                          "FSDP2 shards the transformers + peft model; set train.fast: auto or false")
    if wanted is False or config.train.method not in ("lora", "qlora") or config.train.fsdp:
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
