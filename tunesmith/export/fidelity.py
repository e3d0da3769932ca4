"""Fidelity check: does each GGUF answer like the merged Hugging Face model it was made from?

For held-out prompts, greedy answers of the merged model (transformers, float32) are compared with each
GGUF's (llama.cpp): exact-output agreement, first-token agreement, and the mean log-likelihood per token
of the reference answers under both (the gap says how much a quantization moved the model even where the
greedy answers still agree). Both sides get the same prompt token ids, so only the weights differ.
Small models suffer most: SmolLM2-135M answers garbage at q4_k_m, whose 576-wide rows fall back to q5_0.
"""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from tunesmith import inference
from tunesmith.config import Config


@dataclass
class Case:
    messages: list[dict[str, str]]
    reference: str


@dataclass
class Outputs:
    answers: list[list[int]]
    """Greedy answer token ids per case, up to (not including) the first stop token."""
    logliks: list[float]
    """Mean log-probability per token of each reference answer."""
    seconds: float


@dataclass
class QuantFidelity:
    quant: str
    path: str
    n: int
    exact: float
    first_token: float
    loglik_gap: float
    """Mean over cases of (merged − GGUF) mean log-likelihood per reference token, in nats; > 0: GGUF worse."""
    passed: bool
    seconds: float


def held_out_cases(run_dir: Path, config: Config, limit: int) -> list[Case]:
    """Up to `limit` prompts with reference answers: the run's held-out split, else its test file."""
    rows: list[list[dict[str, str]]] = []
    split = run_dir / "data" / "eval.jsonl"
    if split.is_file():
        for line in split.read_text(encoding="utf-8").splitlines():
            if line.strip():
                rows.append(json.loads(line)["messages"])
    if not rows and (config.data.test_file or config.eval.file):
        from tunesmith.data import load_examples

        rows = [list(example.messages) for example in load_examples(config.data.test_file or config.eval.file,
                                                                      config.data)]
    cases = [Case(messages[:-1], messages[-1]["content"]) for messages in rows
             if len(messages) > 1 and messages[-1]["role"] == "assistant"]
    return cases[:limit]


def encode_cases(tokenizer: Any, cases: list[Case], config: Config) -> tuple[list[list[int]], list[list[int]]]:
    """(prompt ids, reference answer ids) per case, the prompt exactly as training rendered it."""
    prompts = [inference.prompt_ids(tokenizer, case.messages, config) for case in cases]
    answers = [tokenizer(case.reference, add_special_tokens=False)["input_ids"] for case in cases]
    return prompts, answers


def merged_outputs(merged: Path, prompts: list[list[int]], answers: list[list[int]], stop: set[int],
                   max_new: int, pad_id: int, batch_size: int = 8) -> Outputs:
    """Greedy answers and reference log-likelihoods of the merged checkpoint (float32, CPU)."""
    import torch

    from tunesmith.models import load_model

    started = time.perf_counter()
    model = load_model(merged)
    model.eval()
    generated: list[list[int]] = [[] for _ in prompts]
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    with torch.no_grad():
        for start in range(0, len(order), batch_size):
            chunk = order[start:start + batch_size]
            width = max(len(prompts[i]) for i in chunk)
            ids = torch.full((len(chunk), width), pad_id, dtype=torch.long)
            mask = torch.zeros((len(chunk), width), dtype=torch.long)
            for row, i in enumerate(chunk):
                ids[row, width - len(prompts[i]):] = torch.tensor(prompts[i])
                mask[row, width - len(prompts[i]):] = 1
            out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new, do_sample=False,
                                 eos_token_id=sorted(stop), pad_token_id=pad_id)
            for row, i in enumerate(chunk):
                generated[i] = _until_stop(out[row, width:].tolist(), stop)
        logliks = []
        for prompt, answer in zip(prompts, answers):
            logits = model(torch.tensor([prompt + answer])).logits[0].float()
            logliks.append(_mean_loglik(logits.log_softmax(-1).numpy(), prompt, answer))
    return Outputs(generated, logliks, time.perf_counter() - started)


