"""Shared fixtures. The built-in model is materialized once, in the real $TUNESMITH_HOME, and reused."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="session")
def builtin_checkpoint() -> Path:
    from tunesmith.models import resolve_base

    return resolve_base("builtin:smollm2-135m")


@pytest.fixture(scope="session")
def smollm2_gguf() -> Path:
    from tunesmith.models.builtin import smollm2_gguf

    return smollm2_gguf()


@pytest.fixture(scope="session")
def gemma_checkpoint() -> Path:
    """The built-in Gemma 3 270M (materialized once per machine, about a minute)."""
    from tunesmith.models import resolve_base

    return resolve_base("builtin:gemma3-270m")


@pytest.fixture(scope="session")
def tiny_qwen3(builtin_checkpoint, tmp_path_factory) -> Path:
    from tunesmith.testing import tiny_checkpoint

    return tiny_checkpoint(tmp_path_factory.mktemp("tiny") / "qwen3", "qwen3")


@pytest.fixture(scope="session")
def tiny_llama(builtin_checkpoint, tmp_path_factory) -> Path:
    from tunesmith.testing import tiny_checkpoint

    return tiny_checkpoint(tmp_path_factory.mktemp("tiny") / "llama", "llama")


def run_cli(*args: str, env: dict[str, str] | None = None, cwd: Path | None = None, timeout: float = 300):
    """Run the real `tunesmith` command in a subprocess, as a user would."""
    return subprocess.run(
        [sys.executable, "-m", "tunesmith.cli", *args], check=False,
        capture_output=True, text=True, cwd=cwd or ROOT, timeout=timeout,
        env={**os.environ, "COLUMNS": "200", **(env or {})},
    )
