"""`tunesmith train`: LoRA supervised fine-tuning as a recipe of named steps, read top to bottom:
`setup` (device and precision, data, model, engine, learning rate, resume) → `loop` (step → log → eval → save,
until the budget says the run is over) → `finish` (the adapter, run.json).

The loop is plain PyTorch over transformers + peft (no Trainer), because it has to resume bit-exactly from
a SIGKILL and to skip work the Trainer does not let us skip:
- length-grouped batches (batches.py), so padding costs almost nothing;
- logits and cross-entropy only at trained positions (`completion_loss`): with completion-only loss most
  positions are prompt, and the LM head is a large share of a small model's compute;
- the loss is the mean over every trained token of the accumulated batches, as if they were one batch.
How long it trains and its learning rate follow the run's progress (budget.py, schedule.py): by steps, or by
time with `train.max_minutes`, re-estimated at every step. On CPU the number of compute threads follows what
other processes leave free (threads.py).

On several processes (`tunesmith train --gpus N`, torchrun, accelerate launch: train/distributed.py) the same
loop runs on every rank over its shard of each global batch; rank 0 alone writes files and prints.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rich.console import Console

from tunesmith.atomic import atomic_path, remove_temporaries
from tunesmith.config import Config
from tunesmith.errors import ConfigError, DataError, ModelError
from tunesmith.run import Run
from tunesmith.train import checkpoint, distributed, memory
from tunesmith.train.accuracy import AccuracyProbe, stop_reached
from tunesmith.train.budget import TIMED_EVAL_PART, Budget, StepPlan
from tunesmith.train.checkpoint import TrainState
from tunesmith.train.engines import FastEngine, HFEngine, fast_path_wanted
from tunesmith.train.loss import autocast, completion_loss, model_dtype, use_bf16
from tunesmith.train.metrics import MetricsLog, TrainProgress, article_line
from tunesmith.train.schedule import LearningRate
from tunesmith.train.threads import ThreadGovernor
from tunesmith.train.workers import step_workers

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
          clock: Callable[[], float] = time.perf_counter, threads: ThreadGovernor | None = None) -> TrainResult:
    """`resume`: continue from the newest intact checkpoint; `force`: start over where a run already trained
    (without either, an existing run is refused rather than deleted). `clock`: seconds, for the time budget
    and tokens/s; the tests pass one that ticks per step, so what they check never depends on the machine.
    `threads`: the CPU thread governor (tests inject one that reads made-up CPU times)."""
    world = distributed.init(pick_device(config.train.device))
    if not world.main:
        logging.getLogger("tunesmith").setLevel(logging.ERROR)  # rank 0 reports; the others would repeat it
    try:
        recipe = Recipe(config, console if world.main else Console(quiet=True), clock, world, threads)
        recipe.setup(resume, force)
        recipe.loop()
        return recipe.finish()
    finally:
        distributed.teardown()


class Recipe:
    def __init__(self, config: Config, console: Console, clock: Callable[[], float], world: distributed.World,
                 threads: ThreadGovernor | None = None):
        self.config, self.cfg, self.console, self.clock, self.world = config, config.train, console, clock, world
        self.run = Run.of(config)
        self.state = TrainState()
        self.threads = threads
        self.last_eval: float | None = None
        self.stopped_early: str | None = None

    # ------------------------------------------------------------------------------------------ setup

    def setup(self, resume: bool, force: bool) -> None:
        self._check(resume, force)
        self._setup_device()
        self._setup_data()
        self._setup_model()
        self._setup_engine()
        self._setup_schedule()
        if resume:
            self._resume()
        elif self.world.main:
            self.run.clear("train")
        if self.world.main:
            self.run.start_record(self.config, self.device, {"train": len(self.data.train), "eval": len(self.data.eval)},
                                  self.world.size)

    def _check(self, resume: bool, force: bool) -> None:
        cfg, run = self.cfg, self.run
        self.device = pick_device(cfg.device)
        if cfg.method == "qlora" and self.device != "cuda":
            raise ModelError("train.method: qlora needs a CUDA GPU (bitsandbytes 4-bit weights)",
                             "on CPU use train.method: lora, which trains the same adapter on full-precision weights")
        if cfg.method == "qlora" and cfg.fsdp and self.world.size > 1:
            raise ModelError("train.fsdp does not shard 4-bit (qlora) weights",
                             "use train.method: lora, or DDP (fsdp: false)")
        if not resume and not force and run.has_outputs("train"):
            raise ConfigError(f"{run.dir} already holds a trained run (checkpoints, adapter or metrics.jsonl)",
                              "--resume continues it; --set name=NEW trains a new one; --force deletes it and starts over")
        if self.world.main:  # what a killed process left half-written: .tmp-adapter-*, .tmp-step-*, .tmp-train.jsonl-*
            remove_temporaries(run.dir, run.checkpoints, run.data)
        self.world.barrier()  # before any rank writes its own temporaries into data/

    def _setup_device(self) -> None:
        """The device, and the number format decided once for every later step."""
        import torch

        torch.manual_seed(self.cfg.seed)
        self.bf16 = use_bf16(self.config, self.device)
        self.dtype = model_dtype(self.config, self.device)
        if self.device == "cpu" and self.bf16:  # said once: a user comparing losses should know
            self.console.print("computing in bf16 on this CPU (it has AMX/AVX512-BF16; train.bf16: false for fp32)")
        # Quiet, a batch is one piece on all threads; while the governor sees other processes take cores, it is
        # computed in parts at once (workers.py), which give way far less.
        self.workers = step_workers(self.device, self.cfg.batch_size, self.cfg.threads, self.world.size,
                                    self.cfg.fsdp, torch.get_num_threads())
        if self.device == "cpu" and isinstance(self.cfg.threads, int):
            torch.set_num_threads(self.cfg.threads)
        elif self.device == "cpu" and self.world.size == 1 and self.threads is None:
            self.threads = ThreadGovernor(torch.get_num_threads(), torch.set_num_threads)

    def _setup_data(self) -> None:
        from tunesmith.data import prepare
        from tunesmith.models import load_tokenizer, resolve_base

        self.base = resolve_base(self.config.model.base, self.config.model.revision)
        self.tokenizer = load_tokenizer(self.base)
        self.data = prepare(self.config, self.tokenizer)
        if not self.data.train:
            raise DataError(f"{self.config.data.train_file}: no training examples left after validation",
                            "check `tunesmith data inspect` for what was dropped")

    def _setup_model(self) -> None:
        from tunesmith.models import load_model
        from tunesmith.train.lora import check_lora

        self.four_bit = self.cfg.method == "qlora"  # the base loads onto the GPU already quantized to NF4
        model = load_model(self.base, dtype=self.dtype, trust_remote_code=self.config.model.trust_remote_code,
                           four_bit=self.four_bit)
        if not (self.cfg.fsdp and self.world.size > 1) and not self.four_bit:  # FSDP2 moves it layer by layer
            model.to(self.device)
        model.config.use_cache = False
        if self.cfg.method in ("lora", "qlora"):
            check_lora(model, self.config.lora)
        self.model = model

    def _setup_engine(self) -> None:
        """The fast path (packed, compiled; GPU) or transformers + peft, with its optimizer."""
        from tunesmith.train.lora import apply_lora

        config, cfg, device, pad_id = self.config, self.cfg, self.device, self.tokenizer.pad_token_id
        if fast_path_wanted(config, device, self.model):
            self.engine = FastEngine(self.model, self.data, config, device, pad_id, self.world)
            self.console.print(f"GPU fast path: packed {len(self.data.train)} examples into "
                               f"{len(self.engine.buffers)} buffers of {self.engine.seq_len} tokens")
            return
        model = self.model
        checkpointing = memory.use_checkpointing(cfg, model.config, self.data.train, self.bf16, device,
                                                 self.console.print)
        if self.four_bit:
            prepare_4bit(model, checkpointing)
        elif checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        if cfg.method in ("lora", "qlora"):
            model = apply_lora(model, config.lora, cfg.seed)
        # DDP or FSDP2 around the loss on several ranks; before the optimizer, which must see FSDP2's shards.
        forward = distributed.wrap(model, completion_loss, self.world, device, cfg.fsdp, self.bf16)
        optimizer = _optimizer(model, config, device, self.console)
        self.model = model
        self.engine = HFEngine(model, self.data, config, device, pad_id, optimizer, forward, self.world)

    def _setup_schedule(self) -> None:
        cfg = self.cfg
        epochs, max_steps, minutes = cfg.bounds(self.device)
        total_steps = max_steps or math.ceil(epochs * self.engine.steps_per_epoch)
        if minutes and not cfg.max_minutes:
            self.console.print(f"training for {minutes:g} minutes (the CPU default: set train.max_minutes, "
                               "max_steps or epochs to choose)")
        self.budget = Budget(total_steps, minutes * 60 if minutes else None, cfg.eval_steps if self.data.eval else 0)
        self.rate = LearningRate(self.engine.optimizer, cfg.lr_scheduler, cfg.warmup_ratio, cfg.decay_ratio)
        self.settings = checkpoint.resume_settings(self.config, "fast" if isinstance(self.engine, FastEngine) else "hf")

    def _resume(self) -> None:
        latest = checkpoint.resume_point(self.run.checkpoints, self.settings, self.console.print)
        if latest is None:  # no intact checkpoint to resume from
            if self.world.main:
                if checkpoint.complete(self.run.checkpoints):
                    self.console.print("no intact checkpoint to resume from: training from the start")
                self.run.clear("train")
            return
        # Every rank loads the same one: rank 0 is not writing while the others read.
        trainable, optimizer_state, self.state = checkpoint.load(latest, self.rate)
        self.engine.load_trainable(trainable)
        self.engine.load_optimizer_state(optimizer_state)
        self.state.restore(self.budget)
        if self.state.stopped_early:  # train.stop_when ended the run here: nothing more to train
            self.stopped_early = self.state.stopped_early
            self.budget.total_steps = self.state.step
        where = f" of {self.budget.total_steps}" if self.budget.seconds is None else \
            f", {self.budget.spent / self.budget.seconds:.0%} of the time budget spent"
        self.console.print(f"resuming from {latest.name} (step {self.state.step}{where})")

    # ------------------------------------------------------------------------------------------ loop

    def loop(self) -> None:
        self.gpu_memory = _gpu_memory_at_start() if self.device == "cuda" else None
        self.metrics = MetricsLog(self.run.metrics, self.run.tensorboard, self.state.step, write=self.world.main)
        self.probe = AccuracyProbe(self.config, self.tokenizer, self.data.eval_examples) \
            if self.cfg.eval_accuracy and self.data.eval else None
        self.started, self.seen_inputs, self.tokens_at_start = self.clock(), 0, self.state.tokens
        with TrainProgress(self.console, self.budget.total_steps, self.state.step) as progress:
            if self.budget.seconds is not None:
                progress.by_time(self.budget.seconds, self.budget.spent)
            while (plan := self._next_step()) is not None:
                self.began = began = self.clock()
                loss, grad_norm = self._step(plan)
                self._log(progress, plan, loss, grad_norm)
                evaluated = self._evaluate_if_due(progress, plan)
                last = plan.last or self._stop_early(progress)
                self.budget.step_done(self.clock() - began - evaluated)
                saving = self.clock()
                self._save_if_due(last)  # after step_done: the checkpoint holds this step's time
                self.budget.spend(self.clock() - saving)
                self._adjust_threads(progress)
                if last:
                    break
            if self.budget.seconds is not None and self.budget.progress < 1.0:
                progress.print(f"time budget {self.budget.seconds / 60:g} min spent at step {self.state.step}")
        self.metrics.close()

    def _next_step(self) -> StepPlan | None:
        """The budget's decision for the next step (rank 0's clock decides for every rank)."""
        plan = self.budget.next_step(self.state.step)
        return self.world.first(plan) if self.budget.seconds is not None else plan

    def _step(self, plan: StepPlan) -> tuple[Any, Any]:
        self.rate.set(plan.progress)
        loss, grad_norm, inputs, targets = self.engine.step(self.state.step)
        self.state.step += 1
        self.state.tokens += targets
        self.seen_inputs += inputs
        self.state.window_loss += loss
        self.state.window_steps += 1
        return loss, grad_norm

    def _tokens_per_second(self) -> float:
        spent = self.clock() - self.started
        return self.seen_inputs / spent if spent > 0 else 0.0

    def _log(self, progress: TrainProgress, plan: StepPlan, loss: Any, grad_norm: Any) -> None:
        state, cfg = self.state, self.cfg
        progress.update(state.step, self._tokens_per_second(), time_spent=self.budget.spent)
        if state.step % cfg.log_steps and not plan.last:
            return
        # On the fast path the loss and the gradient norm are device tensors, read here only: a read waits
        # for the GPU, and the CPU would stop queueing work.
        loss_mean, grad_norm = float(state.window_loss) / state.window_steps, float(grad_norm)
        if not math.isfinite(loss_mean):  # the weights are checked again before every save: nothing trained
            # past this is ever kept
            raise checkpoint.NotFinite(f"training stopped at step {state.step}: the loss is {loss_mean}",
                                       cfg.learning_rate)
        record = {
            "step": state.step,
            "loss": round(loss_mean, 4),
            "grad_norm": None if math.isnan(grad_norm) else grad_norm,
            "learning_rate": self.rate.rate(),
            "epoch": round(state.step / self.engine.steps_per_epoch, 2),
            "tokens_per_second": round(self._tokens_per_second(), 1),
            "trained_tokens": state.tokens,
            "seconds": round(self.budget.spent + self.clock() - self.began, 1),  # since training began
            "progress": round(plan.progress, 4),
        }
        progress.update(state.step, record["tokens_per_second"], loss_mean, record["learning_rate"])
        self.metrics.write(record)
        progress.print(article_line(record))
        state.window_loss, state.window_steps = 0.0, 0

    def _evaluate_if_due(self, progress: TrainProgress, plan: StepPlan) -> float:
        """An eval pass when the budget says one is due (every eval_steps, at the end; under a time budget once
        early to time it, then as often as a tenth of the budget allows); returns the seconds it took, which the
        budget counts apart from training."""
        step = self.state.step
        if not self.data.eval or not self.budget.eval_due(step, plan.last):
            return 0.0
        began = self.clock()
        if self.budget.wants_timing_eval(step) and not plan.last:
            self._evaluation(part=TIMED_EVAL_PART)
            seconds = self.clock() - began
            self.budget.eval_done(seconds, step, whole=seconds * TIMED_EVAL_PART)
            return seconds
        record = self._evaluation()
        seconds = self.clock() - began
        self.budget.eval_done(seconds, step)
        record["seconds"] = round(self.budget.spent, 1)
        self.metrics.write(record)
        progress.print("{" + ", ".join(f"'{key}': {value}" for key, value in record.items()
                                       if key not in ("eval_accuracy_seconds", "seconds") and ":" not in key) + "}")
        self.stopped_early = self.stopped_early or stop_reached(self.cfg.stop_when, record)
        return seconds

    def _evaluation(self, part: int = 1) -> dict[str, Any]:
        """Eval loss and, with a probe, the scores of greedy answers (per rule or field where the task has them);
        `part` > 1: over that fraction of the examples only (the timing pass: budget.TIMED_EVAL_PART)."""
        loss = self.engine.eval_loss(part)
        record = {"step": self.state.step, "eval_loss": round(loss, 4)}
        if self.probe is not None:
            record |= self.probe(self.engine.generation_model(), autocast(self.device, self.config), part)
        if part == 1:
            self.last_eval = loss
        return record

    def _stop_early(self, progress: TrainProgress) -> bool:
        if self.stopped_early:
            progress.print(f"stopping early: {self.stopped_early}")
            return True
        return False

    def _save_if_due(self, last: bool) -> None:
        state = self.state
        if state.step % self.cfg.save_steps and not last:
            return
        trainable, optimizer_state = self.engine.trainable(), self.engine.optimizer_state()  # all ranks: FSDP2 gathers
        checkpoint.check_finite(trainable, state.step, self.cfg.learning_rate)
        if self.world.main:
            state.keep(self.budget)
            state.stopped_early = self.stopped_early
            checkpoint.save(self.run.checkpoints, trainable, optimizer_state, self.rate, state, self.settings,
                            keep=self.cfg.save_total_limit)

    def _adjust_threads(self, progress: TrainProgress) -> None:
        if self.threads is None or (threads := self.threads()) is None:
            return
        busy = threads < self.threads.most
        parts = ""
        if self.workers is not None and isinstance(self.engine, HFEngine):
            self.workers.set_threads(max(1, threads // self.workers.count))
            self.engine.workers = self.workers if busy else None
            if busy:
                parts = f"; each batch in {self.workers.count} parts at once, {self.workers.threads_each} thread each"
        progress.print(f"compute threads: {threads} (other processes are using the rest of the "
                       f"{self.threads.most} cores{parts})" if busy else
                       f"compute threads: {threads} (the cores are free again)")

    # ------------------------------------------------------------------------------------------ finish

    def finish(self) -> TrainResult:
        """The trained result (a PEFT adapter that PeftModel.from_pretrained loads, whichever engine trained it;
        with train.method: full the whole checkpoint, model/), and run.json's final numbers."""
        import torch

        output_dir = self.run.trained_dir(self.config)
        trainable = self.engine.trainable()
        checkpoint.check_finite(trainable, self.state.step, self.cfg.learning_rate)
        if self.world.main:
            from tunesmith.models import save_tokenizer

            with atomic_path(output_dir, directory=True) as tmp:
                self.engine.save_adapter(tmp, str(self.base), trainable)
                save_tokenizer(self.tokenizer, tmp, self.base)
        digests = self.world.weight_digests(trainable) if self.world.size > 1 else None
        if digests and len(set(digests)) > 1:  # a bug, not a user error: the ranks stopped training one model
            raise RuntimeError(f"ranks ended with different adapter weights: {digests}")
        self.world.barrier()  # the metrics file is complete before any rank reads the final numbers from it
        final = self._final_numbers()
        if self.gpu_memory is not None:  # what Unsloth users read off its last cell: what the card must hold
            self.gpu_memory["training_peak"] = round(torch.cuda.max_memory_allocated() / 2**30, 3)
            final["gpu_memory_gib"] = self.gpu_memory
            self.console.print(f"GPU memory: {self.gpu_memory['after_load']:.2f} GiB after load, "
                               f"{self.gpu_memory['training_peak']:.2f} GiB peak while training")
        if digests:
            final["rank_weight_sha256"] = digests
        if self.world.main:
            self.run.finish_record(final)
        return TrainResult(self.run.dir, output_dir, self.state.step, final["train_loss"], final["eval_loss"],
                           final["train_seconds"], final["trained_tokens_per_second"])

    def _final_numbers(self) -> dict[str, Any]:
        records = self.run.metrics_records()
        last = {key: next((r[key] for r in reversed(records) if key in r), None) for key in ("loss", "eval_loss")}
        budget, state = self.budget, self.state
        final = {
            "steps": state.step,
            "train_loss": last["loss"],
            "eval_loss": self.last_eval if self.last_eval is not None else last["eval_loss"],
            "train_seconds": round(budget.train_seconds, 1),
            "eval_seconds": round(budget.eval_seconds, 1),
            "trained_tokens": state.tokens,
            "trained_tokens_per_second": round((state.tokens - self.tokens_at_start)
                                               / max(budget.train_seconds, 1e-9), 1),
        }
        if budget.seconds is not None:
            final["budget_seconds"] = budget.seconds
        if self.stopped_early:
            final["stopped_early"] = self.stopped_early
        return final


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


