"""The one config: pydantic models of the YAML file, loading, `--set` overrides and readable errors.

Every default in tunesmith lives here. The LoRA and seed defaults are the reference article's
(Unsloth's `get_peft_model` defaults): r=16, alpha=16, dropout 0, bias none, seven projections, 3407.
"""

from __future__ import annotations

import copy
import difflib
import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from tunesmith.errors import ConfigError

RUNS_DIR = "runs"
PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]

# Every quantization llama.cpp's quantizer can produce through the bindings, by the names
# llama.cpp and Ollama users type (lower case, as in `<name>.q4_k_m.gguf`).
QUANTIZATIONS = [
    "f32", "f16", "bf16", "q8_0", "q6_k", "q5_k_m", "q5_k_s", "q5_0", "q5_1",
    "q4_k_m", "q4_k_s", "q4_0", "q4_1", "q3_k_l", "q3_k_m", "q3_k_s", "q2_k",
]


# A run's name is a folder under runs_dir and the name of the model it exports: the rule of one part of an Ollama
# model name (serve/store.py), so `../x`, `/abs` and '' cannot train outside runs_dir.
RUN_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,79}$")


class Section(BaseModel):
    # Unknown keys are errors: a typo like `lora.rank` must not be silently ignored. No float may be inf or
    # nan: `learning_rate: .inf` trained an adapter of NaNs, `epochs: .inf` overflowed.
    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)


class ModelConfig(Section):
    base: str = "builtin:smollm2-135m"
    """A Hugging Face hub id, a local checkpoint directory, or `builtin:smollm2-135m`."""
    revision: str | None = None
    trust_remote_code: bool = False
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"


class DataConfig(Section):
    train_file: str | None = None
    """JSON (array), JSON Lines, CSV/TSV, Parquet, or a folder saved by `datasets`."""
    eval_file: str | None = None
    """Examples for the eval loss during training; when unset, `eval_fraction` of train_file is held out."""
    test_file: str | None = None
    format: Literal["auto", "input_output", "alpaca", "chat", "sharegpt", "prompt_completion"] = "auto"
    """The record shape; `auto` detects it from the keys (see tunesmith/data/shapes.py)."""
    fields: dict[str, str] = Field(default_factory=dict)
    """Rename fields of your records to the shape's names, e.g. {"input": "question"}."""
    system_prompt: str | None = None
    """The system turn for records that have none."""
    on_error: Literal["stop", "skip"] = "stop"
    """`stop` at the first bad record, or `skip` bad records (each one is reported)."""
    think: Literal["strip", "keep"] = "strip"
    """`strip` removes <think>...</think> from the replies and renders with enable_thinking=False."""
    eval_fraction: float = Field(0.05, ge=0.0, lt=1.0)
    """Share of train_file held out for evaluation, drawn with train.seed."""
    dedupe: bool = True
    """Remove exact duplicate conversations (each is reported)."""
    overlength: Literal["truncate", "drop"] = "drop"
    """What happens to examples longer than train.max_seq_length (always reported)."""


class LoraConfig(Section):
    r: int = Field(16, gt=0)
    alpha: int = Field(16, gt=0)
    dropout: float = Field(0.0, ge=0.0, lt=1.0)
    bias: Literal["none", "all", "lora_only"] = "none"
    target_modules: list[str] | Literal["all-linear"] = Field(default_factory=lambda: list(PROJECTIONS))
    use_rslora: bool = False
    layers_to_transform: list[int] | None = None
    """Put adapters only on these decoder layers (peft's option of that name; negative numbers count from the
    top, -1 being the last layer). Backpropagation then stops at the lowest adapted layer: adapting the upper
    half of the layers saves about a third of each training step."""


DEFAULT_EPOCHS = 3.0
DEFAULT_CPU_MINUTES = 15.0


