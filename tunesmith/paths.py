"""Where tunesmith keeps things outside a run: `$TUNESMITH_HOME` (default `~/.cache/tunesmith`)."""

from __future__ import annotations

import os
from pathlib import Path


def home() -> Path:
    return Path(os.environ.get("TUNESMITH_HOME") or Path.home() / ".cache" / "tunesmith")


def models_dir() -> Path:
    """The model store (blobs + manifests), laid out like Ollama's `~/.ollama/models`.

    `TUNESMITH_MODELS` moves it alone, as `OLLAMA_MODELS` does for Ollama."""
    return Path(os.environ.get("TUNESMITH_MODELS") or home() / "models")


def base_dir() -> Path:
    """Materialized base checkpoints (the built-in SmolLM2 as a Hugging Face checkpoint)."""
    return home() / "base"


def llama_cpp_dir(version: str) -> Path:
    """llama.cpp's converter scripts, extracted from the pinned llama-cpp-python source distribution."""
    return home() / "llama.cpp" / version
