"""Quantize a GGUF with llama.cpp's quantizer through the llama-cpp-python bindings (no binary, no network)."""

from __future__ import annotations

import ctypes
import os
import shutil
from pathlib import Path

from tunesmith.atomic import atomic_path, is_disk_full
from tunesmith.config import QUANTIZATIONS
from tunesmith.errors import ConfigError, DiskFull, ToolingError
from tunesmith.llama.load import native_output  # what llama.cpp's quantizer prints goes to a file

# Bits per weight of each type as llama.cpp reports them for 7B-class models (`llama-quantize --help`);
# used to tell, before starting, whether the outputs fit on the disk.
BITS_PER_WEIGHT = {
    "f32": 32.0, "f16": 16.0, "bf16": 16.0, "q8_0": 8.5, "q6_k": 6.56, "q5_k_m": 5.7, "q5_k_s": 5.54,
    "q5_0": 5.5, "q5_1": 6.0, "q4_k_m": 4.89, "q4_k_s": 4.58, "q4_0": 4.5, "q4_1": 5.0, "q3_k_l": 4.27,
    "q3_k_m": 3.91, "q3_k_s": 3.5, "q2_k": 3.35,
}


class UnknownQuantization(ConfigError):
    """A quantization name llama.cpp's quantizer does not know."""


def check_names(names: list[str]) -> list[str]:
    """The names lower-cased and de-duplicated in order, or UnknownQuantization listing the valid ones."""
    wanted = list(dict.fromkeys(name.strip().lower() for name in names if name.strip()))
    unknown = [name for name in wanted if name not in QUANTIZATIONS]
    if unknown:
        raise UnknownQuantization(f"unknown quantization {', '.join(unknown)}; valid: {', '.join(QUANTIZATIONS)}")
    if not wanted:
        raise UnknownQuantization(f"no quantization given; valid: {', '.join(QUANTIZATIONS)}")
    return wanted


def ftype(name: str) -> int:
    import llama_cpp

    constant = "LLAMA_FTYPE_ALL_F32" if name == "f32" else f"LLAMA_FTYPE_MOSTLY_{name.upper()}"
    return int(getattr(llama_cpp, constant))


def quantize(source: Path, out: Path, name: str, threads: int | None = None) -> Path:
    """Write `source` (an f16/bf16/f32 GGUF) quantized to `name` at `out`."""
    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = ftype(name)
    params.nthread = threads or os.cpu_count() or 1
    with atomic_path(out) as tmp, native_output() as log:
        status = llama_cpp.llama_model_quantize(str(source).encode(), str(tmp).encode(), ctypes.byref(params))
        if status != 0:
            text = log.read_text(errors="replace")
            if is_disk_full(Exception(text)) or shutil.disk_usage(out.parent).free < source.stat().st_size // 100:
                raise DiskFull(out)  # llama.cpp's writer says only "failed to write" when the disk is full
            last = (text.strip().splitlines() or ["no output"])[-1]
            raise ToolingError(f"llama.cpp's quantizer failed making {out.name} from {source.name}: {last}")
    return out
