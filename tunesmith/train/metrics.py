"""Where training numbers go: metrics.jsonl, TensorBoard, the article-shaped log line and a progress bar."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Self

from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

from tunesmith.atomic import is_disk_full, write_text
from tunesmith.errors import DiskFull
from tunesmith.run import read_jsonl


class MetricsLog:
    """Appends one JSON object per logged step to metrics.jsonl and mirrors it to TensorBoard.

    `write=False` (ranks other than 0 of a distributed run) makes it a no-op: one process owns the files."""

    def __init__(self, path: Path, tensorboard: Path, resume_step: int, write: bool = True):
        """`path`: the run's metrics file; `tensorboard`: its TensorBoard folder (tunesmith/run.py names both)."""
        self.enabled = write
        self.path = path
        if not write:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._truncate_after(resume_step)
        self._file = self.path.open("a", encoding="utf-8")
        self._tb = _tensorboard(tensorboard, resume_step)

    def _truncate_after(self, step: int) -> None:
        # Lines logged after the checkpoint we resume from are about to be recomputed: drop them so the
        # curve has each step once. A process killed mid-write leaves a torn last line: read_jsonl drops that.
        if self.path.exists():
            kept = [record for record in read_jsonl(self.path) if record.get("step", 0) <= step]
            write_text(self.path, "".join(json.dumps(record, ensure_ascii=False) + "\n" for record in kept))

    def write(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        # JSON has no NaN or Infinity: a number that is not finite is logged as null (and the loop stops on a
        # loss that is not finite).
        record = {key: None if isinstance(value, float) and not math.isfinite(value) else value
                  for key, value in record.items()}
        try:
            self._file.write(json.dumps(record, ensure_ascii=False, allow_nan=False) + "\n")
            self._file.flush()  # the UI and `tail -f` watch this file while training runs
        except OSError as exc:
            if is_disk_full(exc):
                raise DiskFull(self.path) from exc
            raise
        if self._tb is not None:
            for key, value in record.items():
                if key != "step" and isinstance(value, int | float):
                    self._tb.add_scalar(f"{'eval' if key.startswith('eval') else 'train'}/{key}", value,
                                        record["step"])

    def close(self) -> None:
        if not self.enabled:
            return
        self._file.close()
        if self._tb is not None:
            self._tb.close()


def _tensorboard(directory: Path, resume_step: int):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:  # tensorboard is a pinned dependency; without it, metrics.jsonl still has everything
        return None
    return SummaryWriter(str(directory), purge_step=resume_step + 1 if resume_step else None)


def article_line(record: dict[str, Any]) -> str:
    """The line the reference article shows: {'loss': 0.1143, 'grad_norm': 0.53, 'learning_rate': ..., 'epoch': 4.56}"""
    shown = {key: record[key] for key in ("loss", "grad_norm", "learning_rate", "epoch") if key in record}
    return str(shown)


class TrainProgress:
    """A rich progress bar with step, loss, learning rate, tokens/s and ETA: over steps, or over the time budget's
    seconds for a run bounded by time (`by_time`)."""

    def __init__(self, console: Console, total: int, start: int):
        self.progress = Progress(
            TextColumn("[bold]train"),
            BarColumn(),
            TextColumn("step {task.fields[step]}{task.fields[of]}"),
            TextColumn("loss {task.fields[loss]}"),
            TextColumn("lr {task.fields[lr]}"),
            TextColumn("{task.fields[tps]} tok/s"),
            TimeRemainingColumn(),
            console=console,
        )
        self.timed = False
        self.task = self.progress.add_task("train", total=total, completed=start, step=start, of=f"/{total}",
                                           loss="-", lr="-", tps="-")

    def by_time(self, seconds: float, spent: float) -> None:
        """The bar follows the time budget: the run ends when it is spent, at whatever step."""
        self.timed = True
        self.progress.update(self.task, total=seconds, completed=spent, of="")

    def __enter__(self) -> Self:
        self.progress.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.progress.stop()

    def update(self, step: int, tokens_per_second: float, loss: float | None = None, lr: float | None = None,
               time_spent: float | None = None) -> None:
        """Every step: the step count, tokens/s and the budget's seconds spent; the loss and learning rate where
        they were read (log steps)."""
        shown = {} if loss is None else {"loss": f"{loss:.4f}"}
        if lr is not None:
            shown["lr"] = f"{lr:.2e}"
        completed = time_spent if self.timed and time_spent is not None else (None if self.timed else step)
        if completed is not None:
            shown["completed"] = completed
        self.progress.update(self.task, step=step, tps=f"{tokens_per_second:,.0f}", **shown)

    def print(self, text: str) -> None:
        self.progress.console.print(text, highlight=False, soft_wrap=True)

