"""Fidelity check: does each GGUF answer like the merged Hugging Face model it was made from, and as accurately?

Each GGUF answers greedily through the server's batched decoder (inference/gguf.py). Against the
merged model's greedy answers on the first `export.fidelity_prompts`: exact-output agreement, first-token
agreement, and on the first `LOGLIK_PROMPTS` the mean log-likelihood per token of the reference answers under
both (the gap says how much a quantization moved the model even where the greedy answers still agree). Both
sides get the same prompt token ids, so only the weights differ. Against the references on the whole held-out
set, for the GGUFs the Modelfile's choice needs (export._fidelity): exact match, and its loss against the merged
model's. A GGUF fails when its agreement is under `export.min_agreement` or its exact match is more than
`export.max_exact_match_loss` below the merged model's (2 points by default).

The answers are not generated twice: the merged model's come from the eval stage when it has answered the same
prompts, and each GGUF's are kept in fidelity.json, where `tunesmith eval` takes them (evaluate/compare.py). Small
models suffer most: SmolLM2-135M answers garbage at q4_k_m, whose 576-wide rows fall back to q5_0.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from tunesmith.config import Config, ExportConfig
from tunesmith.export.choice import Choice, percent, points
from tunesmith.inference import hf
from tunesmith.inference.cases import Case
from tunesmith.run import MODELFILE  # the column that marks the Modelfile's GGUF

LOGLIK_PROMPTS = 8
"""Fidelity prompts whose reference answers are also scored by log-likelihood under the merged model and each GGUF
(the gap column). No verdict reads the gap, and reading a prompt with its answer costs about what answering it
does (Gemma 3 270M on 2 cores: ~0.45 s a prompt in llama.cpp, ~0.55 s in Hugging Face; 32 prompts were ~60 s of
address's export for three models); 8 address answers are ~480 scored tokens."""


@dataclass
class QuantFidelity:
    quant: str
    path: str
    n: int
    exact: float
    """Share of the first n held-out prompts answered exactly as the merged model answers them."""
    first_token: float
    loglik_gap: float
    """Mean over the first LOGLIK_PROMPTS cases of (merged − GGUF) mean log-likelihood per reference token, in
    nats; > 0: GGUF worse."""
    passed: bool
    seconds: float
    exact_match: float | None = None
    """Share of the held-out set answered exactly as the reference; None when it answered only the first n (a
    smaller GGUF already keeps the merged model's accuracy: export._fidelity)."""
    exact_match_loss: float | None = None
    """The merged model's exact match minus this one's (> 0: the GGUF answers fewer right)."""
    size: int = 0
    """Bytes on disk."""


def prompt_and_reference_ids(tokenizer: Any, cases: list[Case], config: Config) -> tuple[list[list[int]], list[list[int]]]:
    """(prompt ids, reference answer ids) per case, the prompt exactly as training rendered it."""
    prompts = [hf.prompt_ids(tokenizer, case.messages, config) for case in cases]
    answers = [tokenizer(case.reference, add_special_tokens=False)["input_ids"] for case in cases]
    return prompts, answers


def compare(quant: str, path: Path, reference: list[str], candidate: list[str], first_tokens: tuple[list, list],
            logliks: tuple[list[float], list[float]], seconds: float) -> QuantFidelity:
    """`reference`/`candidate`: the merged model's and the GGUF's answers to the same prompts; `first_tokens`:
    their first token ids; `logliks`: the reference answers' mean log-likelihoods under each. The verdict comes
    with `judge`."""
    n = len(reference)
    exact = sum(a.strip() == b.strip() for a, b in zip(reference, candidate)) / n if n else 1.0
    first = sum(a == b for a, b in zip(*first_tokens)) / n if n else 1.0
    gaps = [r - c for r, c in zip(*logliks) if math.isfinite(r - c)]
    gap = sum(gaps) / len(gaps) if gaps else 0.0
    return QuantFidelity(quant, str(path), n, exact, first, gap, True, seconds, size=Path(path).stat().st_size)


def judge(result: QuantFidelity, exact_match: float, merged_exact_match: float, settings: ExportConfig) -> None:
    """Record the GGUF's exact match on the held-out set and pass or fail it (`passed`)."""
    result.exact_match = exact_match
    result.exact_match_loss = merged_exact_match - exact_match
    result.passed = (result.exact >= settings.min_agreement
                     and result.exact_match_loss <= settings.max_exact_match_loss + 1e-9)


def judge_agreement(result: QuantFidelity, settings: ExportConfig) -> None:
    """Pass or fail a GGUF that answered only the fidelity prompts (a smaller one already keeps the accuracy, so
    the Modelfile's choice does not need its exact match): by its agreement with the merged model alone."""
    result.passed = result.exact >= settings.min_agreement


def report(results: list[QuantFidelity], reference_seconds: float, n: int, min_agreement: float, *,
           max_exact_match_loss: float | None = None, merged_exact_match: float | None = None,
           examples: int | None = None, choice: Choice | None = None, answers: dict[str, list[str]] | None = None,
           digest: str | None = None) -> dict[str, Any]:
    """fidelity.json: the verdicts, the Modelfile's choice and why, and each GGUF's answers to the held-out
    cases (`digest`: inference.cases.cases_digest), which `tunesmith eval` reuses."""
    return {"prompts": n, "loglik_prompts": min(n, LOGLIK_PROMPTS), "examples": examples,
            "min_agreement": min_agreement,
            "max_exact_match_loss": max_exact_match_loss, "merged_exact_match": merged_exact_match,
            "merged_seconds": round(reference_seconds, 1),
            "modelfile": None if choice is None else {"quant": choice.quant, "reason": choice.reason,
                                                      "warning": choice.warning},
            "quantizations": [asdict(result) | {"answers": (answers or {}).get(result.quant, [])}
                              for result in results],
            "cases": digest}


def print_table(results: list[QuantFidelity], console: Console, settings: ExportConfig, merged_exact_match: float,
                examples: int, choice: Choice) -> None:
    table = Table(title=f"fidelity vs the merged model (its exact match: {percent(merged_exact_match)} of {examples} "
                        f"held-out examples); pass: agreement ≥ {settings.min_agreement:.2f} and exact match at most "
                        f"{points(settings.max_exact_match_loss)} lower")
    for column in ("quant", "MiB", "exact match", "vs merged", "agreement", "first token", "loglik gap", "seconds",
                   "result", MODELFILE):
        table.add_column(column, justify="left" if column in ("quant", "result", MODELFILE) else "right")
    for r in results:
        scored = r.exact_match is not None  # else: answered the fidelity prompts only (export._fidelity)
        table.add_row(r.quant, f"{r.size / 2**20:.0f}", percent(r.exact_match) if scored else "not needed",
                      f"{0.0 - 100 * r.exact_match_loss:+.1f}" if scored else "",
                      f"{r.exact:.2f}", f"{r.first_token:.2f}", f"{r.loglik_gap:+.4f}", f"{r.seconds:.0f}",
                      "[green]pass[/]" if r.passed else "[bold red]FAIL[/]", "←" if r.quant == choice.quant else "")
    console.print(table)
    console.print(f"export: the Modelfile serves {choice.quant}: {choice.reason}", highlight=False)
    if choice.warning:
        console.print(f"[bold yellow]export: warning: {choice.warning}[/]", highlight=False)
