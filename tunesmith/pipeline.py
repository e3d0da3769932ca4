"""`tunesmith pipeline`: the reference article's nine steps in order, from one config.

Each stage is skipped when its outputs are complete, so a re-run after a crash resumes where it stopped.
Stages whose issue has not landed yet are reported and the pipeline stops there (exit 0: nothing failed).
"""

from __future__ import annotations

import time
from collections.abc import Callable

from rich.console import Console

from tunesmith.config import Config
from tunesmith.errors import NotBuiltYet


def _stage_model(config: Config, console: Console) -> None:
    from tunesmith.models import load_tokenizer, resolve_base

    path = resolve_base(config.model.base, config.model.revision)
    tokenizer = load_tokenizer(path)
    console.print(f"  base model {config.model.base} → {path} (vocab {len(tokenizer)})")


def _not_built(issue: int, what: str) -> Callable[[Config, Console], None]:
    def stage(config: Config, console: Console) -> None:
        raise NotBuiltYet(f"{what} arrives with issue #{issue}")

    return stage


STAGES: list[tuple[str, Callable[[Config, Console], None]]] = [
    ("model", _stage_model),
    ("data", _not_built(3, "data check")),
    ("train", _not_built(4, "training")),
    ("eval", _not_built(7, "evaluation")),
    ("export", _not_built(5, "GGUF export and fidelity check")),
    ("create", _not_built(6, "model store")),
    ("serve", _not_built(6, "Ollama-compatible server")),
]


def run_pipeline(config: Config, console: Console, force: set[str] | None = None) -> None:
    console.print(f"[bold]tunesmith pipeline[/] {config.name}: base {config.model.base}")
    for name, stage in STAGES:
        started = time.perf_counter()
        console.print(f"[bold cyan]▶ {name}[/]")
        try:
            stage(config, console)
        except NotBuiltYet as missing:
            console.print(f"[yellow]■ stopped before {name}:[/] {missing.message}")
            remaining = [n for n, _ in STAGES[STAGES.index((name, stage)):]]
            console.print(f"  not built yet: {', '.join(remaining)}")
            return
        console.print(f"[green]✓ {name}[/] ({time.perf_counter() - started:.1f} s)")
