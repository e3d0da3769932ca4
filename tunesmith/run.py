"""A run folder, `<runs_dir>/<name>/`: the one module that names its files.

Every stage asks a `Run` where its outputs go, whether they are complete, and which config it runs with; no other
module spells a file name of the run folder (tests/test_run.py checks).

    run.json        the config of record (resolved, no secrets), versions, data hash, final numbers
    data/           train.jsonl and validation.jsonl (the split training used), stats.json, duplicates.txt
    checkpoints/    step-NNNNNNNN/, resumable
    adapter/        the PEFT adapter (LoRA, QLoRA); model/ instead with train.method: full
    metrics.jsonl   one line per logged step; tb/ the same for TensorBoard
    eval.jsonl      scored answers, one line per held-out example and model
    merged/ gguf/   export: the merged checkpoint, the GGUF files
    Modelfile       export, written last: it exists exactly when the export is complete (with fidelity.json)
    report.html     everything above on one page; timings.json the pipeline's stage times

Every output is written under a temporary name and renamed when complete (tunesmith/atomic.py), so a stage
is complete exactly when its outputs exist.

Which config a stage uses: the config of record is the one training saved in run.json, because the adapter was
trained with exactly that (model, data rendering, LoRA). A later stage (eval, export, serve) takes only its own
section from the live config (the pipeline's config, or a command's --config/--set), so an edited
`export.quantizations` takes effect on `--force export`; it says so in one log line when that section differs
from the recorded one.
"""

from __future__ import annotations

import json
import logging
import shutil
from dataclasses import dataclass
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path
from typing import Any

from tunesmith.atomic import write_json
from tunesmith.config import Config
from tunesmith.digest import files_sha256
from tunesmith.errors import ConfigError

log = logging.getLogger(__name__)

RUN_JSON = "run.json"
DATA = "data"
TRAIN_SPLIT = "train.jsonl"
EVAL_SPLIT = "validation.jsonl"
"""The held-out split of the training data (Hugging Face's name for it), not the scored answers (EVAL_ANSWERS)."""
OLD_EVAL_SPLIT = "eval.jsonl"
"""The split's name in runs prepared before it was renamed (it was the scored answers' name too): still read."""
STATS = "stats.json"
DUPLICATES = "duplicates.txt"
CHECKPOINTS = "checkpoints"
ADAPTER = "adapter"
FULL_MODEL = "model"
METRICS = "metrics.jsonl"
TENSORBOARD = "tb"
EVAL_ANSWERS = "eval.jsonl"
MERGED = "merged"
GGUF = "gguf"
MODELFILE = "Modelfile"
"""Ollama's name for it, which `ollama create` reads by default."""
FIDELITY = "fidelity.json"
REPORT = "report.html"
TIMINGS = "timings.json"

# Every name above (tests/test_run.py looks for them spelled anywhere else in the package).
NAMES = (RUN_JSON, DATA, TRAIN_SPLIT, EVAL_SPLIT, OLD_EVAL_SPLIT, STATS, DUPLICATES, CHECKPOINTS, ADAPTER,
         FULL_MODEL, METRICS, TENSORBOARD, EVAL_ANSWERS, MERGED, GGUF, MODELFILE, FIDELITY, REPORT, TIMINGS)

OUTPUTS: dict[str, tuple[str, ...]] = {
    "train": (CHECKPOINTS, ADAPTER, FULL_MODEL, METRICS, TENSORBOARD),
    "eval": (EVAL_ANSWERS,),
    "export": (MERGED, GGUF, MODELFILE, FIDELITY),
}
"""What each stage writes: what a fresh start of it (`train --force`, `pipeline --force STAGE`) removes."""

SECTIONS: dict[str, tuple[str, ...]] = {"eval": ("eval",), "export": ("export",), "serve": ("serve",)}
"""The sections of the live config a later stage takes; everything else comes from run.json."""


def record_config(config: Config) -> dict[str, Any]:
    """The resolved config as run.json keeps it: never a secret (serve.api_key) in a run folder, which is copied,
    shared and shown by the web UI."""
    dumped = config.model_dump(mode="json")
    dumped["serve"].pop("api_key", None)
    return dumped


