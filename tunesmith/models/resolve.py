"""Turn `model.base` into a local checkpoint directory and load it.

Three kinds of value, tried in this order:
  builtin:NAME     a model tunesmith ships (materialized once, see builtin.py)
  a directory      a Hugging Face checkpoint on disk (config.json + weights + tokenizer)
  owner/name       a Hugging Face hub id, downloaded (or taken from the hub cache) with huggingface_hub
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from tunesmith.errors import ModelError
from tunesmith.models import builtin

BUILTINS = {f"builtin:{name}": (lambda name=name: builtin.materialize(name)) for name in builtin.BUILTINS}
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
_OFFLINE_HINT = (
    "offline alternatives: model.base: builtin:smollm2-135m or builtin:gemma3-270m, or the path of a checkpoint directory "
    "downloaded elsewhere (e.g. one made with `huggingface-cli download Qwen/Qwen3-0.6B --local-dir DIR`)"
)


def resolve_base(spec: str, revision: str | None = None) -> Path:
    """Return a local directory holding the checkpoint named by `spec`."""
    if spec.startswith("builtin:"):
        if spec not in BUILTINS:
            raise ModelError(f"model.base: unknown built-in {spec!r}", f"built-ins: {', '.join(BUILTINS)}")
        return BUILTINS[spec]()
    path = Path(spec).expanduser()
    if path.exists():
        if not path.is_dir() or not (path / "config.json").is_file():
            raise ModelError(
                f"model.base: {spec} is not a Hugging Face checkpoint directory (no config.json)",
                "point it at the folder holding config.json, the *.safetensors and the tokenizer files",
            )
        return path
    if not _HUB_ID.match(spec):
        raise ModelError(
            f"model.base: {spec!r} is neither an existing directory nor a hub id like Qwen/Qwen3-0.6B",
            _OFFLINE_HINT,
        )
    return _download(spec, revision)


def _download(repo_id: str, revision: str | None) -> Path:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError, RepositoryNotFoundError

    patterns = ["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja", "*.py"]
    try:
        return Path(snapshot_download(repo_id, revision=revision, allow_patterns=patterns))
    except RepositoryNotFoundError as exc:
        raise ModelError(f"model.base: hub repository {repo_id!r} not found (or private)", _OFFLINE_HINT) from exc
    except (LocalEntryNotFoundError, OSError) as exc:
        # With no network, huggingface_hub falls back to its cache and then raises this.
        raise ModelError(
            f"model.base: cannot download {repo_id!r}: the Hugging Face hub is unreachable from this machine "
            "and the model is not in the local hub cache",
            _OFFLINE_HINT,
        ) from exc


def load_tokenizer(path: str | Path) -> Any:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path)
    if tokenizer.pad_token is None:
        # Padding is masked out everywhere; reusing EOS avoids resizing the embedding matrix.
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_model(path: str | Path, dtype: Any = None, device: str | None = None, trust_remote_code: bool = False):
    import torch
    from transformers import AutoModelForCausalLM

    try:
        model = AutoModelForCausalLM.from_pretrained(
            path, dtype=dtype or torch.float32, trust_remote_code=trust_remote_code
        )
    except ValueError as exc:
        raise ModelError(f"cannot load {path} as a causal language model: {str(exc).splitlines()[0]}") from exc
    if device:
        model.to(device)
    return model
