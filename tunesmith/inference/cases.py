"""The prompts a model answers outside training, with the answers expected: held-out examples as `Case`s.

Evaluation scores them, export answers them with every GGUF (the fidelity check and the Modelfile's choice), and
the pipeline's serve stage sends the first few to the server.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tunesmith.config import Config
from tunesmith.data.prepare import read_split
from tunesmith.run import Run


@dataclass
class Case:
    messages: list[dict[str, str]]
    """The conversation up to the answer (system turn first when there is one)."""
    reference: str
    """The answer expected."""
    source: str

    @property
    def prompt(self) -> str:
        """The last user turn: how eval.jsonl and the report name the case."""
        return self.messages[-1]["content"]


def load_cases(path: str | Path, config: Config, limit: int | None) -> list[Case]:
    """The examples of a held-out file whose last turn is the assistant's (the reference), the first `limit`."""
    from tunesmith.data import load_examples

    cases = []
    for example in load_examples(path, config.data):
        messages = list(example.messages)
        if not messages or messages[-1]["role"] != "assistant":
            continue
        cases.append(Case(messages[:-1], messages[-1]["content"], str(getattr(example, "source", ""))))
        if limit and len(cases) >= limit:
            break
    return cases


def held_out_cases(run: Run, limit: int | None) -> list[Case]:
    """Prompts with reference answers for a run that has no test file: its held-out split (data/validation.jsonl),
    the first `limit`."""
    split = run.eval_split_to_read()
    rows = [example.messages for example in read_split(split)] if split.is_file() else []
    cases = [Case(messages[:-1], messages[-1]["content"], str(split)) for messages in rows
             if len(messages) > 1 and messages[-1]["role"] == "assistant"]
    return cases[:limit]


def cases_digest(cases: list[Case]) -> str:
    """A fingerprint of the cases (conversations and references, in order): answers recorded for one list of
    cases are reused only for the same list."""
    text = json.dumps([[case.messages, case.reference] for case in cases], ensure_ascii=False, sort_keys=True)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def recorded_answers(rows: list[dict[str, Any]], model: str, cases: list[Case]) -> list[str] | None:
    """`model`'s answers to exactly these cases from eval.jsonl's rows (Run.eval_rows), or None when it has not
    answered them all."""
    by_index = {row["index"]: row for row in rows if row["model"] == model}
    answers = []
    for index, case in enumerate(cases):
        row = by_index.get(index)
        if row is None or row["prompt"] != case.prompt or row["reference"] != case.reference:
            return None
        answers.append(row["answer"])
    return answers