def held_out_file(config: Config) -> str | None:
    """The file of held-out examples that evaluation (and export's fidelity check, and the pipeline's sample
    requests) answer: `eval.file`, else `data.test_file`; None when neither is set."""
    return config.eval.file or config.data.test_file


@dataclass(frozen=True)
class Run:
    dir: Path

    @classmethod
    def of(cls, config: Config) -> Run:
        return cls(config.run_dir)

    def __post_init__(self) -> None:
        object.__setattr__(self, "dir", Path(self.dir))

    # ---------------------------------------------------------------------------------------- paths

    @property
    def record(self) -> Path:
        return self.dir / RUN_JSON

    @property
    def data(self) -> Path:
        return self.dir / DATA

    @property
    def train_split(self) -> Path:
        return self.data / TRAIN_SPLIT

    @property
    def eval_split(self) -> Path:
        """Where the data stage writes the held-out split."""
        return self.data / EVAL_SPLIT

    def eval_split_to_read(self) -> Path:
        """The held-out split as it is on disk: under its old name in a run prepared before the rename."""
        old = self.data / OLD_EVAL_SPLIT
        return old if not self.eval_split.exists() and old.is_file() else self.eval_split

    @property
    def stats(self) -> Path:
        return self.data / STATS

    @property
    def duplicates(self) -> Path:
        return self.data / DUPLICATES

    @property
    def checkpoints(self) -> Path:
        return self.dir / CHECKPOINTS

    @property
    def adapter(self) -> Path:
        return self.dir / ADAPTER

    @property
    def metrics(self) -> Path:
        return self.dir / METRICS

    @property
    def tensorboard(self) -> Path:
        return self.dir / TENSORBOARD

    @property
    def eval_answers(self) -> Path:
        return self.dir / EVAL_ANSWERS

    @property
    def merged(self) -> Path:
        return self.dir / MERGED

    @property
    def gguf(self) -> Path:
        return self.dir / GGUF

    @property
    def modelfile(self) -> Path:
        return self.dir / MODELFILE

    @property
    def fidelity(self) -> Path:
        return self.dir / FIDELITY

    @property
    def report(self) -> Path:
        return self.dir / REPORT

    @property
    def timings(self) -> Path:
        return self.dir / TIMINGS

    def relative(self, path: Path) -> str:
        """`path` as the run folder's files name each other (the Modelfile's `FROM ./gguf/...`)."""
        return Path(path).relative_to(self.dir).as_posix()

    def trained_dir(self, config: Config) -> Path:
        """Where training leaves its result: the PEFT adapter (`adapter/`, LoRA and QLoRA), or with
        `train.method: full` the whole fine-tuned checkpoint (`model/`)."""
        return self.dir / (FULL_MODEL if config.train.method == "full" else ADAPTER)

    def eval_rows(self) -> list[dict[str, Any]]:
        """eval.jsonl: one row per held-out example and model (`tunesmith eval` writes it); [] before it has run."""
        return read_jsonl(self.eval_answers)

    def metrics_records(self) -> list[dict[str, Any]]:
        """metrics.jsonl: one record per logged step and eval pass, as far as training has written it."""
        return read_jsonl(self.metrics)

    def ggufs(self) -> list[Path]:
        """The exported model files (not the LoRA-only GGUF, which needs its base), by name."""
        return sorted(path for path in self.gguf.glob("*.gguf") if ".lora." not in path.name.lower())

    # ---------------------------------------------------------------------------------------- run.json

    def exists(self) -> bool:
        return self.record.is_file()

    def read_record(self) -> dict[str, Any]:
        if not self.exists():
            raise ConfigError(f"{self.dir}: not a tunesmith run (no {RUN_JSON})",
                              "pass --run runs/<name> of a trained run")
        return json.loads(self.record.read_text(encoding="utf-8"))

    def write_record(self, record: dict[str, Any]) -> None:
        write_json(self.record, record)

    def start_record(self, config: Config, device: str, examples: dict[str, int], world_size: int = 1) -> None:
        """run.json as training starts: the config of record, versions, the data's digest; no end yet (the web UI
        reads a run without `ended_at` as training or failed)."""
        self.write_record({
            "config": record_config(config),
            "versions": _versions(),
            "device": device,
            "world_size": world_size,
            "dataset_sha256": files_sha256([config.data.train_file, config.data.eval_file]),
            "examples": examples,
            "started_at": _now(),
            "ended_at": None,
            "final": None,
        })

    def finish_record(self, final: dict[str, Any]) -> None:
        """run.json once training ended: its end time and final numbers beside what `start_record` wrote."""
        self.write_record(self.read_record() | {"ended_at": _now(), "final": final})

    def recorded_config(self) -> Config:
        """The resolved config the run was trained with."""
        return Config.model_validate(self.read_record()["config"])

    def config_for(self, stage: str, live: Config | None = None) -> Config:
        """The config `stage` (eval, export, serve) runs with: run.json's, with the stage's own sections
        (`SECTIONS`) taken from `live` when one is given; one log line names what differs from the record."""
        recorded = self.recorded_config()
        if live is None:
            return recorded
        update = {}
        for section in SECTIONS[stage]:
            old, new = getattr(recorded, section), getattr(live, section)
            changed = _changed(record_config(recorded)[section], record_config(live)[section])
            if changed:
                log.info("%s: using %s from the config (%s has %s)", stage,
                         ", ".join(f"{section}.{key}={value!r}" for key, value, _ in changed), self.record,
                         ", ".join(repr(value) for _, _, value in changed))
            if new != old:  # api_key too, which run.json never holds
                update[section] = new
        return recorded.model_copy(update=update)

    # ---------------------------------------------------------------------------------------- stages

    def trained(self, config: Config) -> bool:
        """Whether training completed: its result is written last and atomically, so existing means complete."""
        directory = self.trained_dir(config)
        weights = "model.safetensors" if config.train.method == "full" else "adapter_model.safetensors"
        return (directory / weights).is_file() or (directory / f"{weights}.index.json").is_file()

    def complete(self, stage: str, config: Config | None = None) -> bool:
        """Whether `stage` (train, eval, export) has its outputs: what the pipeline skips a stage on and what the
        web UI shows. `config` says where training leaves its result (`trained_dir`); without one, run.json's."""
        if stage == "train":
            return self.trained(config if config is not None else self.recorded_config())
        if stage == "eval":
            return self.eval_answers.is_file()
        if stage == "export":
            return self.modelfile.is_file() and self.fidelity.is_file()
        raise ValueError(f"no outputs recorded for stage {stage!r}")

    def has_outputs(self, stage: str) -> bool:
        """Whether any output of `stage` is there (an empty checkpoints/ folder is none)."""
        for name in OUTPUTS[stage]:
            path = self.dir / name
            if path.is_file() or (path.is_dir() and any(path.iterdir())):
                return True
        return False

    def clear(self, stage: str) -> None:
        """Remove what `stage` wrote, before it starts over."""
        for name in OUTPUTS[stage]:
            path = self.dir / name
            shutil.rmtree(path, ignore_errors=True) if path.is_dir() else path.unlink(missing_ok=True)


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    """The records of a JSON-lines file that tunesmith appends to while others read it (metrics.jsonl, eval.jsonl):
    the one reader of both, so the loop, the report and the web UI agree on them. An empty or missing file is no
    records, and a line that is not a JSON object (the last one, torn by a kill or still being written) is
    skipped with a warning."""
    if not path.is_file():
        return []
    records = []
    for number, line in enumerate(path.read_text(encoding="utf-8", errors="replace").splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            log.warning("%s: line %d is not JSON (cut short when the run stopped?); skipped", path, number)
            continue
        if isinstance(record, dict):
            records.append(record)
    return records


def read_json(path: Path) -> Any:
    """A JSON file of the run (run.json, fidelity.json, timings.json), or None when it is not there."""
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None


def _versions() -> dict[str, str]:
    versions = {}
    for package in ("tunesmith", "torch", "transformers", "peft", "trl", "accelerate", "llama-cpp-python"):
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            pass
    return versions


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def _changed(recorded: dict[str, Any], live: dict[str, Any]) -> list[tuple[str, Any, Any]]:
    """(key, live value, recorded value) for each key of a section whose value differs."""
    return [(key, live.get(key), recorded.get(key)) for key in sorted(recorded.keys() | live.keys())
            if live.get(key) != recorded.get(key)]
