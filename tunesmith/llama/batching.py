"""Continuous batching on one llama.cpp context: many sequences decode together, each with its own sampler.

A `Batcher` owns one llama.cpp context whose KV cache holds `parallel` sequences, each in its own stream of
`num_ctx` cells (load.new_context): a sequence's attention never reads another's cells, so its numbers do not
depend on who shares the batch. One thread runs the decode loop. Between steps, waiting sequences take free
slots and finished or abandoned ones leave; each step is one `llama_decode` over the next token of every
generating sequence, or a chunk of a prompt still being read; then each sequence samples from its own row of
logits with its own sampler chain (options, seed, grammar).

The server's engine (serve/engine.py) runs every request through one; evaluation and export answer their
held-out prompts through one too (inference/gguf.py), so a GGUF is scored exactly as it is served.

A slot keeps the tokens of its last sequence in the cache: a new sequence goes to the free slot that shares the
longest prompt prefix with it and evaluates only the rest, as llama-server's slots do.
"""

from __future__ import annotations

import codecs
import collections
import contextlib
import ctypes
import logging
import math
import random
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tunesmith.llama.load import EngineError, default_threads, load_model, new_context

log = logging.getLogger("tunesmith.serve")

N_BATCH = 512
"""Tokens per llama_decode call: a long prompt is read in chunks of this many, between other requests' tokens."""
# A free slot whose cached tokens cover at least this share of a new prompt is picked for it even when a
# lower-numbered slot is free (llama-server's --slot-prompt-similarity default).
PROMPT_SIMILARITY = 0.1
MAX_TOP_LOGPROBS = 20
EXPLORE_EVERY = 50
"""Every this many generation steps, the decode loop times the plan it did not choose (see Batcher._plan)."""


class BadRequest(EngineError):
    status_code = 400


@dataclass
class Piece:
    """Text generated since the last piece, and the log probabilities of the tokens that made it."""

    text: str
    logprobs: list[dict[str, Any]] = field(default_factory=list)


@dataclass
class Stats:
    """The counts and integer-nanosecond durations of Ollama's final chunk."""

    done_reason: str = "stop"
    load_duration: int = 0
    prompt_eval_count: int = 0
    prompt_eval_duration: int = 0
    eval_count: int = 0
    eval_duration: int = 0
    total_duration: int = 0
    """From the request's arrival (queueing included) to its end, set by the caller."""
    tokens: list[int] = field(default_factory=list)
    """Prompt and generated tokens: generate's `context`."""


def _stop_hold(text: str, stops: list[str]) -> int:
    """How many trailing characters of `text` could be the start of a stop string (and must wait)."""
    hold = 0
    for stop in stops:
        for k in range(min(len(stop) - 1, len(text)), hold, -1):
            if text.endswith(stop[:k]):
                hold = k
                break
    return hold


@dataclass
class Sequence:
    """One request inside the batcher. Everything but `cancel` is touched only by the decode thread."""

    prompt: list[int]
    opts: Any
    """The sampling settings, by Ollama's option names: the server's `Options`, or evaluation's greedy ones
    (inference/gguf.py). Read: temperature, repeat_last_n, repeat_penalty, presence_penalty, frequency_penalty,
    stop; above temperature 0 also top_k, typical_p, top_p, min_p and seed."""
    sampler: Any
    """A llama_sampler chain, freed when the sequence ends."""
    emit: Callable[[Any], None]
    """Receives Pieces, then one Stats (or one exception); called from the decode thread."""
    cancel: threading.Event
    top_logprobs: int | None
    """None: no log probabilities; otherwise how many alternatives to list for each token (0-20)."""
    limit: int
    n_ctx: int
    on_done: Callable[[], None] = lambda: None
    """Called from the decode thread once the sequence has left the batch for good."""
    stop_tokens: frozenset[int] = frozenset()
    """Token ids that end the sequence besides the model's end-of-generation tokens (evaluation's end-of-turn
    tokens, which a base model given a chat template may not count as such)."""
    pending: list[int] = field(default_factory=list)
    """Prompt tokens not yet in the cache."""
    next_token: int | None = None
    """The last sampled token, fed to the model at the next step."""
    generated: list[int] = field(default_factory=list)
    text: str = ""
    """Decoded text held back: it may be the start of a stop string."""
    held_logprobs: list[dict[str, Any]] = field(default_factory=list)
    decoder: Any = field(default_factory=lambda: codecs.getincrementaldecoder("utf-8")("replace"))
    submitted: int = field(default_factory=time.perf_counter_ns)
    admitted: int = 0
    first_at: int = 0