class TrainConfig(Section):
    method: Literal["lora", "qlora", "full"] = "lora"
    device: Literal["auto", "cpu", "cuda"] = "auto"
    epochs: float | None = Field(None, gt=0)
    """Passes over the training data. With neither `epochs` nor `max_steps`: on a GPU 3 epochs; on a CPU a time
    budget of `max_minutes` (DEFAULT_CPU_MINUTES unless set) within at most 3 epochs, because a CPU's speed, not
    the data's size, decides what a run can do there (a 2-core machine trains ~1,400 goDrive examples in 15
    minutes on one VM of this project and ~3,500 on another)."""
    max_steps: int | None = Field(None, gt=0)
    max_minutes: float | None = Field(None, gt=0)
    """A time budget for the training loop, eval passes included (model loading and data preparation not
    counted). The run's progress is the share of the budget's training time spent, re-estimated at every step
    from the latest step times (train/budget.py); the learning rate follows that progress, so the run ends when
    the budget is spent with the rate at its floor, however the machine's speed moved meanwhile. max_steps and
    epochs stay upper bounds. Checkpoints keep the seconds spent, so `--resume` goes on with the same progress.
    Why: CPU speed differs 2-3x between machines of the same kind, and within a run when other processes come
    and go, so a fixed step count either overruns a budget or wastes it."""
    batch_size: int = Field(8, gt=0)
    grad_accum: int = Field(1, gt=0)
    learning_rate: float = Field(2e-3, gt=0)
    """2e-3: on goDrive (SmolLM2-135M, LoRA r=16, batch 8) 5e-4 reached 10% exact match after 61 steps, 2e-3 57%
    after 97 (DESIGN.md probe); small structured tasks want a high LoRA rate to learn within a CPU budget."""
    lr_scheduler: Literal["linear", "cosine", "constant", "warmup_stable_decay"] = "linear"
    """The rate's shape over the run's progress (train/schedule.py). `warmup_stable_decay` holds the peak and
    decays over the last `decay_ratio` of the run."""
    warmup_ratio: float = Field(0.05, ge=0.0, lt=1.0)
    decay_ratio: float = Field(0.2, gt=0.0, le=1.0)
    """warmup_stable_decay: the share of the run, at its end, over which the rate falls to zero."""
    weight_decay: float = Field(0.0, ge=0.0)
    loraplus_lr_ratio: float | None = Field(None, gt=0)
    """LoRA+ (Hayou et al. 2024; peft's create_loraplus_optimizer): the B matrices learn this many times faster
    than the A matrices (16 in the paper). None: one learning rate for both."""
    optimizer: Literal["auto", "adamw", "adamw_8bit"] = "auto"
    """`auto`: adamw_8bit on GPU (bitsandbytes, as the article), plain AdamW on CPU."""
    max_seq_length: int = Field(1024, gt=0)
    packing: bool = False
    """transformers + peft engine: each batch's examples end to end in one row, attention kept inside each example
    (position ids), instead of rows padded to the batch's longest. No padding at all, but attention over the whole
    row: measured slower on goDrive on CPU (bench/RESULTS.md), where length-grouped batches already waste only
    ~3% on padding. The GPU fast path always packs."""
    share_prefix: bool = True
    """transformers + peft engine: compute the tokens every example of a batch starts with (the chat template's
    start and the system prompt) once per batch, each example attending to their keys and values, instead of once
    per example; same loss and gradients (tests/test_batches.py). Off under gradient checkpointing and FSDP."""
    gradient_checkpointing: Literal["auto", True, False] = "auto"
    """Recompute activations in the backward pass to save memory, at the cost of a second forward. `auto`: on
    only when the largest batch's activations would not fit in half the free memory (train/memory.py); the
    choice is printed. Unsloth's notebooks turn it on because their GPUs are small; a 135M model on a CPU
    machine has memory to spare and only loses time."""
    bf16: Literal["auto", True, False] = "auto"
    threads: Literal["auto"] | int = "auto"
    """CPU training's compute threads. `auto`: torch's (OMP_NUM_THREADS, else the cores); while other processes
    keep cores busy, fewer, and a batch of 2 or more computed in two parts at once (train/threads.py,
    train/workers.py: beside one busy process goDrive's step ran at 0.70x its quiet speed, against 0.60x on one
    thread and 0.35x on two splitting each product); all of them back when the cores are free. A number fixes
    torch's threads."""
    seed: int = 3407
    loss_on: Literal["completion", "all"] = "completion"
    save_steps: int = Field(50, gt=0)
    save_total_limit: int | None = Field(2, gt=0)
    """Checkpoints kept (the newest), as transformers' TrainingArguments; null keeps every one: what
    bench/accuracy_curve.py --checkpoints scores afterwards to draw accuracy against minutes without spending the
    run's budget on eval passes. Two by default: the newest, and the one before it in case the newest is damaged."""
    log_steps: int = Field(10, gt=0)
    eval_steps: int = Field(50, gt=0)
    eval_accuracy: int = Field(32, ge=0)
    """At every eval step, greedy answers to this many examples of the eval set, scored like `tunesmith eval`
    (exact match, edit similarity, the task scorer's headline scores) and logged beside the eval loss
    (`eval_exact_match`, ...). A falling loss does not say when answers become right; this does. 0: off."""
    stop_when: str | None = None
    """End training early once an eval-step score reaches a bound, e.g. `exact_match>=0.95` (also `>`, `<=`,
    `<`; `eval_loss<=0.05` for the loss). The run stops at that step as if it were its last: the adapter,
    the final checkpoint and run.json say so, and --resume does not continue it."""
    low_memory: bool = False
    """GPU fast path: activation checkpointing and 8192-token buffers (~2.6 GiB for Qwen3-0.6B)."""
    fast: Literal["auto", True, False] = "auto"
    """The packed, compiled GPU path (train/fast). auto: on CUDA for LoRA on Llama/Qwen/Mistral models."""
    gpus: int = Field(1, gt=0)
    """Data-parallel processes on this host (`--gpus N`), one per GPU; on train.device: cpu, N CPU processes
    (gloo). The global batch is batch_size × grad_accum × gpus. Under torchrun, its WORLD_SIZE counts."""
    fsdp: bool = False
    """With several GPUs, shard the model with FSDP2 (models that don't fit one card) instead of replicating
    it with DDP. Uses the transformers + peft engine (not the fast path)."""


    def bounds(self, device: str) -> tuple[float | None, int | None, float | None]:
        """(epochs, max_steps, max_minutes) as the run applies them on `device` (see `epochs`)."""
        if self.epochs is None and self.max_steps is None:
            minutes = self.max_minutes or (DEFAULT_CPU_MINUTES if device == "cpu" else None)
            return DEFAULT_EPOCHS, None, minutes
        return self.epochs, self.max_steps, self.max_minutes

    @field_validator("threads")
    @classmethod
    def _threads(cls, value: str | int) -> str | int:
        if isinstance(value, int) and value < 1:
            raise ValueError("expected auto or a number of threads of at least 1")
        return value

    @field_validator("stop_when")
    @classmethod
    def _stop_rule(cls, value: str | None) -> str | None:
        if value is not None:
            parse_stop_rule(value)
        return value


