"""Read a GGUF file's header: its key/value metadata and parameter count, without loading tensors.

gguf-py's GGUFReader parses every tensor and token (about 2 s for a 100 MB model); the store and
`/api/show` only need the header, so this reads it directly and skips long arrays.
"""

from __future__ import annotations

import struct
from pathlib import Path
from typing import Any, BinaryIO

from tunesmith.errors import TunesmithError

GGUF_MAGIC = b"GGUF"

# GGUF value types (gguf-py's GGUFValueType).
_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
_STRING, _ARRAY = 8, 9

# llama.cpp's `llama_ftype` values, by the names Ollama shows as `quantization_level`.
FILE_TYPES = {
    0: "F32", 1: "F16", 2: "Q4_0", 3: "Q4_1", 7: "Q8_0", 8: "Q5_0", 9: "Q5_1", 10: "Q2_K", 11: "Q3_K_S",
    12: "Q3_K_M", 13: "Q3_K_L", 14: "Q4_K_S", 15: "Q4_K_M", 16: "Q5_K_S", 17: "Q5_K_M", 18: "Q6_K",
    19: "IQ2_XXS", 20: "IQ2_XS", 21: "Q2_K_S", 22: "IQ3_XS", 23: "IQ3_XXS", 24: "IQ1_S", 25: "IQ4_NL",
    26: "IQ3_S", 27: "IQ3_M", 28: "IQ2_S", 29: "IQ2_M", 30: "IQ4_XS", 31: "IQ1_M", 32: "BF16",
    36: "TQ1_0", 37: "TQ2_0",
}

# Arrays longer than this (token lists, merges) are summarized, as Ollama's show does without --verbose.
MAX_ARRAY = 64


class GGUFError(TunesmithError):
    """A file that should be GGUF is not, or is truncated."""


def is_gguf(path: str | Path) -> bool:
    with open(path, "rb") as f:
        return f.read(4) == GGUF_MAGIC


def _read(f: BinaryIO, fmt: str) -> Any:
    size = struct.calcsize(fmt)
    data = f.read(size)
    if len(data) != size:
        raise GGUFError(f"{getattr(f, 'name', 'file')}: truncated GGUF header")
    return struct.unpack(fmt, data)[0]


def _read_str(f: BinaryIO) -> str:
    n = _read(f, "<Q")
    return f.read(n).decode("utf-8", errors="replace")


def _read_value(f: BinaryIO, vtype: int) -> Any:
    if vtype in _SCALARS:
        return _read(f, _SCALARS[vtype])
    if vtype == _STRING:
        return _read_str(f)
    if vtype == _ARRAY:
        item_type = _read(f, "<I")
        count = _read(f, "<Q")
        if count > MAX_ARRAY:
            if item_type in _SCALARS:
                f.seek(count * struct.calcsize(_SCALARS[item_type]), 1)
            else:
                for _ in range(count):
                    _read_value(f, item_type)
            return None
        return [_read_value(f, item_type) for _ in range(count)]
    raise GGUFError(f"unknown GGUF value type {vtype}")


def read_metadata(path: str | Path) -> tuple[dict[str, Any], int]:
    """The key/value map (long arrays as None) and the total parameter count."""
    with open(path, "rb") as f:
        if f.read(4) != GGUF_MAGIC:
            raise GGUFError(f"{path}: not a GGUF file", "export the model to GGUF first")
        version = _read(f, "<I")
        if version < 2:
            raise GGUFError(f"{path}: GGUF version {version} is too old")
        tensor_count = _read(f, "<Q")
        kv_count = _read(f, "<Q")
        meta: dict[str, Any] = {}
        for _ in range(kv_count):
            key = _read_str(f)
            meta[key] = _read_value(f, _read(f, "<I"))
        params = 0
        for _ in range(tensor_count):
            _read_str(f)
            n_dims = _read(f, "<I")
            count = 1
            for _ in range(n_dims):
                count *= _read(f, "<Q")
            f.seek(4 + 8, 1)  # tensor type, data offset
            params += count
    return meta, params


def parameter_size(params: int) -> str:
    """Ollama's `parameter_size` wording: 134.52M, 7.2B."""
    for unit, scale in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if params >= scale:
            return f"{params / scale:.2f}".rstrip("0").rstrip(".") + unit
    return str(params)


def details(path: str | Path) -> dict[str, Any]:
    """The `details` object of /api/tags and /api/show for a GGUF model."""
    meta, params = read_metadata(path)
    family = meta.get("general.architecture", "")
    return {
        "parent_model": "",
        "format": "gguf",
        "family": family,
        "families": [family] if family else None,
        "parameter_size": parameter_size(params),
        "quantization_level": FILE_TYPES.get(meta.get("general.file_type", -1), "unknown"),
    }
