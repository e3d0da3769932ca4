"""Accuracy during training: greedy answers to a fixed sample of the eval set, scored as `tunesmith eval` scores.

A falling loss says the model moves toward the references; whether its answers are right is another matter (on
goDrive the loss flattens long before exact match does). At every eval step the loop asks this probe, and logs
`eval_exact_match` and friends beside `eval_loss`; `train.stop_when` can end the run on them. Where the answers are
JSON objects, each field's accuracy (`eval_field:NAME`), and for a few short labels each label's precision and
recall (`eval_precision:LABEL`, `eval_recall:LABEL`): which part the model has not learned yet.
"""

from __future__ import annotations

import operator
import time
from typing import Any

from tunesmith.config import Config, parse_stop_rule
from tunesmith.scorers import label_set, load_scorer, mean_scores, score_answers

_COMPARE = {">=": operator.ge, ">": operator.gt, "<=": operator.le, "<": operator.lt}


class AccuracyProbe:
    def __init__(self, config: Config, tokenizer: Any, examples: list[Any]):
        """`examples`: the eval split (validated `Example`s, the last turn the reference answer); the first
        `train.eval_accuracy` of them, always the same, are answered at every eval step."""
        self.config, self.tokenizer = config, tokenizer
        chosen = [e for e in examples if e.messages and e.messages[-1]["role"] == "assistant"]
        chosen = chosen[:config.train.eval_accuracy]
        self.conversations = [list(e.messages[:-1]) for e in chosen]
        self.references = [e.messages[-1]["content"] for e in chosen]
        self.task = load_scorer(config.eval.scorer) if config.eval.scorer else None
        self.labels = label_set(self.references)
        # Early in training, when the model does not stop yet, generating to eval.max_new_tokens took most of an
        # eval pass (32 answers x 128 tokens: 47 s on CPU): at most the longest reference and a margin.
        from tunesmith.inference.hf import answer_limit

        self.max_new = answer_limit(tokenizer, self.references, config.eval.max_new_tokens)

    def __len__(self) -> int:
        return len(self.conversations)

    def __call__(self, model: Any, autocast: Any, part: int = 1) -> dict[str, float]:
        """Headline scores (`eval_exact_match`, `eval_edit_similarity`, a task scorer's `eval_rule_f1`...) of
        `model`'s greedy answers and the detail that says what is not learned yet: per field (JSON answers), per
        label (classification), per rule (a task scorer's `recall:<rule>`, `precision:<rule>`: goDrive's), each
        over the answers it applies to; and `eval_accuracy_seconds`. The model is put back in training mode.
        `part` > 1: the first that fraction of the examples only (the budget's timing pass)."""
        import torch

        from tunesmith.inference.hf import generate_batch

        started = time.perf_counter()
        model.eval()
        try:
            with torch.no_grad(), autocast:
                conversations = self.conversations[:max(1, len(self.conversations) // part)]
                answers = generate_batch(model, self.tokenizer, conversations, self.config, self.max_new)
        finally:
            model.train()
        per_case = score_answers(answers, self.references[:len(answers)], self.config.eval.expect, self.task,
                                 self.labels, [conversation[-1]["content"] for conversation in conversations])
        means = mean_scores(per_case)
        scores = {f"eval_{key}": round(value, 4) for key, value in means.items() if value is not None}
        scores["eval_accuracy_seconds"] = round(time.perf_counter() - started, 1)
        return scores


def stop_reached(rule: str | None, record: dict[str, Any]) -> str | None:
    """The reason to stop when an eval record meets `train.stop_when` (`exact_match>=0.95` reads
    `eval_exact_match`), else None."""
    if not rule:
        return None
    name, op, bound = parse_stop_rule(rule)
    key = name if name.startswith("eval_") else f"eval_{name}"
    value = record.get(key)
    if value is None or not _COMPARE[op](value, bound):
        return None
    return f"train.stop_when {rule}: {key} {value:g} at step {record['step']}"
