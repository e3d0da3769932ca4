"""What the web UI knows about runs, read from the files each run writes; nothing here writes.

A run is a folder `<runs_dir>/<name>/` with a run.json. Which stages are complete is `Run.complete`'s answer,
the one the pipeline skips a stage on, so the page and the pipeline never disagree: trained (adapter/ or
model/), evaluated (eval.jsonl), exported (the Modelfile and fidelity.json). Training's state comes from the
files alone, because training records no process id the server could ask about:

- `training`: run.json has no `ended_at` yet (training writes it as its very last act), and the run wrote
  something (run.json, metrics.jsonl, a checkpoint) recently. A resumed run trains on beside the adapter an
  earlier end saved, so this comes first.
- `done`: otherwise, when training's result is there (`Run.complete("train")`).
- `failed`: otherwise: no result, and the run has been silent for longer than `QUIET_LIMIT` seconds and
  `QUIET_GAPS` times its usual gap between two metrics lines. A killed or crashed run looks like that;
  `tunesmith train --resume` continues it. A run between two very slow log lines can be shown as failed
  for a while: the limits are set so that takes 15 minutes of silence.

Every path is resolved and checked to lie inside the runs folder before it is read, so a name taken from a
URL, or a symlink planted in a run folder, can never make the UI read another file. (`Run.complete` reads
nothing but run.json, which `locate` checked; of the other files it asks only whether they exist.)
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from tunesmith.errors import TunesmithError, clip
from tunesmith.evaluate.compare import model_label, scores_of
from tunesmith.run import (
    CHECKPOINTS,
    EVAL_ANSWERS,
    FIDELITY,
    GGUF,
    METRICS,
    OUTPUTS,
    REPORT,
    RUN_JSON,
    Run,
    read_json,
    read_jsonl,
)

# A run's name is its config's `name`, which also names its model: the store's rule for a name part.
RUN_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,79}$")
QUIET_LIMIT = 15 * 60
QUIET_GAPS = 3


class RunError(Exception):
    """A run the UI cannot show: `status` is the HTTP status the reply should carry."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status
        self.message = message


def inside(root: Path, relative: str | Path) -> Path | None:
    """`root / relative` if it exists and, symlinks resolved, stays inside `root`; else None."""
    base = root.resolve()
    path = (base / relative).resolve()
    return path if path.is_relative_to(base) and path != base and path.exists() else None


def locate(runs_dir: Path, name: str) -> Path:
    """The folder of run `name`: 400 for a name that is not a run name, 404 for no such run."""
    if not RUN_NAME.match(name):
        raise RunError(400, f"invalid run name {clip(repr(name))}: a letter or digit, then letters, digits, '.', '_' or '-'")
    path = inside(runs_dir, name)
    # The resolved folder must sit directly in the runs folder: a symlink to elsewhere is not a run here.
    if path is None or path.parent != runs_dir.resolve() or not path.is_dir() or inside(path, RUN_JSON) is None:
        raise RunError(404, f"run {name!r} not found")
    return path


def _read_json(run_dir: Path, name: str) -> Any:
    """A JSON file of the run, or None when it is missing, outside the run or not JSON."""
    path = inside(run_dir, name)
    try:
        return read_json(path) if path else None
    except (OSError, ValueError):  # one unreadable file must not take the whole page down
        return None


def run_names(runs_dir: Path) -> list[str]:
    """The runs in the runs folder, newest first (by their run.json)."""
    if not runs_dir.is_dir():
        return []
    found = []
    for child in runs_dir.iterdir():
        try:
            run_dir = locate(runs_dir, child.name)
        except RunError:
            continue
        found.append((run_dir.joinpath(RUN_JSON).stat().st_mtime, child.name))
    return [name for _, name in sorted(found, reverse=True)]


def metrics(run_dir: Path) -> list[dict[str, Any]]:
    """metrics.jsonl as records (read as the loop and the report read it: `read_jsonl`, which skips a last line
    still being written)."""
    path = inside(run_dir, METRICS)
    return read_jsonl(path) if path is not None else []


def complete(run_dir: Path) -> dict[str, bool]:
    """`Run.complete` for each stage that writes outputs (train, eval, export)."""
    run = Run(run_dir)
    found = {}
    for stage in OUTPUTS:
        try:
            found[stage] = run.complete(stage)
        except (TunesmithError, ValueError):  # run.json unreadable, or its config no longer valid: not done
            found[stage] = False
    return found


