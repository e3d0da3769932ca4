"""Held-out examples that repeat training examples: answering one right can be recall, not what was learned.

A held-out example *repeats* training when
- its input is a training input, after normalising whitespace (a **duplicate**, whatever the answers: where they
  differ the data contradicts itself), or
- its input is at least `eval.near_duplicate_similarity` similar to the input of a training example with the same
  answer (a **near duplicate**). Similarity is rapidfuzz's `fuzz.ratio` (0-100: the normalised Indel similarity
  of the two texts, whitespace normalised). The same answer is asked for because inputs made from one template
  are all similar as text, and a similar input whose answer differs cannot be answered by recall: on
  examples/orders 46 of 100 test inputs are at least 95% similar to a training input, none with its answer.

The input is what the user wrote: every turn before the answer except the system prompt, which all examples
share. `tunesmith data inspect` counts them; `tunesmith eval` scores them apart from the rest.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass

from rapidfuzz import fuzz, process

DUPLICATE = "duplicate"
NEAR = "near duplicate"


@dataclass(frozen=True)
class Repeat:
    kind: str
    """DUPLICATE or NEAR."""
    similarity: float
    """fuzz.ratio of the two inputs, 0-100."""
    training_input: str
    training_source: str


def normalize(text: str) -> str:
    return " ".join(text.split())


def input_text(messages: list[dict[str, str]]) -> str:
    """The user's part of a conversation that stops before its answer: every turn but the system's."""
    return "\n".join(message["content"] for message in messages if message["role"] != "system")


def split_example(messages: list[dict[str, str]]) -> tuple[str, str] | None:
    """(input, answer) of a whole conversation, the answer its last turn; None when that is not the assistant's."""
    if len(messages) < 2 or messages[-1]["role"] != "assistant":
        return None
    return input_text(messages[:-1]), messages[-1]["content"]


def find_repeats(training: list[tuple[str, str, str]], held_out: list[tuple[str, str]],
                 similarity: float) -> list[Repeat | None]:
    """For each held-out (input, answer): the training example it repeats, or None.

    `training`: (input, answer, where it is) of each training example. Only training inputs with the held-out
    answer are compared for near duplicates, which keeps it fast (a test set of 300 against 7,799 training
    examples in well under a second on goDrive).
    """
    by_input: dict[str, tuple[str, str]] = {}
    by_answer: dict[str, list[tuple[str, str]]] = defaultdict(list)
    for text, answer, source in training:
        key = normalize(text)
        by_input.setdefault(key, (text, source))
        by_answer[normalize(answer)].append((key, source))
    found: list[Repeat | None] = []
    for text, answer in held_out:
        key = normalize(text)
        if key in by_input:
            found.append(Repeat(DUPLICATE, 100.0, *by_input[key]))
            continue
        candidates = by_answer.get(normalize(answer), [])
        best = process.extractOne(key, [c for c, _ in candidates], scorer=fuzz.ratio, score_cutoff=similarity)
        if best is None:
            found.append(None)
        else:
            _, score, index = best
            found.append(Repeat(NEAR, round(score, 1), *candidates[index]))
    return found


def summary(repeats: list[Repeat | None], similarity: float) -> str:
    """One line: how many held-out examples repeat training, and by which rule."""
    duplicates = sum(r is not None and r.kind == DUPLICATE for r in repeats)
    near = sum(r is not None and r.kind == NEAR for r in repeats)
    return (f"{duplicates + near} of {len(repeats)} held-out examples repeat a training example: {duplicates} "
            f"duplicate inputs (whitespace normalised), {near} near duplicates (input fuzz.ratio >= "
            f"{similarity:g} and the same answer)")