STOP_RULE = re.compile(r"^\s*([A-Za-z_][\w:.-]*)\s*(>=|<=|>|<)\s*([-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?)\s*$")


def parse_stop_rule(text: str) -> tuple[str, str, float]:
    """`exact_match>=0.95` -> ("exact_match", ">=", 0.95); ValueError naming the expected form otherwise."""
    match = STOP_RULE.match(text)
    if not match:
        raise ValueError(f"expected SCORE>=NUMBER (or >, <=, <), e.g. exact_match>=0.95, got {text!r}")
    return match.group(1), match.group(2), float(match.group(3))


class ExportConfig(Section):
    quantizations: list[str] = Field(default_factory=lambda: ["q4_k_m", "q8_0"])
    outtype: Literal["f16", "bf16", "f32"] = "f16"
    template: str | None = None
    """An Ollama Go template to use instead of the one derived from the tokenizer's chat template."""
    min_agreement: float = Field(0.8, ge=0.0, le=1.0)
    """Fidelity check: a quantization whose greedy answers agree with the merged model's on fewer than this share
    of the held-out prompts fails."""
    max_exact_match_loss: float = Field(0.02, ge=0.0, le=1.0)
    """Fidelity check: a quantization whose exact match on the held-out set is more than this below the merged
    model's fails (0.02: 2 points)."""
    modelfile_quant: str | None = None
    """The quantization the Modelfile's FROM points at. None: chosen by accuracy, the smallest file whose exact
    match on the held-out set is within `modelfile_tolerance` of the merged model's and that passes the fidelity
    check (else the most accurate). A named one is used even when it loses more, with a warning."""
    modelfile_tolerance: float = Field(0.01, ge=0.0, le=1.0)
    """How much exact match (0.01: 1 point) the Modelfile's quantization may lose against the merged model when
    export chooses it: on a 2,000-example extraction task q4_k_m lost 4.5 points where q8_0 lost 0.5."""
    fidelity_prompts: int = Field(32, ge=0)
    parameters: dict[str, Any] = Field(default_factory=lambda: {"temperature": 0.0, "repeat_penalty": 1.0})
    """The Modelfile's PARAMETER lines: the answers the served model gives are the ones evaluation scored (greedy,
    no penalty). Without `repeat_penalty 1` the server applies Ollama's default 1.1 over the last 64 tokens,
    prompt included: a goDrive prompt says 挡 four times, and served answers dropped 起步请挂一挡。"""

    @field_validator("modelfile_quant")
    @classmethod
    def _known_quantization(cls, value: str | None) -> str | None:
        if value is not None and value.lower() not in QUANTIZATIONS:
            raise ValueError(f"unknown quantization {value!r}; valid: {', '.join(QUANTIZATIONS)}")
        return value.lower() if value is not None else None

    @field_validator("quantizations")
    @classmethod
    def _known_quantizations(cls, value: list[str]) -> list[str]:
        for name in value:
            if name.lower() not in QUANTIZATIONS:
                raise ValueError(f"unknown quantization {name!r}; valid: {', '.join(QUANTIZATIONS)}")
        return [name.lower() for name in value]


