"""Ollama's `options` (and Modelfile PARAMETERs) turned into llama.cpp sampling settings, and `keep_alive`."""

from __future__ import annotations

import logging
import math
import os
import re
from dataclasses import dataclass, field
from typing import Any

from tunesmith.errors import TunesmithError, clip
from tunesmith.serve.modelfile import BOOL_OPTIONS, DEPRECATED_OPTIONS, FLOAT_OPTIONS, INT_OPTIONS

log = logging.getLogger("tunesmith.serve")


# Ollama's runner options that place a model on GPUs or choose how its file is read. Ollama accepts them in
# `create` and in requests; here llama.cpp runs on the CPU with the file memory-mapped, so they are accepted,
# kept in the model, and ignored (and the log says so).
CPU_IGNORED = frozenset({"num_gpu", "main_gpu", "use_mmap", "numa"})
CPU_IGNORED_REASON = "tunesmith runs llama.cpp on the CPU, reading the model file memory-mapped"


class OptionError(TunesmithError):
    """An option has the wrong type, or keep_alive does not parse."""


@dataclass
class Options:
    """Ollama's defaults (api.DefaultOptions), except num_ctx which comes from serve.num_ctx."""

    num_ctx: int = 2048
    num_predict: int = -1
    num_keep: int = 4
    num_thread: int = 0
    num_batch: int = 512
    seed: int = -1
    temperature: float = 0.8
    top_k: int = 40
    top_p: float = 0.9
    min_p: float = 0.0
    typical_p: float = 1.0
    repeat_last_n: int = 64
    repeat_penalty: float = 1.1
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    stop: list[str] = field(default_factory=list)


INT32 = (-2**31, 2**31 - 1)
"""llama.cpp takes these options as 32-bit integers; the seed alone is 64-bit here (llama.cpp keeps its low 32 bits)."""
INT64 = (-2**63, 2**63 - 1)


def _typed(name: str, value: Any) -> Any:
    if name in INT_OPTIONS:
        # JSON numbers may arrive as 4096.0 from Python clients; Go accepts whole floats for ints.
        if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value) \
                or value != int(value):
            raise OptionError(f'option "{name}" must be of type integer')
        low, high = INT64 if name == "seed" else INT32
        if not low <= value <= high:
            raise OptionError(f'option "{name}" must be an integer from {low} to {high}')
        return int(value)
    if name in FLOAT_OPTIONS:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise OptionError(f'option "{name}" must be of type float')
        if not math.isfinite(value) or abs(value) > FLOAT32_MAX:
            raise OptionError(f'option "{name}" must be a finite 32-bit float')
        return float(value)
    if name in BOOL_OPTIONS:
        if not isinstance(value, bool):
            raise OptionError(f'option "{name}" must be of type boolean')
        return value
    if name == "stop":
        if isinstance(value, str):
            return [value]
        if not isinstance(value, list) or not all(isinstance(s, str) for s in value):
            raise OptionError('option "stop" must be of type array of strings')
        return list(value)
    return value


FLOAT32_MAX = 3.4028234663852886e38


def resolve(num_ctx: int, *layers: dict[str, Any] | None) -> Options:
    """Defaults, then each layer in order (the model's PARAMETERs, then the request's options).

    Unknown keys are ignored, as Ollama does, and logged in one line however many there are; wrong types and
    values out of llama.cpp's range are errors.
    """
    opts = Options(num_ctx=num_ctx)
    known = set(Options.__dataclass_fields__)
    unknown: list[str] = []
    for layer in layers:
        if layer is not None and not isinstance(layer, dict):
            raise OptionError("options must be an object")
        for name, value in (layer or {}).items():
            if name in CPU_IGNORED:
                if value is not None:
                    _typed(name, value)
                log.debug("option %s ignored: %s", name, CPU_IGNORED_REASON)
                continue
            if name not in known:
                if name not in DEPRECATED_OPTIONS:
                    unknown.append(name)
                continue
            if value is None:
                continue
            setattr(opts, name, _typed(name, value))
    if unknown:
        log.info("invalid option%s provided: %s", "s" if len(unknown) > 1 else "", summary(unknown))
    if opts.num_ctx < 1:
        raise OptionError('option "num_ctx" must be positive')
    if opts.num_thread < 0:
        raise OptionError('option "num_thread" must be 0 (as many as suit this machine) or more')
    return opts


SUMMARY_NAMES = 10


def summary(names: list[str]) -> str:
    """Names for one log line: the first few, each cut short, and how many there were in all."""
    shown = ", ".join(clip(name, 40) for name in names[:SUMMARY_NAMES])
    return shown if len(names) <= SUMMARY_NAMES else f"{shown} and {len(names) - SUMMARY_NAMES:,} more"


def fit(opts: Options, context_length: int | None) -> Options:
    """`opts` bounded by the model and the machine, as Ollama bounds them: num_ctx at most the context the
    model was trained for (larger asks llama.cpp for a cache it cannot use, and one large enough to fail to
    allocate), repeat_last_n at most num_ctx (llama.cpp allocates a window that long), num_thread at most the
    cores (more threads only spin on the same cores)."""
    if context_length and opts.num_ctx > context_length:
        log.warning("requested context size too large for model: num_ctx %d, n_ctx_train %d", opts.num_ctx,
                    context_length)
        opts.num_ctx = context_length
    opts.repeat_last_n = min(opts.repeat_last_n, opts.num_ctx)
    cores = os.cpu_count() or 1
    if opts.num_thread > cores:
        log.info("num_thread %d is more than this machine's %d cores; using %d", opts.num_thread, cores, cores)
        opts.num_thread = cores
    return opts


_DURATION_RE = re.compile(r"(\d+(?:\.\d*)?|\.\d+)(ns|us|µs|ms|s|m|h)")
_UNITS = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}
FOREVER = float("inf")
MAX_DURATION = (2**63 - 1) / 1e9
"""Go's longest time.Duration (about 292 years), in seconds: Ollama's "forever" (math.MaxInt64)."""


def keep_alive_seconds(value: Any, default: Any = "5m") -> float:
    """`keep_alive` as seconds: a number is seconds, a string a Go duration; negative means forever, and so
    does anything from Go's longest duration on (`1e300`, `"99999999h"`), as Ollama stores a negative or
    overflowing keep_alive as math.MaxInt64: no later date computed from it can overflow."""
    if value is None:
        value = default
    if isinstance(value, bool):
        raise OptionError(f"invalid keep_alive {clip(repr(value))}")
    if isinstance(value, int | float):
        seconds = float(value) if abs(value) < MAX_DURATION else FOREVER
    elif isinstance(value, str):
        text = value.strip()
        sign = -1.0 if text.startswith("-") else 1.0
        text = text.lstrip("+-")
        if text == "0":
            return 0.0
        parts = _DURATION_RE.findall(text)
        if not parts or "".join(n + u for n, u in parts) != text:
            raise OptionError(f'time: invalid duration "{clip(value)}"',
                              'use a number of seconds or a duration like "5m"')
        seconds = sign * sum(float(n) * _UNITS[u] for n, u in parts)
    else:
        raise OptionError(f"invalid keep_alive {clip(repr(value))}")
    return FOREVER if seconds < 0 or seconds >= MAX_DURATION else seconds
