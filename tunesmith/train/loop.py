"""`tunesmith train`: LoRA supervised fine-tuning, read top to bottom as setup → loop → save.

The loop is plain PyTorch over transformers + peft (no Trainer), because it has to resume bit-exactly from
a SIGKILL and to skip work the Trainer does not let us skip:
- length-grouped batches (batches.py), so padding costs almost nothing;
- logits and cross-entropy only at trained positions (`completion_loss`): with completion-only loss most
  positions are prompt, and the LM head is a large share of a small model's compute;
- the loss is the mean over every trained token of the accumulated batches, as if they were one batch.

On several processes (`tunesmith train --gpus N`, torchrun, accelerate launch: train/distributed.py) the same
loop runs on every rank over its shard of each global batch; rank 0 alone writes files and prints.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path
from typing import Any

from rich.console import Console

from tunesmith.atomic import atomic_path, remove_temporaries
from tunesmith.config import Config
from tunesmith.errors import ConfigError, DataError, ModelError
from tunesmith.run import Run, record_config
from tunesmith.train import checkpoint, distributed, memory
from tunesmith.train.accuracy import AccuracyProbe, stop_reached
from tunesmith.train.budget import TimeBudget
from tunesmith.train.checkpoint import TrainState
from tunesmith.train.engines import FastEngine, HFEngine, fast_path_wanted
from tunesmith.train.loss import autocast, completion_loss, model_dtype, use_bf16
from tunesmith.train.metrics import MetricsLog, TrainProgress, article_line

log = logging.getLogger(__name__)


@dataclass
class TrainResult:
    run_dir: Path
    output_dir: Path
    """adapter/ (LoRA, QLoRA) or model/ (full fine-tuning)."""
    steps: int
    train_loss: float | None
    eval_loss: float | None
    seconds: float
    tokens_per_second: float


def pick_device(wanted: str) -> str:
    import torch

    if wanted == "cuda" and not torch.cuda.is_available():
        raise ModelError("train.device: cuda asked for, but torch sees no CUDA GPU", "use train.device: auto or cpu")
    if wanted == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return wanted


def train(config: Config, console: Console, resume: bool = False, force: bool = False,
          clock: Callable[[], float] = time.perf_counter) -> TrainResult:
    """`resume`: continue from the newest intact checkpoint; `force`: start over where a run already trained
    (without either, an existing run is refused rather than deleted). `clock`: seconds, for the time budget
    and tokens/s; the tests pass one that ticks per step, so what they check never depends on the machine."""
    world = distributed.init(pick_device(config.train.device))
    if not world.main:
        logging.getLogger("tunesmith").setLevel(logging.ERROR)  # rank 0 reports; the others would repeat it
    try:
        return _train(config, console if world.main else Console(quiet=True), resume, force, clock, world)
    finally:
        distributed.teardown()


def _train(config: Config, console: Console, resume: bool, force: bool, clock: Callable[[], float],
           world: distributed.World) -> TrainResult:
    import torch

    from tunesmith.data import prepare
    from tunesmith.models import load_model, load_tokenizer, resolve_base, save_tokenizer
    from tunesmith.train.lora import apply_lora, check_lora

    cfg = config.train
    run = Run.of(config)
    device = pick_device(cfg.device)
    if cfg.method == "qlora" and device != "cuda":
        raise ModelError("train.method: qlora needs a CUDA GPU (bitsandbytes 4-bit weights)",
                         "on CPU use train.method: lora, which trains the same adapter on full-precision weights")
    if cfg.method == "qlora" and cfg.fsdp and world.size > 1:
        raise ModelError("train.fsdp does not shard 4-bit (qlora) weights", "use train.method: lora, or DDP (fsdp: false)")
    if not resume and not force and run.has_outputs("train"):
        raise ConfigError(f"{run.dir} already holds a trained run (checkpoints, adapter or metrics.jsonl)",
                          "--resume continues it; --set name=NEW trains a new one; --force deletes it and starts over")
    if world.main:  # what a killed process left half-written: .tmp-adapter-*, .tmp-step-*, .tmp-train.jsonl-*
        remove_temporaries(run.dir, run.checkpoints, run.data)
    world.barrier()  # before any rank writes its own temporaries into data/
    torch.manual_seed(cfg.seed)
    if device == "cpu":
        torch.set_num_threads(max(1, torch.get_num_threads()))

    # --- setup: data, model, adapter, optimizer
    base = resolve_base(config.model.base, config.model.revision)
    tokenizer = load_tokenizer(base)
    data = prepare(config, tokenizer)
    if not data.train:
        raise DataError(f"{config.data.train_file}: no training examples left after validation",
                        "check `tunesmith data inspect` for what was dropped")
    four_bit = cfg.method == "qlora"  # the base loads onto the GPU already quantized to NF4 (bitsandbytes)
    model = load_model(base, dtype=model_dtype(config, device), trust_remote_code=config.model.trust_remote_code,
                       four_bit=four_bit)
    if device == "cpu" and use_bf16(config, device):  # said once: a user comparing losses should know
        console.print("computing in bf16 on this CPU (it has AMX/AVX512-BF16; train.bf16: false for fp32)")
    if not (cfg.fsdp and world.size > 1) and not four_bit:  # FSDP2 moves the model layer by layer, as it shards
        model.to(device)
    model.config.use_cache = False
    pad_id = tokenizer.pad_token_id
    if cfg.method in ("lora", "qlora"):
        check_lora(model, config.lora)
    if fast_path_wanted(config, device, model):
        engine = FastEngine(model, data, config, device, pad_id, world)
        console.print(f"GPU fast path: packed {len(data.train)} examples into {len(engine.buffers)} buffers "
                      f"of {engine.seq_len} tokens")
    else:
        checkpointing = memory.use_checkpointing(config.train, model.config, data.train, use_bf16(config, device),
                                                 device, console.print)
        if four_bit:
            prepare_4bit(model, checkpointing)
        elif checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        if cfg.method in ("lora", "qlora"):
            model = apply_lora(model, config.lora, cfg.seed)
        # DDP or FSDP2 around the loss on several ranks; before the optimizer, which must see FSDP2's shards.
        forward = distributed.wrap(model, completion_loss, world, device, cfg.fsdp, use_bf16(config, device))
        optimizer = _optimizer(model, config, device, console)
        engine = HFEngine(model, data, config, device, pad_id, optimizer, forward, world)
    total_steps = cfg.max_steps or math.ceil(cfg.epochs * engine.steps_per_epoch)
    scheduler = _scheduler(engine.optimizer, config, total_steps)

    checkpoints = run.checkpoints
    state = TrainState()
    settings = checkpoint.resume_settings(config, "fast" if isinstance(engine, FastEngine) else "hf")
    latest = checkpoint.resume_point(checkpoints, settings, console.print) if resume else None
    if latest is not None:  # every rank loads the same one: rank 0 is not writing while the others read
        trainable, optimizer_state, state = checkpoint.load(latest, scheduler)
        engine.load_trainable(trainable)
        engine.load_optimizer_state(optimizer_state)
        if state.total_steps:  # a time budget had fixed the run's length before it stopped
            total_steps = state.total_steps
            scheduler = _rescheduled(scheduler, engine.optimizer, config, total_steps)
        console.print(f"resuming from {latest.name} (step {state.step} of {total_steps})")
    elif world.main:  # a new run, --force, or a resume with no intact checkpoint to resume from
        if resume and checkpoint.complete(checkpoints):
            console.print("no intact checkpoint to resume from: training from the start")
        run.clear("train")
    started_at = datetime.now(UTC).isoformat(timespec="seconds")
    if world.main:
        run.write_record(_run_record(config, device, data, started_at, None, world))

    # --- loop: step, log, eval, checkpoint
    gpu_memory = _gpu_memory_at_start() if device == "cuda" else None
    metrics = MetricsLog(run.metrics, run.tensorboard, state.step, write=world.main)
    window_loss, window_steps, last_eval = state.window_loss, state.window_steps, None
    t0, tokens_at_start, seen_inputs = clock(), state.tokens, 0
    budget = TimeBudget(cfg.max_minutes * 60, cfg, len(data.eval)) if cfg.max_minutes else None
    probe = AccuracyProbe(config, tokenizer, data.eval_examples) if cfg.eval_accuracy and data.eval else None
    stopped_early = None

    def evaluation(progress: TrainProgress) -> tuple[float, float]:
        """Eval loss and, with a probe, the accuracy of greedy answers, logged; returns (loss, seconds taken)."""
        started = clock()
        loss = engine.eval_loss()
        record = {"step": state.step, "eval_loss": round(loss, 4)}
        if probe is not None:
            record |= probe(engine.generation_model(), autocast(device, config))
        record["seconds"] = round(state.elapsed + clock() - t0, 1)
        metrics.write(record)
        progress.print("{" + ", ".join(f"'{key}': {value}" for key, value in record.items()
                                       if key not in ("eval_accuracy_seconds", "seconds")) + "}")
        nonlocal stopped_early
        stopped_early = stopped_early or stop_reached(cfg.stop_when, record)
        return loss, clock() - started

    with TrainProgress(console, total_steps, state.step) as progress:
        while state.step < total_steps:
            loss_value, grad_norm, inputs, targets = engine.step(state.step)
            scheduler.step()
            state.step += 1
            state.tokens += targets
            seen_inputs += inputs
            window_loss, window_steps = window_loss + loss_value, window_steps + 1
            if budget is not None and state.total_steps is None:
                float(loss_value)  # the budget times these steps: wait until the GPU has run them

            eval_seconds = None
            if budget is not None and state.total_steps is None and state.step == budget.fit_step and data.eval:
                # One eval pass here, timed, so the fit counts what the eval passes to come will cost (the
                # accuracy probe generates answers: far more than a forward pass over the eval split).
                last_eval, eval_seconds = evaluation(progress)
            now = clock()
            elapsed = now - t0
            tokens_per_second = seen_inputs / elapsed if elapsed else 0.0
            if budget is not None:
                spent = world.first(state.elapsed + elapsed)  # rank 0's clock decides for every rank
                fitted = budget.fit(state.step, spent, eval_seconds) if state.total_steps is None else None
                if fitted is not None:
                    state.total_steps = min(total_steps, fitted[0])  # fitted[0] >= state.step: fit adds to it
                    progress.print(f"time budget {cfg.max_minutes:g} min: {state.total_steps} steps fit "
                                   f"({fitted[1]:.2f} s a step; {'max_steps' if cfg.max_steps else 'epochs'} "
                                   f"allow {total_steps})")
                    if state.total_steps < total_steps:
                        total_steps = state.total_steps
                        scheduler = _rescheduled(scheduler, engine.optimizer, config, total_steps)
                        progress.resize(total_steps)
                elif spent > budget.seconds and state.step < total_steps:  # slower than timed: stop, saved
                    progress.print(f"time budget {cfg.max_minutes:g} min spent at step {state.step} of "
                                   f"{total_steps}: stopping (the learning rate had not decayed to its end)")
                    total_steps = state.total_steps = state.step
                    progress.resize(total_steps)

            progress.update(state.step, tokens_per_second)
            if state.step % cfg.log_steps == 0 or state.step == total_steps:
                # On the fast path the loss, the gradient norm and the learning rate (CUDA graphs) are device
                # tensors, read here only: a read waits for the GPU, and the CPU would stop queueing work.
                loss_mean, grad_norm = float(window_loss) / window_steps, float(grad_norm)
                if not math.isfinite(loss_mean):  # read here, not every step (a GPU read waits); the weights are
                    # checked again before every save, so nothing trained past this is ever kept
                    raise checkpoint.NotFinite(f"training stopped at step {state.step}: the loss is {loss_mean}",
                                               cfg.learning_rate)
                learning_rate = float(scheduler.get_last_lr()[0])
                tokens_per_second = seen_inputs / max(clock() - t0, 1e-9)  # the GPU has caught up
                progress.update(state.step, tokens_per_second, loss_mean, learning_rate)
                record = {
                    "step": state.step,
                    "loss": round(loss_mean, 4),
                    "grad_norm": None if math.isnan(grad_norm) else grad_norm,
                    "learning_rate": learning_rate,
                    "epoch": round(state.step / engine.steps_per_epoch, 2),
                    "tokens_per_second": round(tokens_per_second, 1),
                    "trained_tokens": state.tokens,
                    "seconds": round(state.elapsed + now - t0, 1),  # since training began
                }
                metrics.write(record)
                progress.print(article_line(record))
                window_loss, window_steps = 0.0, 0
            if data.eval and eval_seconds is None and (state.step % cfg.eval_steps == 0 or state.step == total_steps):
                last_eval, _ = evaluation(progress)
            if stopped_early and state.step < total_steps:  # the run ends here, as if this were its last step
                progress.print(f"stopping early: {stopped_early}")
                total_steps = state.total_steps = state.step
                progress.resize(total_steps)
            if state.step % cfg.save_steps == 0 or state.step == total_steps:
                now = clock()  # the eval pass just run counts in this interval
                state.elapsed += now - t0
                state.window_loss, state.window_steps = float(window_loss), window_steps
                t0, seen_inputs = now, 0
                trainable, optimizer_state = engine.trainable(), engine.optimizer_state()  # all ranks: FSDP2 gathers
                checkpoint.check_finite(trainable, state.step, cfg.learning_rate)
                if world.main:
                    checkpoint.save(checkpoints, trainable, optimizer_state, scheduler, state, settings)
    metrics.close()

    # --- save: a PEFT adapter that PeftModel.from_pretrained loads, whichever engine trained it; with
    # train.method: full the whole checkpoint (model/), which every later stage loads in place of base + adapter
    output_dir = run.trained_dir(config)
    trainable = engine.trainable()
    checkpoint.check_finite(trainable, state.step, cfg.learning_rate)
    if world.main:
        with atomic_path(output_dir, directory=True) as tmp:
            engine.save_adapter(tmp, str(base), trainable)
            save_tokenizer(tokenizer, tmp, base)
    digests = world.weight_digests(trainable) if world.size > 1 else None
    if digests and len(set(digests)) > 1:  # a bug, not a user error: the ranks stopped training one model
        raise RuntimeError(f"ranks ended with different adapter weights: {digests}")
    world.barrier()  # the metrics file is complete before any rank reads the final numbers from it
    seconds = state.elapsed
    final = {
        "steps": state.step,
        "train_loss": _last(run.metrics, "loss"),
        "eval_loss": last_eval if last_eval is not None else _last(run.metrics, "eval_loss"),
        "train_seconds": round(seconds, 1),
        "trained_tokens": state.tokens,
        "trained_tokens_per_second": round((state.tokens - tokens_at_start) / max(seconds, 1e-9), 1),
    }
    if gpu_memory is not None:  # what Unsloth users read off its last cell: what the card must hold
        gpu_memory["training_peak"] = round(torch.cuda.max_memory_allocated() / 2**30, 3)
        final["gpu_memory_gib"] = gpu_memory
        console.print(f"GPU memory: {gpu_memory['after_load']:.2f} GiB after load, "
                      f"{gpu_memory['training_peak']:.2f} GiB peak while training")
    if digests:
        final["rank_weight_sha256"] = digests
    if stopped_early:
        final["stopped_early"] = stopped_early
    if world.main:
        run.write_record(_run_record(config, device, data, started_at, final, world))
    return TrainResult(run.dir, output_dir, state.step, final["train_loss"], final["eval_loss"], seconds,
                       final["trained_tokens_per_second"])


def prepare_4bit(model: Any, checkpointing: bool) -> None:
    """A 4-bit (NF4) base made ready for training an adapter: every base weight frozen, activations
    recomputed when asked.

    Not peft's `prepare_model_for_kbit_training`: it casts every parameter that is not 4-bit (embeddings,
    norms, an untied LM head) from bf16 to float32, a guard for fp16 compute, whose narrow range overflows in the
    norms. tunesmith computes in bf16, which has float32's range, and the norms already upcast inside their
    forward (Llama, Qwen, Gemma). The cast is not free: Qwen3-0.6B's tied 151,936 x 1,024 embedding is a quarter
    of the model and doubles to 0.58 GiB, more than its 4-bit linear layers take (bench/RESULTS.md, issue 17).
    """
    for param in model.parameters():
        param.requires_grad_(False)
    if checkpointing:
        # Non-reentrant checkpointing carries gradients through frozen layers without peft's
        # input-requires-grad hook (the reentrant kind needs it).
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


def _gpu_memory_at_start() -> dict[str, float]:
    """GPU memory once the model, adapter and optimizer are set up: the peak while loading (a 4-bit base is
    quantized as it loads) and what stays resident; the training peak is counted from here."""
    import torch

    memory = {"load_peak": round(torch.cuda.max_memory_allocated() / 2**30, 3),
              "after_load": round(torch.cuda.memory_allocated() / 2**30, 3)}
    torch.cuda.reset_peak_memory_stats()
    return memory


def _optimizer(model: Any, config: Config, device: str, console: Console):
    import torch

    cfg = config.train
    wanted = cfg.optimizer
    if wanted == "auto":
        wanted = "adamw_8bit" if device == "cuda" else "adamw"
    optimizer_class = torch.optim.AdamW
    if wanted == "adamw_8bit":
        if device != "cuda":
            console.print("train.optimizer: adamw_8bit needs a CUDA GPU (bitsandbytes); using AdamW on CPU")
        else:
            try:
                import bitsandbytes as bnb

                optimizer_class = bnb.optim.AdamW8bit
            except ImportError:
                console.print("bitsandbytes is not installed: using AdamW instead of 8-bit AdamW")
    if cfg.loraplus_lr_ratio and cfg.method in ("lora", "qlora"):
        from peft.optimizers import create_loraplus_optimizer

        return create_loraplus_optimizer(model, optimizer_class, lr=cfg.learning_rate,
                                         loraplus_lr_ratio=cfg.loraplus_lr_ratio, weight_decay=cfg.weight_decay)
    params = [p for p in model.parameters() if p.requires_grad]
    return optimizer_class(params, lr=cfg.learning_rate, weight_decay=cfg.weight_decay)


def _scheduler(optimizer: Any, config: Config, total_steps: int):
    from transformers import get_scheduler

    warmup = math.ceil(config.train.warmup_ratio * total_steps)
    name = {"constant": "constant_with_warmup"}.get(config.train.lr_scheduler, config.train.lr_scheduler)
    return get_scheduler(name, optimizer, num_warmup_steps=warmup, num_training_steps=total_steps)


def _rescheduled(scheduler: Any, optimizer: Any, config: Config, total_steps: int):
    """The same schedule over `total_steps`, at the step the old one had reached. The optimizer keeps the
    learning rate already set for the next step (a resumed run restores that same rate from its checkpoint)."""
    import torch

    rates = [float(group["lr"]) for group in optimizer.param_groups]
    fitted = _scheduler(optimizer, config, total_steps)  # a new scheduler sets its step-0 rate: put ours back
    fitted.load_state_dict(scheduler.state_dict())
    for group, rate in zip(optimizer.param_groups, rates, strict=True):
        if isinstance(group["lr"], torch.Tensor):  # the fast path's rate lives in a device tensor (CUDA graphs)
            group["lr"].fill_(rate)
        else:
            group["lr"] = rate
    return fitted


def _last(path: Path, key: str) -> float | None:
    value = None
    if path.exists():
        for line in path.read_text(encoding="utf-8").splitlines():
            record = json.loads(line)
            if key in record:
                value = record[key]
    return value


def _file_hash(paths: list[str | None]) -> str:
    digest = hashlib.sha256()
    for name in paths:
        if name and Path(name).is_file():
            with open(name, "rb") as handle:
                for block in iter(lambda: handle.read(1 << 20), b""):
                    digest.update(block)
    return digest.hexdigest()


def _run_record(config: Config, device: str, data: Any, started_at: str, final: dict | None,
                world: distributed.World) -> dict:
    versions = {}
    for package in ("tunesmith", "torch", "transformers", "peft", "trl", "accelerate", "llama-cpp-python"):
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            pass
    return {
        "config": record_config(config),
        "versions": versions,
        "device": device,
        "world_size": world.size,
        "dataset_sha256": _file_hash([config.data.train_file, config.data.eval_file]),
        "examples": {"train": len(data.train), "eval": len(data.eval)},
        "started_at": started_at,
        "ended_at": datetime.now(UTC).isoformat(timespec="seconds") if final else None,
        "final": final,
    }