class ServeConfig(Section):
    host: str = "127.0.0.1"
    port: int = Field(11434, gt=0, lt=65536)
    api_key: str | None = None
    parallel: int = Field(4, gt=0)
    """Sequences of one model decoded together (continuous batching, llama-server's -np); each has its own
    cache of num_ctx tokens, so memory for the cache grows with it."""
    max_queue: int = Field(64, gt=0)
    max_loaded: int = Field(2, gt=0)
    keep_alive: str = "5m"
    num_ctx: int = Field(2048, gt=0)
    max_blob_bytes: int = Field(64 * 2**30, gt=0)
    """The largest file /api/blobs accepts (a model's GGUF); a disk that fills first is answered 507 as well."""
    runs_dir: str = RUNS_DIR
    """The runs the web UI at /ui shows. Unless set here, the top-level runs_dir (where training writes)."""
    read_timeout: float = Field(20.0, gt=0)
    """Seconds a client has to send a request's head, and its body (plus a second per 500 bytes received, as
    Apache's mod_reqtimeout): a stalled or trickling client (slowloris) gets 408 and its connection closed."""


class EvalConfig(Section):
    file: str | None = None
    expect: Literal["text", "json"] = "text"
    scorer: str | None = None
    """`module:function` scoring one answer against its reference, e.g. goDrive's per-rule accuracy."""
    max_new_tokens: int = Field(128, gt=0)
    limit: int | None = Field(None, gt=0)
    base_examples: int | None = Field(32, gt=0)
    """The base model answers only the first this many held-out examples (None: all): it shows the "before", and
    a model that has not learned the task scores about 0 on any sample (goDrive's base scored 0% on 100)."""
    near_duplicate_similarity: float = Field(95.0, ge=0.0, le=100.0)
    """A held-out example whose input is at least this similar (rapidfuzz fuzz.ratio, 0-100) to the input of a
    training example with the same answer is a near duplicate: `tunesmith eval` scores those apart from the rest
    and `tunesmith data inspect` counts them (data/near_duplicates.py)."""


