"""Opening a GGUF with llama.cpp, the one way every tunesmith caller does it: the server, evaluation, export and
its fidelity check.

What they share: the threads (`default_threads`, `idle_cores`), llama.cpp's CPU extra buffer types left off (they
crash some VMs), and the context settings of the batched decoder (`new_context`). `open_llama` and `open_vocab`
give llama-cpp-python's `Llama` for embeddings and tokenizing; `load_model` and `new_context` give the raw
llama.cpp handles that the batched decoder (batching.py) and the log-likelihood pass (logliks.py) drive.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from tunesmith.errors import TunesmithError

# llama.cpp's CPU "extra buffer types" (AMX and weight repacking) crash with a general protection fault
# inside some VMs whose CPUs report AMX (measured here: Firecracker, Sapphire Rapids). Off unless asked for.
EXTRA_BUFTS_ENV = "TUNESMITH_LLAMA_EXTRA_BUFTS"


class EngineError(TunesmithError):
    """llama.cpp cannot do what was asked (load a file, decode a batch); the server answers it with
    `status_code`."""

    status_code = 500


def default_threads() -> int:
    """Half the cores, for generation and prompt evaluation alike (llama-cpp-python gives prompt evaluation
    all cores): on 2 busy cores, 2 threads measured 2-3 tokens/s against 30-45 with 1, and a 16-token prompt
    took 5 s instead of 0.2 s, because llama.cpp's threads spin-wait."""
    return max(1, (os.cpu_count() or 2) // 2)


def idle_cores() -> int:
    """The cores other processes leave free, at least one, measured over half a second (tunesmith/cpu.py): the
    threads for llama.cpp work that runs alone (export's answers and log-likelihoods, evaluation).

    llama.cpp's threads spin at a barrier after every operation; with more threads than idle cores each
    barrier waits for a descheduled thread. Measured on 2 cores with load ~5: 4 prompts x 8 tokens of the
    135M model took 104 s with 2 threads and 8 s with 1. (The 1-minute load average this used to read still
    counted the training that had just ended: export then ran on one core of two idle ones.)
    """
    from tunesmith.cpu import free_cores

    return free_cores()


def model_params() -> Any:
    """llama.cpp's default model parameters, the extra buffer types off unless EXTRA_BUFTS_ENV is 1."""
    import llama_cpp

    return _with_bufts(llama_cpp.llama_model_default_params())


def load_model(path: str | Path) -> Any:
    """A `llama_model` pointer for a GGUF file (free it with `llama_model_free`)."""
    import llama_cpp
    from llama_cpp._logger import set_verbose

    set_verbose(False)
    model = llama_cpp.llama_model_load_from_file(str(path).encode(), model_params())
    if not model:
        raise EngineError(f"llama.cpp could not load {path}", "check that the file is a GGUF model llama.cpp supports")
    return model


def new_context(model: Any, *, n_ctx: int, n_batch: int, n_seq_max: int = 1, n_threads: int | None = None) -> Any:
    """A `llama_context` (free it with `llama_free`) whose cache holds `n_seq_max` sequences of `n_ctx` tokens
    each, every sequence in a stream of its own (llama.cpp's non-unified cache, as `llama-server -np N` uses):
    a sequence's attention never reads another's cells, so its numbers do not depend on who shares the batch.
    Flash attention, as llama-server's default (auto) chooses on CPU: it skips the masked cells, so a sequence's
    attention sums run over its own tokens in order, whatever else shares the batch. None when llama.cpp
    cannot make it."""
    import llama_cpp as L

    threads = n_threads or default_threads()
    cparams = L.llama_context_default_params()
    cparams.n_ctx = n_ctx * n_seq_max
    cparams.n_batch = cparams.n_ubatch = n_batch
    cparams.n_seq_max = n_seq_max
    cparams.kv_unified = False
    cparams.n_threads = cparams.n_threads_batch = threads
    cparams.flash_attn_type = L.LLAMA_FLASH_ATTN_TYPE_ENABLED
    return L.llama_init_from_model(model, cparams) or None


_construct_lock = threading.Lock()


def open_llama(path: str | Path, *, n_ctx: int, n_threads: int | None = None, n_batch: int = 512,
               lora_path: str | Path | None = None, embedding: bool = False, flash_attn: bool = False) -> Any:
    """A `llama_cpp.Llama` for a GGUF file (the server's embeddings, benchmarks), with tunesmith's threads
    (n_threads None: `default_threads`) and model parameters."""
    threads = n_threads or default_threads()
    import llama_cpp
    import llama_cpp.llama as llama_module

    kwargs: dict[str, Any] = {}
    if embedding:
        # Decoder models have no pooling of their own; mean pooling gives one vector per input.
        kwargs["pooling_type"] = llama_cpp.LLAMA_POOLING_TYPE_MEAN
    default_params = llama_module.llama_cpp.llama_model_default_params
    # Llama() builds its model params from this module function; swap it only while constructing.
    with _construct_lock:
        llama_module.llama_cpp.llama_model_default_params = lambda: _with_bufts(default_params())
        try:
            return llama_cpp.Llama(
                model_path=str(path), n_ctx=n_ctx, n_batch=min(n_batch, n_ctx), n_threads=threads,
                n_threads_batch=threads,
                lora_path=str(lora_path) if lora_path else None, embedding=embedding, flash_attn=flash_attn,
                verbose=False, **kwargs)
        except ValueError as exc:
            raise EngineError(f"llama.cpp could not load {path}: {exc}",
                              "check that the file is a GGUF model llama.cpp supports") from exc
        finally:
            llama_module.llama_cpp.llama_model_default_params = default_params


def _with_bufts(params: Any) -> Any:
    params.use_extra_bufts = os.environ.get(EXTRA_BUFTS_ENV) == "1"
    return params


def open_vocab(path: str | Path) -> Any:
    """A vocabulary-only `llama_cpp.Llama` (no weights read): tokenize as llama.cpp does for this GGUF. Close it."""
    from llama_cpp import Llama

    with native_output():
        return Llama(model_path=str(path), vocab_only=True, verbose=False)


@contextlib.contextmanager
def native_output() -> Iterator[Path]:
    """Send what llama.cpp's C code prints (a line per tensor) to a file instead of the terminal.

    It writes to file descriptors 1 and 2 directly, past Python's sys.stdout; the file is logged at
    debug level (`--debug`) and its last line goes into error messages.
    """
    sys.stdout.flush()
    sys.stderr.flush()
    saved = [os.dup(1), os.dup(2)]
    with tempfile.NamedTemporaryFile("w+b", prefix="tunesmith-llama-", suffix=".log") as handle:
        os.dup2(handle.fileno(), 1)
        os.dup2(handle.fileno(), 2)
        try:
            yield Path(handle.name)
        finally:
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            for fd in saved:
                os.close(fd)
            logging.getLogger(__name__).debug(Path(handle.name).read_text(errors="replace"))
