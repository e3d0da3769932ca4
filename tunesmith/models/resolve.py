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


def save_tokenizer(tokenizer: Any, out: str | Path, base: str | Path) -> None:
    """`tokenizer.save_pretrained(out)`, plus what transformers 5 no longer writes and llama.cpp's converter reads
    for SentencePiece vocabularies (Gemma, Llama 2, Mistral): the base's tokenizer.model and the control and
    user-defined tokens of its tokenizer_config.json (`added_tokens_decoder`). Without them a merged Gemma
    converts with the wrong vocabulary (models/spm_vocab.py)."""
    import shutil

    from tunesmith.models import spm_vocab

    out, base = Path(out), Path(base)
    tokenizer.save_pretrained(out)
    if (base / "tokenizer.model").is_file() and not (out / "tokenizer.model").is_file():
        shutil.copyfile(base / "tokenizer.model", out / "tokenizer.model")
    decoder = spm_vocab.added_tokens_decoder(base)
    if decoder and not spm_vocab.added_tokens_decoder(out):
        spm_vocab.add_tokens_decoder(out, decoder)


def nf4_config() -> Any:
    """QLoRA's 4-bit base (Dettmers et al.): NF4 weights, double-quantized scales, bf16 compute. Training and
    export both quantize with exactly this, so export dequantizes the very weights the adapter was trained on."""
    import torch
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                              bnb_4bit_compute_dtype=torch.bfloat16)


def load_model(path: str | Path, dtype: Any = None, device: str | None = None, trust_remote_code: bool = False,
               four_bit: bool = False):
    """The checkpoint as a causal LM; `four_bit`: its linear layers quantized to NF4 by bitsandbytes on the
    current CUDA device (QLoRA), the rest in bf16."""
    import torch
    from transformers import AutoModelForCausalLM

    kwargs: dict[str, Any] = {"dtype": dtype or torch.float32, "trust_remote_code": trust_remote_code}
    if four_bit:
        if not torch.cuda.is_available():
            raise ModelError("a 4-bit (qlora) base needs a CUDA GPU (bitsandbytes)",
                             "on CPU use train.method: lora, which trains the same adapter on full-precision weights")
        try:
            import bitsandbytes  # noqa: F401
        except ImportError as exc:
            raise ModelError("train.method: qlora needs bitsandbytes, which is not installed",
                             "pip install 'tunesmith[gpu]' (bitsandbytes==0.50.2)") from exc
        kwargs.update(dtype=torch.bfloat16, quantization_config=nf4_config(),
                      device_map={"": torch.cuda.current_device()})
    try:
        model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    except ValueError as exc:
        raise ModelError(f"cannot load {path} as a causal language model: {str(exc).splitlines()[0]}") from exc
    if device and not four_bit:
        model.to(device)
    return model
