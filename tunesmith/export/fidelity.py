"""Fidelity check: does each GGUF answer like the merged Hugging Face model it was made from?

For held-out prompts, greedy answers of the fine-tuned model (transformers) are compared with each GGUF's
(llama.cpp): exact-output agreement, first-token agreement, and the mean log-likelihood per token of the
reference answers under both (the gap says how much a quantization moved the model even where the greedy
answers still agree). Both sides get the same prompt token ids, so only the weights differ.

The answers are not generated twice: export's one greedy pass per GGUF over the evaluation's held-out prompts
serves as that GGUF's eval rows and as this check, and the fine-tuned model's answers come from the eval stage
when it has run (export/export.py). Small models suffer most: SmolLM2-135M answers garbage at q4_k_m, whose
576-wide rows fall back to q5_0.
"""

from __future__ import annotations

import math
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from tunesmith import inference
from tunesmith.config import Config
from tunesmith.evaluate.run import Case
from tunesmith.run import Run


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


def held_out_cases(run: Run, limit: int | None) -> list[Case]:
    """Prompts with reference answers for a run that has no test file: its held-out eval split."""
    import json

    rows: list[list[dict[str, str]]] = []
    split = run.eval_split_to_read()
    if split.is_file():
        for line in split.read_text(encoding="utf-8").splitlines():
            if line.strip():
                rows.append(json.loads(line)["messages"])
    cases = [Case(messages[:-1], messages[-1]["content"], str(split)) for messages in rows
             if len(messages) > 1 and messages[-1]["role"] == "assistant"]
    return cases[:limit]


def prompt_and_reference_ids(tokenizer: Any, cases: list[Case], config: Config) -> tuple[list[list[int]], list[list[int]]]:
    """(prompt ids, reference answer ids) per case, the prompt exactly as training rendered it."""
    prompts = [inference.prompt_ids(tokenizer, case.messages, config) for case in cases]
    answers = [tokenizer(case.reference, add_special_tokens=False)["input_ids"] for case in cases]
    return prompts, answers


def merged_logliks(merged: Path, prompts: list[list[int]], answers: list[list[int]]) -> list[float]:
    """Mean log-likelihood per token of each reference answer under the merged checkpoint (float32, CPU)."""
    import torch

    from tunesmith.models import load_model

    model = load_model(merged)
    model.eval()
    logliks = []
    with torch.no_grad():
        for prompt, answer in zip(prompts, answers):
            logits = model(torch.tensor([prompt + answer])).logits[0].float()
            logliks.append(_mean_loglik(logits.log_softmax(-1).numpy(), prompt, answer))
    return logliks


def gguf_logliks(gguf: Path, prompts: list[list[int]], answers: list[list[int]]) -> list[float]:
    """The same under a GGUF, through llama.cpp."""
    import numpy as np
    from llama_cpp import Llama

    from tunesmith.export.quantize import native_output

    longest = max((len(p) + len(a) for p, a in zip(prompts, answers)), default=64)
    with native_output():  # llama.cpp prints context warnings straight to the terminal otherwise
        llm = Llama(model_path=str(gguf), n_ctx=max(512, longest + 8), n_batch=512, logits_all=True,
                    verbose=False, seed=0, n_threads=idle_cores(), n_threads_batch=idle_cores())
    logliks = []
    try:
        for prompt, answer in zip(prompts, answers):
            llm.reset()
            llm.eval(prompt + answer)
            logits = np.asarray(llm.scores[: len(prompt) + len(answer)], dtype=np.float64)
            shifted = logits - logits.max(axis=-1, keepdims=True)
            logprobs = shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))
            logliks.append(_mean_loglik(logprobs, prompt, answer))
    finally:
        llm.close()
    return logliks


def compare(quant: str, path: Path, reference: list[str], candidate: list[str], first_tokens: tuple[list, list],
            logliks: tuple[list[float], list[float]], min_agreement: float, seconds: float) -> QuantFidelity:
    """`reference`/`candidate`: the merged model's and the GGUF's answers to the same prompts; `first_tokens`:
    their first token ids; `logliks`: the reference answers' mean log-likelihoods under each."""
    n = len(reference)
    exact = sum(a.strip() == b.strip() for a, b in zip(reference, candidate)) / n if n else 1.0
    first = sum(a == b for a, b in zip(*first_tokens)) / n if n else 1.0
    gaps = [r - c for r, c in zip(*logliks) if math.isfinite(r - c)]
    gap = sum(gaps) / len(gaps) if gaps else 0.0
    return QuantFidelity(quant, str(path), n, exact, first, gap, exact >= min_agreement, seconds)


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


def _mean_loglik(logprobs: Any, prompt: list[int], answer: list[int]) -> float:
    """Mean log p(answer token | everything before it); row t of `logprobs` predicts token t + 1."""
    if not answer:
        return 0.0
    start = len(prompt) - 1
    return float(sum(logprobs[start + j][token] for j, token in enumerate(answer)) / len(answer))