class Config(Section):
    name: str = "run"
    """The run's name: outputs go to `<runs_dir>/<name>/`, the exported model is called this."""
    runs_dir: str = RUNS_DIR
    model: ModelConfig = Field(default_factory=ModelConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    lora: LoraConfig = Field(default_factory=LoraConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    export: ExportConfig = Field(default_factory=ExportConfig)
    serve: ServeConfig = Field(default_factory=ServeConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)

    @property
    def run_dir(self) -> Path:
        return Path(self.runs_dir) / self.name

    @field_validator("name")
    @classmethod
    def _name_is_one_folder(cls, value: str) -> str:
        if not RUN_NAME.match(value):
            raise ValueError("a run name is letters, digits, '.', '_' or '-', starting with a letter or digit "
                             "(at most 80): it names a folder under runs_dir and the exported model")
        return value

    @model_validator(mode="after")
    def _serve_shows_these_runs(self) -> Config:
        # One setting says where runs live: the server's UI shows the folder training writes to.
        if "runs_dir" not in self.serve.model_fields_set:
            self.serve.runs_dir = self.runs_dir
        return self


def load_config(path: str | Path | None = None, overrides: list[str] | None = None,
                base: dict[str, Any] | None = None) -> Config:
    """Read the YAML file (if any), apply `key.path=value` overrides, validate.

    Relative file paths in `data.*` and `eval.file` are taken relative to the config file, so a
    config works from any working directory. `base`, without a file: the settings the overrides edit (a run's
    recorded config) instead of the defaults.
    """
    raw: dict[str, Any] = copy.deepcopy(base) if base is not None and path is None else {}
    source = "<defaults>" if base is None else "<the run's config>"
    if path is not None:
        source = str(path)
        raw = _read_yaml(Path(path))
    for override in overrides or []:
        _apply_override(raw, override)
    try:
        config = Config.model_validate(raw)
    except ValidationError as exc:
        raise ConfigError(_describe(exc, source, raw)) from exc
    if path is not None:
        _resolve_paths(config, Path(path).resolve().parent)
    return config


def _read_yaml(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise ConfigError(f"{path}: config file not found", "pass an existing YAML file to --config")
    try:
        data = yaml.load(path.read_text(encoding="utf-8"), Loader=_UniqueKeyLoader)  # a SafeLoader
    except _DuplicateKey as exc:
        raise ConfigError(f"{path}:{exc.line}:{exc.column}: duplicate key {exc.key!r} (first at line "
                          f"{exc.first_line}; YAML would silently keep only the second)",
                          "merge the two into one") from exc
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark else str(path)
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise ConfigError(f"{where}: YAML syntax error: {problem}") from exc
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: not UTF-8 text (byte {exc.start})") from exc
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of sections (model, data, lora, ...) at the top level")
    return data


class _DuplicateKey(Exception):
    def __init__(self, key: Any, line: int, column: int, first_line: int):
        super().__init__(key)
        self.key, self.line, self.column, self.first_line = key, line, column, first_line


class _UniqueKeyLoader(yaml.SafeLoader):
    """PyYAML's safe loader, refusing a key given twice in one mapping (a second `train:` replaced the first)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":  # `<<: *defaults` may repeat keys: that is its point
                continue
            key = self.construct_object(key_node, deep=deep)
            mark = key_node.start_mark
            try:
                if key in seen:
                    raise _DuplicateKey(key, mark.line + 1, mark.column + 1, seen[key])
                seen[key] = mark.line + 1
            except TypeError:  # an unhashable key: the base class says so in its own words
                continue
        return super().construct_mapping(node, deep=deep)


def _apply_override(raw: dict[str, Any], override: str) -> None:
    key, sep, value = override.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"--set {override!r}: expected key.path=value, e.g. --set train.max_steps=20")
    parts = key.strip().split(".")
    node = raw
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"--set {override!r}: {part!r} is not a section")
        node = child
    try:
        node[parts[-1]] = yaml.safe_load(value) if value != "" else ""
    except yaml.YAMLError as exc:
        raise ConfigError(f"--set {override!r}: value is not valid YAML") from exc


def _describe(exc: ValidationError, source: str, raw: dict[str, Any]) -> str:
    """One line for the first problem: file, key path, what was expected, and the closest valid key."""
    error = exc.errors()[0]
    loc = [str(part) for part in error["loc"]]
    key = ".".join(loc)
    if error["type"] == "extra_forbidden":
        section_model: type[BaseModel] = Config
        for part in loc[:-1]:
            field = section_model.model_fields.get(part)
            annotation = field.annotation if field else None
            if isinstance(annotation, type) and issubclass(annotation, BaseModel):
                section_model = annotation
        valid = list(section_model.model_fields)
        close = _closest_key(loc[-1], valid)
        prefix = ".".join(loc[:-1])
        suggestion = f"did you mean {prefix + '.' if prefix else ''}{close}?" if close else (
            f"valid keys: {', '.join(valid)}")
        return f"{source}: unknown key {key!r}; {suggestion}"
    value = _lookup(raw, loc)
    got = f" (got {value!r})" if value is not _MISSING else ""
    return f"{source}: {key}: {error['msg']}{got}"


_MISSING = object()

# The names users bring from PEFT, TRL and the article's notebook, mapped to ours.
_ALIASES = {
    "rank": "r", "lora_r": "r", "lora_alpha": "alpha", "lora_dropout": "dropout",
    "lr": "learning_rate", "num_train_epochs": "epochs", "per_device_train_batch_size": "batch_size",
    "gradient_accumulation_steps": "grad_accum", "max_seq_len": "max_seq_length", "random_state": "seed",
    "quantization_method": "quantizations", "quantization": "quantizations", "warmup_steps": "warmup_ratio",
}


def _closest_key(key: str, valid: list[str]) -> str | None:
    if _ALIASES.get(key) in valid:
        return _ALIASES[key]
    close = difflib.get_close_matches(key, valid, n=1, cutoff=0.5)
    return close[0] if close else None


def _lookup(raw: Any, loc: list[str]) -> Any:
    node = raw
    for part in loc:
        if isinstance(node, dict) and part in node:
            node = node[part]
        elif isinstance(node, list) and part.isdigit() and int(part) < len(node):
            node = node[int(part)]
        else:
            return _MISSING
    return node


def _resolve_paths(config: Config, base: Path) -> None:
    for section, field in [("data", "train_file"), ("data", "eval_file"), ("data", "test_file"), ("eval", "file")]:
        part = getattr(config, section)
        value = getattr(part, field)
        if value and not Path(value).is_absolute():
            setattr(part, field, str(base / value))
    # A local model directory next to the config is found the same way; hub ids and builtins are left alone.
    base_model = config.model.base
    if not base_model.startswith("builtin:") and (base / base_model).is_dir():
        config.model.base = str(base / base_model)
    # A task scorer named as a module (examples.godrive.generate:score) is found from the config's folder
    # or one of its parents and pinned to its file, so the run's saved config works from anywhere.
    if config.eval.scorer and ":" in config.eval.scorer:
        module, _, function = config.eval.scorer.rpartition(":")
        relative = Path(module) if module.endswith(".py") else Path(*module.split(".")).with_suffix(".py")
        if not relative.is_absolute():
            for folder in [base, *base.parents]:
                if (folder / relative).is_file():
                    config.eval.scorer = f"{folder / relative}:{function}"
                    break
