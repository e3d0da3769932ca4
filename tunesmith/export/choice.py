"""Which GGUF the Modelfile serves: the smallest that keeps the merged model's accuracy.

The served model should be the model that was scored. On a 2,000-example extraction task (SmolLM2-135M) the
merged model answered 97.5% of 200 held-out messages exactly, q8_0 97% and q4_k_m 93%: the older rule (the first
quantization asked for that agreed with the merged model on 80% of prompts) served q4_k_m. Now export scores
the GGUFs on the held-out set, smallest first, and takes the smallest file whose exact match is within
`export.modelfile_tolerance` (1 point) of the merged model's and that passes the fidelity check; when none is, the
most accurate. Larger files than the first that keeps the accuracy are not scored on the whole set: they could not
be chosen. `export.modelfile_quant` names one outright: it is used, with a warning when it loses more.
"""

from __future__ import annotations

from dataclasses import dataclass

EPSILON = 1e-9
"""Exact-match fractions are ratios of counts; a tolerance of 0.01 must admit a loss of exactly 1 point."""


@dataclass(frozen=True)
class Candidate:
    quant: str
    size: int
    """Bytes on disk."""
    exact_match: float | None
    """On the held-out set; None when export had no held-out answers to score."""
    passed: bool = True
    """The fidelity check's verdict."""


@dataclass(frozen=True)
class Choice:
    quant: str
    reason: str
    warning: str | None = None


def choose(candidates: list[Candidate], merged: float | None, tolerance: float,
           named: str | None = None) -> Choice:
    """The Modelfile's quantization among `candidates` (in the order export made them), given the merged
    model's exact match `merged`, the loss allowed (`tolerance`, a fraction) and a quantization the config names
    (`named`, which must be one of the candidates)."""
    by_quant = {candidate.quant: candidate for candidate in candidates}
    # A candidate without an exact match answered only the fidelity prompts, because a smaller one already keeps
    # the accuracy (export._fidelity); it is never chosen over that one.
    scored = [c for c in candidates if c.exact_match is not None] if merged is not None else []
    if named is not None:
        chosen = by_quant[named]
        loss = merged - chosen.exact_match if chosen in scored else None
        warning = None
        if loss is not None and loss > tolerance + EPSILON:
            warning = (f"export.modelfile_quant {named} answers {percent(chosen.exact_match)} of the held-out set "
                       f"exactly, {points(loss)} below the merged model's {percent(merged)}")
        elif not chosen.passed:
            warning = f"export.modelfile_quant {named} failed the fidelity check"
        return Choice(named, "export.modelfile_quant", warning)
    if not scored:
        return Choice(candidates[0].quant, "the first quantization asked for (no held-out answers to score)")
    close = [c for c in scored if c.passed and merged - c.exact_match <= tolerance + EPSILON]
    if close:
        smallest = min(close, key=lambda c: (c.size, -c.exact_match))
        return Choice(smallest.quant, f"the smallest within {points(tolerance)} of the merged model's exact "
                                      f"match {percent(merged)}")
    best = max(scored, key=lambda c: (c.exact_match, c.passed, -c.size))
    return Choice(best.quant, f"the most accurate: none passing is within {points(tolerance)} of the merged "
                              f"model's exact match {percent(merged)}")


def percent(fraction: float) -> str:
    """0.975 -> '97.5%'."""
    return f"{100 * fraction:.1f}%"


def points(fraction: float) -> str:
    """A difference of exact match in percentage points: 0.045 -> '4.5 points', 0.01 -> '1 point'."""
    value = f"{100 * fraction:.1f}".removesuffix(".0")
    return f"{value} point" + ("" if value == "1" else "s")
