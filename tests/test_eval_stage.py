"""The eval stage's sample of the base model, and the detail scores training's accuracy probe logs, on a tiny
model."""

from __future__ import annotations

import contextlib
import io
import json

from rich.console import Console

from tests.test_export_support import QUESTIONS, make_run


def test_the_base_model_answers_only_eval_base_examples(tiny_qwen3, tmp_path):
    from tunesmith.evaluate.compare import evaluate
    from tunesmith.run import Run

    test = tmp_path / "test.jsonl"
    test.write_text("".join(json.dumps({"input": q, "output": a}) + "\n" for q, a in QUESTIONS[:5]), encoding="utf-8")
    run = Run(make_run(tmp_path, tiny_qwen3, "sample", eval={"file": str(test), "max_new_tokens": 3,
                                                            "base_examples": 2}))
    results = evaluate(run.recorded_config(), run, None, ["base", "finetuned"], Console(file=io.StringIO()))
    assert [(r.model, r.n) for r in results] == [("base", 2), ("finetuned", 5)]
    rows = run.eval_rows()
    assert [row["index"] for row in rows if row["model"] == "base"] == [0, 1]  # the first ones: a fixed sample


def _examples(answers: list[str]):
    from tunesmith.data import Example, Source

    return [Example([{"role": "user", "content": f"message {i}"}, {"role": "assistant", "content": answer}],
                    Source("valid.jsonl", i, i + 1)) for i, answer in enumerate(answers)]


def test_the_accuracy_probe_logs_per_field_and_per_label_scores(tiny_qwen3):
    """The loop's interface is unchanged (`AccuracyProbe(config, tokenizer, examples)(model, autocast)`); its
    record gains each JSON field's accuracy, or each label's precision and recall, not a task's per-rule detail."""
    from tunesmith.config import Config
    from tunesmith.models import load_model, load_tokenizer
    from tunesmith.train.accuracy import AccuracyProbe

    config = Config.model_validate({"model": {"base": str(tiny_qwen3)}, "eval": {"max_new_tokens": 3},
                                    "train": {"eval_accuracy": 6}})
    model, tokenizer = load_model(tiny_qwen3), load_tokenizer(tiny_qwen3)
    orders = [json.dumps({"product": p, "quantity": n}) for p, n in [("mug", 2), ("cap", 1), ("scarf", 3)]]
    record = AccuracyProbe(config, tokenizer, _examples(orders))(model, contextlib.nullcontext())
    assert {"eval_exact_match", "eval_field:product", "eval_field:quantity"} <= record.keys()
    assert record["eval_field:product"] == 0.0  # a random model writes no JSON
    assert model.training  # put back in training mode
    labels = ["yes", "no", "yes", "no", "yes", "maybe"]
    record = AccuracyProbe(config, tokenizer, _examples(labels))(model, contextlib.nullcontext())
    assert {"eval_recall:yes", "eval_recall:no", "eval_recall:maybe"} <= record.keys()
    assert not any(key.startswith("eval_field:") for key in record)
