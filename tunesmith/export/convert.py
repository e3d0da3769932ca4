"""GGUF conversion with llama.cpp's own `convert_hf_to_gguf.py` / `convert_lora_to_gguf.py` (see llama_cpp.py).

The converter knows a fixed set of Hugging Face architectures (its `TEXT_MODEL_MAP`); checking a
checkpoint against that list before merging turns "NotImplementedError deep in a subprocess" into one line.
"""

from __future__ import annotations

import ast
import json
import logging
from pathlib import Path

from tunesmith.atomic import atomic_path, is_disk_full
from tunesmith.errors import DiskFull, ModelError, ToolingError
from tunesmith.export import llama_cpp


class UnsupportedArchitecture(ModelError):
    """The checkpoint's architecture is not one llama.cpp's converter can write as GGUF."""


def supported_architectures() -> list[str]:
    """The Hugging Face architecture names (`config.json` "architectures") the converter registers.

    Read from the converter's `conversion/__init__.py` source rather than imported: importing it pulls in
    torch and every model module, seconds spent before the export has even started.
    """
    source = (llama_cpp.ensure_converter() / "conversion" / "__init__.py").read_text(encoding="utf-8")
    for node in ast.parse(source).body:
        if isinstance(node, ast.AnnAssign) and getattr(node.target, "id", "") == "TEXT_MODEL_MAP":
            return sorted(ast.literal_eval(node.value))
    raise ToolingError("llama.cpp's converter has no TEXT_MODEL_MAP in conversion/__init__.py",
                       "the extracted converter does not match what tunesmith expects; reinstall it")


def architecture(checkpoint: Path) -> str:
    config = json.loads((checkpoint / "config.json").read_text(encoding="utf-8"))
    names = config.get("architectures") or []
    if not names:
        raise ModelError(f"{checkpoint}/config.json names no architecture", "it needs an \"architectures\" list")
    return names[0]


def check_architecture(checkpoint: Path) -> str:
    """The checkpoint's architecture, or UnsupportedArchitecture naming it and the supported ones."""
    arch = architecture(checkpoint)
    supported = supported_architectures()
    if arch not in supported:
        raise UnsupportedArchitecture(
            f"llama.cpp's GGUF converter ({llama_cpp.bindings_version()}) does not support the architecture "
            f"{arch} of {checkpoint}",
            f"supported: {', '.join(supported)}")
    return arch


def convert_checkpoint(checkpoint: Path, out: Path, outtype: str) -> Path:
    """Write `checkpoint` (a Hugging Face directory) as one GGUF file at `out`, in f16, bf16 or f32."""
    with atomic_path(out) as tmp:
        _run("convert_hf_to_gguf.py", [str(checkpoint), "--outfile", str(tmp), "--outtype", outtype], out)
    return out


def convert_lora(adapter: Path, base: Path, out: Path, outtype: str) -> Path:
    """Write a PEFT adapter as a GGUF LoRA (for the Modelfile's ADAPTER); `base` gives the hyperparameters."""
    with atomic_path(out) as tmp:
        _run("convert_lora_to_gguf.py",
             [str(adapter), "--base", str(base), "--outfile", str(tmp), "--outtype", outtype], out)
    return out


def _run(script: str, args: list[str], out: Path) -> None:
    done = llama_cpp.run(script, args)
    logging.getLogger(__name__).debug("%s %s\n%s", script, " ".join(args), done.stderr)
    if done.returncode != 0:
        lines = [line for line in (done.stderr or done.stdout).strip().splitlines() if line.strip()]
        if any(is_disk_full(Exception(line)) for line in lines[-5:]):
            raise DiskFull(out)
        raise ToolingError(f"llama.cpp's {script} failed writing {out.name}: {lines[-1] if lines else 'no output'}",
                           "run again with --debug for its full output")