def gguf_outputs(gguf: Path, prompts: list[list[int]], answers: list[list[int]], stop: set[int],
                 max_new: int) -> Outputs:
    """Greedy answers and reference log-likelihoods of a GGUF through llama.cpp."""
    import numpy as np
    from llama_cpp import Llama

    started = time.perf_counter()
    longest = max((len(p) + max(max_new, len(a)) for p, a in zip(prompts, answers)), default=64)
    from tunesmith.export.quantize import native_output

    with native_output():  # llama.cpp prints context warnings straight to the terminal otherwise
        llm = Llama(model_path=str(gguf), n_ctx=max(512, longest + 8), n_batch=512, logits_all=True,
                    verbose=False, seed=0, n_threads=idle_cores(), n_threads_batch=idle_cores())
    generated = []
    for prompt in prompts:
        out: list[int] = []
        for token in llm.generate(prompt, temp=0.0, top_k=1, reset=True):
            if token in stop or len(out) >= max_new:
                break
            out.append(token)
        generated.append(out)
    logliks = []
    for prompt, answer in zip(prompts, answers):
        llm.reset()
        llm.eval(prompt + answer)
        logits = np.asarray(llm.scores[: len(prompt) + len(answer)], dtype=np.float64)
        shifted = logits - logits.max(axis=-1, keepdims=True)
        logprobs = shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))
        logliks.append(_mean_loglik(logprobs, prompt, answer))
    llm.close()
    return Outputs(generated, logliks, time.perf_counter() - started)


def compare(quant: str, path: Path, reference: Outputs, candidate: Outputs, min_agreement: float) -> QuantFidelity:
    n = len(reference.answers)
    exact = sum(a == b for a, b in zip(reference.answers, candidate.answers)) / n if n else 1.0
    first = sum(a[:1] == b[:1] for a, b in zip(reference.answers, candidate.answers)) / n if n else 1.0
    gaps = [r - c for r, c in zip(reference.logliks, candidate.logliks) if math.isfinite(r - c)]
    gap = sum(gaps) / len(gaps) if gaps else 0.0
    return QuantFidelity(quant, str(path), n, exact, first, gap, exact >= min_agreement, candidate.seconds)


def report(results: list[QuantFidelity], reference_seconds: float, n: int, min_agreement: float) -> dict[str, Any]:
    return {"prompts": n, "min_agreement": min_agreement, "merged_seconds": round(reference_seconds, 1),
            "quantizations": [asdict(result) for result in results]}


def print_table(results: list[QuantFidelity], console: Console, min_agreement: float) -> None:
    table = Table(title=f"fidelity vs the merged model (pass: exact agreement ≥ {min_agreement:.2f})")
    for column in ("quant", "n", "exact", "first token", "loglik gap", "seconds", "result"):
        table.add_column(column, justify="left" if column in ("quant", "result") else "right")
    for r in results:
        table.add_row(r.quant, str(r.n), f"{r.exact:.2f}", f"{r.first_token:.2f}", f"{r.loglik_gap:+.4f}",
                      f"{r.seconds:.0f}", "[green]pass[/]" if r.passed else "[bold red]FAIL[/]")
    console.print(table)


def idle_cores() -> int:
    """Threads for llama.cpp: the cores other processes leave free, at least one.

    llama.cpp's threads spin at a barrier after every operation; with more threads than idle cores each
    barrier waits for a descheduled thread. Measured on 2 cores with load ~5: 4 prompts × 8 tokens of the
    135M model took 104 s with 2 threads and 8 s with 1.
    """
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    others = max(0.0, os.getloadavg()[0] - 1.0)  # the export itself has kept one core busy until now
    return max(1, min(cores, cores - round(others)))


def _until_stop(ids: list[int], stop: set[int]) -> list[int]:
    for index, token in enumerate(ids):
        if token in stop:
            return ids[:index]
    return ids


def _mean_loglik(logprobs: Any, prompt: list[int], answer: list[int]) -> float:
    """Mean log p(answer token | everything before it); row t of `logprobs` predicts token t + 1."""
    if not answer:
        return 0.0
    start = len(prompt) - 1
    return float(sum(logprobs[start + j][token] for j, token in enumerate(answer)) / len(answer))