@dataclass
class Slot:
    seq_id: int
    cached: list[int] = field(default_factory=list)
    """The tokens whose keys and values are in this slot's cache stream, in order."""
    seq: Sequence | None = None


class Batcher:
    """One model and its batched context, with the thread that decodes for every request on it."""

    def __init__(self, model_path: str | Path, *, num_ctx: int, parallel: int, n_threads: int | None = None,
                 lora_path: str | Path | None = None, n_batch: int = N_BATCH):
        import llama_cpp

        self._L = llama_cpp
        self.parallel = parallel
        self.n_batch = n_batch
        self.n_threads = n_threads or default_threads()
        self.model = self.ctx = self.batch = self.lora = None
        self._pieces: dict[int, bytes] = {}
        self._eog: dict[int, bool] = {}
        try:
            self._load(str(model_path), num_ctx, lora_path)
        except BaseException:
            self._free()
            raise
        self.slots = [Slot(i) for i in range(parallel)]
        self.widest = 0
        """The most sequences one llama_decode has taken together (tests read it to see batching happen)."""
        self.reused = 0
        """Prompt tokens found in a slot's cache instead of evaluated again, over the batcher's life."""
        self._seconds: dict[int, float] = {}
        """Moving average of the wall seconds of a llama_decode of n one-token sequences, by n."""
        self._planned = 0
        self._held = 0
        """Prompt tokens read since the generating sequences last took a step (see _step)."""
        self._waiting: collections.deque[Sequence] = collections.deque()
        self._cond = threading.Condition()
        self._closing = False
        self._thread = threading.Thread(target=self._loop, name=f"tunesmith-decode-{Path(model_path).name}",
                                        daemon=True)
        self._thread.start()

    # ------------------------------------------------------------------ loading
    def _load(self, path: str, num_ctx: int, lora_path: str | Path | None) -> None:
        L = self._L
        self.model = load_model(path)
        self.vocab = L.llama_model_get_vocab(self.model)
        self.n_vocab = L.llama_vocab_n_tokens(self.vocab)
        self.add_bos = bool(L.llama_vocab_get_add_bos(self.vocab))
        self.ctx = new_context(self.model, n_ctx=num_ctx, n_batch=self.n_batch, n_seq_max=self.parallel,
                               n_threads=self.n_threads)
        if not self.ctx:
            raise EngineError(f"llama.cpp could not create a context for {path} (num_ctx {num_ctx} x {self.parallel})",
                              "lower num_ctx or serve.parallel")
        self.memory = L.llama_get_memory(self.ctx)
        self.n_ctx = min(num_ctx, L.llama_n_ctx_seq(self.ctx))
        if lora_path:
            self.lora = L.llama_adapter_lora_init(self.model, str(lora_path).encode())
            if not self.lora:
                raise EngineError(f"llama.cpp could not load the LoRA adapter {lora_path}",
                                  "check that it was converted for this model")
            adapters = (L.llama_adapter_lora_p_ctypes * 1)(self.lora)
            if L.llama_set_adapters_lora(self.ctx, adapters, 1, (ctypes.c_float * 1)(1.0)):
                raise EngineError(f"llama.cpp could not apply the LoRA adapter {lora_path}")
        self.batch = L.llama_batch_init(self.n_batch, 0, 1)

    def _free(self) -> None:
        L = self._L
        if self.batch is not None:
            L.llama_batch_free(self.batch)
            self.batch = None
        if self.ctx:
            L.llama_free(self.ctx)
            self.ctx = None
        if self.lora:
            L.llama_adapter_lora_free(self.lora)
            self.lora = None
        if self.model:
            L.llama_model_free(self.model)
            self.model = None

    @property
    def alive(self) -> bool:
        """False once the decode thread has ended (closed, or failed: then the model must be loaded again)."""
        return self._thread.is_alive()

    def close(self) -> None:
        """Stop the decode thread (requests still inside end as cancelled) and free the model."""
        with self._cond:
            self._closing = True
            self._cond.notify_all()
        self._thread.join()
        self._free()

    # ------------------------------------------------------------------ vocabulary (any thread: read-only)
    def tokenize(self, text: str) -> list[int]:
        data = text.encode("utf-8")
        size = len(data) + 8
        while True:
            buffer = (self._L.llama_token * size)()
            n = self._L.llama_tokenize(self.vocab, data, len(data), buffer, size, self.add_bos, True)
            if n >= 0:
                return list(buffer[:n])
            size = -n

    def piece(self, token: int, special: bool = False) -> bytes:
        """The token's bytes; the decode thread's calls are cached (a ctypes call gives up the GIL, and
        getting it back can wait on the event loop)."""
        if not special:
            cached = self._pieces.get(token)
            if cached is None:
                cached = self._pieces[token] = self._piece(token, False)
            return cached
        return self._piece(token, True)

    def _piece(self, token: int, special: bool) -> bytes:
        buffer = ctypes.create_string_buffer(64)
        n = self._L.llama_token_to_piece(self.vocab, token, buffer, 64, 0, special)
        if n < 0:
            buffer = ctypes.create_string_buffer(-n)
            n = self._L.llama_token_to_piece(self.vocab, token, buffer, -n, 0, special)
        return buffer.raw[:n]

    def detokenize(self, tokens: list[int], special: bool = True) -> str:
        return b"".join(self.piece(t, special) for t in tokens).decode("utf-8", errors="replace")

    def is_eog(self, token: int) -> bool:
        eog = self._eog.get(token)
        if eog is None:
            eog = self._eog[token] = bool(self._L.llama_vocab_is_eog(self.vocab, token))
        return eog

    def sampler(self, opts: Any, grammar: Any = None) -> Any:
        """A sampler chain for `opts`, in llama-cpp-python's order: penalties, grammar, then greedy at
        temperature 0, else top-k, typical, top-p, min-p, temperature and a draw seeded by `opts.seed`."""
        L = self._L
        chain = L.llama_sampler_chain_init(L.llama_sampler_chain_default_params())
        last_n = opts.repeat_last_n if opts.repeat_last_n >= 0 else self.n_ctx
        L.llama_sampler_chain_add(chain, L.llama_sampler_init_penalties(
            self.n_vocab, last_n, opts.repeat_penalty, opts.frequency_penalty, opts.presence_penalty))
        if grammar is not None:
            grammar_sampler = L.llama_sampler_init_grammar(self.vocab, grammar._grammar.encode(),
                                                           grammar._root.encode())
            if not grammar_sampler:
                L.llama_sampler_free(chain)
                raise BadRequest("invalid format: llama.cpp could not parse its grammar")
            L.llama_sampler_chain_add(chain, grammar_sampler)
        if opts.temperature == 0:
            L.llama_sampler_chain_add(chain, L.llama_sampler_init_greedy())
        else:
            seed = opts.seed if opts.seed >= 0 else random.randrange(2**31)
            if opts.temperature > 0:
                for sampler in (L.llama_sampler_init_top_k(opts.top_k), L.llama_sampler_init_typical(opts.typical_p, 1),
                                L.llama_sampler_init_top_p(opts.top_p, 1), L.llama_sampler_init_min_p(opts.min_p, 1),
                                L.llama_sampler_init_temp(opts.temperature)):
                    L.llama_sampler_chain_add(chain, sampler)
            L.llama_sampler_chain_add(chain, L.llama_sampler_init_dist(seed))
        return chain

    # ------------------------------------------------------------------ requests (event-loop side)
    def submit(self, seq: Sequence) -> None:
        """Queue `seq` for a slot; a refused one has its sampler freed."""
        with self._cond:
            if len(seq.prompt) >= seq.n_ctx:
                error: EngineError = BadRequest(
                    f"the prompt is {len(seq.prompt)} tokens, more than the context length (num_ctx {seq.n_ctx})",
                    "shorten the prompt or raise num_ctx")
            elif self._closing:
                error = EngineError("the model is being unloaded", "retry")
            else:
                self._waiting.append(seq)
                self._cond.notify_all()
                return
        self._L.llama_sampler_free(seq.sampler)
        seq.sampler = None
        raise error

    def wake(self) -> None:
        """Look at the requests again now (one was cancelled)."""
        with self._cond:
            self._cond.notify_all()

    # ------------------------------------------------------------------ the decode thread
    def _loop(self) -> None:
        try:
            while True:
                with self._cond:
                    if self._closing:
                        break
                    self._admit()
                    if not any(slot.seq for slot in self.slots):
                        # Cancelled waiters wake us; the timeout is only a safety net.
                        self._cond.wait(timeout=1.0)
                        continue
                self._step()
        except BaseException as exc:  # never leave a request waiting on a dead thread
            log.exception("decode loop failed")
            error = EngineError(f"llama.cpp decoding failed: {exc}")
        else:
            error = None
        with self._cond:
            self._closing = True
            left = [slot.seq for slot in self.slots if slot.seq] + list(self._waiting)
            self._waiting.clear()
        for seq in left:
            if error is not None:
                self._fail(seq, error)
            else:
                self._end(seq, "cancel")

    def _admit(self) -> None:
        """Give free slots to waiting requests, in arrival order; drop the ones whose client has gone."""
        for seq in [s for s in self._waiting if s.cancel.is_set()]:
            self._waiting.remove(seq)
            self._end(seq, "cancel")
        while self._waiting:
            free = [slot for slot in self.slots if slot.seq is None]
            if not free:
                return
            seq = self._waiting.popleft()
            slot = self._pick(free, seq.prompt)
            self._place(slot, seq)

    @staticmethod
    def _common(a: list[int], b: list[int]) -> int:
        n = 0
        for x, y in zip(a, b, strict=False):
            if x != y:
                break
            n += 1
        return n

    def _pick(self, free: list[Slot], prompt: list[int]) -> Slot:
        best = max(free, key=lambda slot: self._common(slot.cached, prompt))
        if self._common(best.cached, prompt) >= PROMPT_SIMILARITY * len(prompt) > 0:
            return best
        # Otherwise the lowest-numbered: llama.cpp decodes consecutive sequence ids in one pass.
        return free[0]

    def _place(self, slot: Slot, seq: Sequence) -> None:
        keep = self._common(slot.cached, seq.prompt)
        keep = min(keep, len(seq.prompt) - 1)  # the last prompt token is always evaluated: its logits start us
        if not self._L.llama_memory_seq_rm(self.memory, slot.seq_id, keep, -1):
            keep = 0  # this cache cannot drop a tail; start the sequence afresh
            self._L.llama_memory_seq_rm(self.memory, slot.seq_id, -1, -1)
        slot.cached = slot.cached[:keep]
        seq.pending = seq.prompt[keep:]
        self.reused += keep
        seq.admitted = time.perf_counter_ns()
        slot.seq = seq

    def _step(self) -> None:
        """One llama_decode step: a waiting prompt (or a chunk of it) on its own, or every generating sequence's
        next token (in one call, or one call per sequence when the decode loop has measured that to be
        cheaper: `_plan`).

        Prompts first, one at a time in arrival order: on CPU a step costs about the sum of its parts (q8_0
        SmolLM2-135M, 2 threads: 7 generating sequences 33 ms, a 20-token prompt ~40 ms, both in one call 81 ms;
        bench/RESULTS.md, issue 19), so every generating token added to a step that reads a prompt delays that
        prompt's first token, and reading a burst of prompts in one call (llama-server's way) gives each its
        first token only when the last is read. Read alone and in turn, the k-th prompt of a burst answers
        after k prompts' work, never later than all of them together. Generating sequences wait meanwhile, but
        never for more than `n_batch` prompt tokens (the same bound as one llama-server batch): then they take
        a step of their own.
        """
        for slot in self.slots:
            if slot.seq is not None and slot.seq.cancel.is_set():
                self._release(slot, "cancel")
        generating = [(slot, [slot.seq.next_token], True) for slot in self.slots
                      if slot.seq is not None and slot.seq.next_token is not None]
        reading = min((slot for slot in self.slots if slot.seq is not None and slot.seq.next_token is None
                       and slot.seq.pending), key=lambda slot: slot.seq.submitted, default=None)
        if reading is not None and (not generating or self._held < self.n_batch):
            chunk = reading.seq.pending[:self.n_batch]
            if generating:
                self._held += len(chunk)
            self._decode([(reading, chunk, len(chunk) == len(reading.seq.pending))])
            return
        self._held = 0
        for group in self._plan(generating):
            self._decode(group)

    def _plan(self, entries: list[tuple[Slot, list[int], bool]]) -> list[list[tuple[Slot, list[int], bool]]]:
        """How to split a step into llama_decode calls.

        On CPU, llama.cpp multiplies one token through a matrix-vector kernel and two or more through tiled
        matrix-matrix kernels, whose cost does not grow with the tokens as one would guess: on 1 thread, q8_0
        SmolLM2-135M took 7.5 ms of CPU a call for 1 token and about 32 ms for anything from 2 to 8
        (bench/RESULTS.md). So a few generating sequences are faster one call each, many faster together. The
        loop keeps the measured time of both kinds of call and takes the cheaper, trying the other one now and
        then as the machine's load changes. Steps that read a prompt stay one call.
        """
        width = len(entries)
        if width < 2 or any(len(tokens) != 1 for _, tokens, _ in entries):
            return [entries] if entries else []
        together, alone = self._seconds.get(width), self._seconds.get(1)
        self._planned += 1
        if together is None or alone is None:
            apart = together is not None  # time the kind of call not yet timed
        else:
            apart = width * alone < together
            # Try the other kind now and then, in case the machine's load has changed which is cheaper; rarely
            # where it was far dearer (8 sequences one call each cost 1.7x one call for all), since each try
            # costs the difference.
            close = max(width * alone, together) < 1.3 * min(width * alone, together)
            if self._planned % (EXPLORE_EVERY if close else 8 * EXPLORE_EVERY) == 0:
                apart = not apart
        return [[entry] for entry in entries] if apart else [entries]

    def _decode(self, entries: list[tuple[Slot, list[int], bool]]) -> None:
        """One llama_decode over `entries`, then sampling from the logits it produced."""
        L = self._L
        batch = self.batch
        n = 0
        outputs: list[tuple[Slot, int]] = []
        for slot, tokens, wants_logits in entries:
            base = len(slot.cached)
            for j, token in enumerate(tokens):
                batch.token[n] = token
                batch.pos[n] = base + j
                batch.n_seq_id[n] = 1
                batch.seq_id[n][0] = slot.seq_id
                batch.logits[n] = wants_logits and j == len(tokens) - 1
                n += 1
            if wants_logits:
                outputs.append((slot, n - 1))
        batch.n_tokens = n
        started = time.perf_counter()
        rc = L.llama_decode(self.ctx, batch)
        if rc != 0:
            error = EngineError(f"llama.cpp could not decode the batch (llama_decode returned {rc})",
                                "retry; if it persists, lower serve.parallel or num_ctx")
            for slot, _, _ in entries:
                L.llama_memory_seq_rm(self.memory, slot.seq_id, -1, -1)
                slot.cached = []
                seq = slot.seq
                slot.seq = None
                if seq is not None:
                    self._fail(seq, error)
            return
        if n == len(entries):  # one token each: a generation call, timed for _plan
            elapsed = time.perf_counter() - started
            previous = self._seconds.get(n)
            self._seconds[n] = elapsed if previous is None else 0.8 * previous + 0.2 * elapsed
        self.widest = max(self.widest, len(entries))
        for slot, tokens, _ in entries:
            slot.cached.extend(tokens)
            seq = slot.seq
            if seq.next_token is not None:
                seq.next_token = None
            else:
                seq.pending = seq.pending[len(tokens):]
        for slot, index in outputs:
            seq = slot.seq
            token = L.llama_sampler_sample(seq.sampler, self.ctx, index)
            logprob = self._logprob(index, token, seq.top_logprobs) if seq.top_logprobs is not None else None
            reason = self._accept(slot, seq, token, logprob)
            if reason is not None:
                self._release(slot, reason)

    def _accept(self, slot: Slot, seq: Sequence, token: int, logprob: dict[str, Any] | None) -> str | None:
        """Take a sampled token: emit what text is certain, and say why the sequence ends (None: it goes on)."""
        if not seq.first_at:
            seq.first_at = time.perf_counter_ns()
        if seq.cancel.is_set():
            return "cancel"
        if self.is_eog(token) or token in seq.stop_tokens:
            return "stop"
        seq.generated.append(token)
        if logprob is not None:
            seq.held_logprobs.append(logprob)
        # The incremental decoder holds back the bytes of a character split across tokens.
        seq.text += seq.decoder.decode(self.piece(token))
        stops = seq.opts.stop
        if stops:
            hits = [i for s in stops if (i := seq.text.find(s)) >= 0]
            if hits:
                seq.text = seq.text[:min(hits)]
                return "stop"
            hold = _stop_hold(seq.text, stops)
        else:
            hold = 0
        if len(seq.text) > hold:
            seq.emit(Piece(seq.text[:len(seq.text) - hold], seq.held_logprobs))
            seq.text = seq.text[len(seq.text) - hold:]
            seq.held_logprobs = []
        if len(seq.generated) >= seq.limit or len(seq.prompt) + len(seq.generated) >= seq.n_ctx:
            return "length"
        seq.next_token = token
        return None

    def _release(self, slot: Slot, reason: str) -> None:
        seq = slot.seq
        slot.seq = None
        if seq is not None:
            self._end(seq, reason)

    def _end(self, seq: Sequence, reason: str) -> None:
        """Finish a sequence: the held text (incomplete UTF-8 at the end is dropped, as Ollama does), then Stats."""
        try:
            if reason != "cancel" and (seq.text or seq.held_logprobs):
                seq.emit(Piece(seq.text, seq.held_logprobs))
            ended = time.perf_counter_ns()
            first = seq.first_at or ended
            seq.emit(Stats(done_reason=reason, prompt_eval_count=len(seq.prompt),
                           prompt_eval_duration=first - (seq.admitted or seq.submitted), eval_count=len(seq.generated),
                           eval_duration=ended - first, tokens=[*seq.prompt, *seq.generated]))
        finally:
            self._done(seq)

    def _fail(self, seq: Sequence, error: BaseException) -> None:
        try:
            seq.emit(error)
        finally:
            self._done(seq)

    def _done(self, seq: Sequence) -> None:
        if seq.sampler is not None:
            self._L.llama_sampler_free(seq.sampler)
            seq.sampler = None
        with contextlib.suppress(Exception):
            seq.on_done()

    def _logprob(self, index: int, token: int, top: int) -> dict[str, Any]:
        """The token's log probability under the model's own distribution (the raw logits, before penalties,
        grammar or temperature, as llama-server reports it), with the `top` most likely alternatives."""
        import numpy as np

        logits = np.ctypeslib.as_array(self._L.llama_get_logits_ith(self.ctx, index), shape=(self.n_vocab,))
        values = logits.astype(np.float64)
        peak = values.max()
        log_total = peak + math.log(float(np.exp(values - peak).sum()))
        entry = self._token_entry(token, values[token] - log_total)
        if top:
            best = np.argpartition(values, -top)[-top:]
            best = best[np.argsort(-values[best], kind="stable")]
            entry["top_logprobs"] = [self._token_entry(int(t), values[t] - log_total) for t in best]
        return entry

    def _token_entry(self, token: int, logprob: float) -> dict[str, Any]:
        raw = self.piece(token, special=True)
        return {"token": raw.decode("utf-8", errors="replace"), "logprob": float(logprob), "bytes": list(raw)}