@dataclass
class RunSummary:
    name: str
    state: str
    base: str | None = None
    started_at: str | None = None
    ended_at: str | None = None
    step: int | None = None
    loss: float | None = None
    eval_loss: float | None = None
    evaluated: bool = False
    exported: bool = False
    has_report: bool = False
    record: dict[str, Any] = field(default_factory=dict, repr=False)


def summary(run_dir: Path, records: list[dict[str, Any]] | None = None, now: float | None = None) -> RunSummary:
    record = _read_json(run_dir, RUN_JSON)
    record = record if isinstance(record, dict) else {}
    records = metrics(run_dir) if records is None else records
    last = {key: next((r[key] for r in reversed(records) if r.get(key) is not None), None)
            for key in ("step", "loss", "eval_loss")}
    stages = complete(run_dir)
    return RunSummary(
        name=run_dir.name, state=state(run_dir, record, len(records), stages["train"], now), record=record,
        base=(record.get("config") or {}).get("model", {}).get("base"),
        started_at=record.get("started_at"), ended_at=record.get("ended_at"),
        step=last["step"], loss=last["loss"], eval_loss=last["eval_loss"],
        evaluated=stages["eval"], exported=stages["export"],
        has_report=inside(run_dir, REPORT) is not None,
    )


def state(run_dir: Path, record: dict[str, Any], lines: int, trained: bool, now: float | None = None) -> str:
    """`training`, `done` or `failed` (see the module docstring for why these rules); `trained`: whether
    `Run.complete("train")`."""
    if not record.get("ended_at") and _written_recently(run_dir, record, lines, now):
        return "training"
    return "done" if trained else "failed"


def _written_recently(run_dir: Path, record: dict[str, Any], lines: int, now: float | None) -> bool:
    now = time.time() if now is None else now
    written = [path.stat().st_mtime for name in (RUN_JSON, METRICS, CHECKPOINTS)
               if (path := inside(run_dir, name)) is not None]
    if not written:
        return False
    last_write = max(written)
    limit = QUIET_LIMIT
    started = _timestamp(record.get("started_at"))
    if started is not None and lines:
        limit = max(limit, QUIET_GAPS * (last_write - started) / lines)
    return now - last_write <= limit


def _timestamp(value: Any) -> float | None:
    try:
        return datetime.fromisoformat(value).timestamp() if isinstance(value, str) else None
    except ValueError:
        return None


def eval_table(run_dir: Path) -> tuple[list[str], list[list[Any]]]:
    """(score names, rows of [model, n, mean score...]) for base, fine-tuned and each GGUF, as report.html."""
    path = inside(run_dir, EVAL_ANSWERS)
    results = scores_of(read_jsonl(path)) if path is not None else []
    if not results:
        return [], []
    # The headline scores; the task scorer's per-rule ones (`rule:...`) stay in report.html.
    keys = [key for key in dict.fromkeys(k for result in results for k in result.means) if ":" not in key]
    return keys, [[model_label(r.model), r.n, *[r.means.get(key) for key in keys]] for r in results]


@dataclass
class ExportedFile:
    name: str
    size: int
    fidelity: dict[str, Any] | None
    """This file's entry in fidelity.json (exact, first_token, loglik_gap, passed), when it was checked."""


def exports(run_dir: Path) -> tuple[list[ExportedFile], dict[str, Any] | None]:
    """The GGUF files of the run with their fidelity entries, and fidelity.json itself."""
    gguf_dir = inside(run_dir, GGUF)
    fidelity = _read_json(run_dir, FIDELITY)
    entries = fidelity.get("quantizations", []) if isinstance(fidelity, dict) else []
    checked = {Path(str(entry.get("path", ""))).name: entry for entry in entries if isinstance(entry, dict)}
    files = []
    for path in sorted(gguf_dir.glob("*.gguf")) if gguf_dir and gguf_dir.is_dir() else []:
        if (checked_path := inside(run_dir, Path(GGUF, path.name))) is not None:
            files.append(ExportedFile(path.name, checked_path.stat().st_size, checked.get(path.name)))
    return files, fidelity
