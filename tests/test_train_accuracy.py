"""Accuracy during training: greedy answers to the eval set scored at every eval step, and `train.stop_when`."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from tests.conftest import run_cli


def _config(tmp: Path, model: Path, **train) -> Path:
    """A task a 64-wide random model learns in a few dozen steps: every answer is `yes`."""
    train_file, eval_file = tmp / "train.jsonl", tmp / "eval.jsonl"
    for path, count in ((train_file, 64), (eval_file, 6)):
        path.write_text("".join(json.dumps({"input": f"is {i} a number?", "output": "yes"}) + "\n"
                                for i in range(count)), encoding="utf-8")
    config = {
        "name": "probe", "runs_dir": str(tmp / "runs"), "model": {"base": str(model)},
        "data": {"train_file": str(train_file), "eval_file": str(eval_file)},
        "eval": {"file": str(eval_file), "max_new_tokens": 4},
        "train": {"max_steps": 80, "batch_size": 8, "learning_rate": 2e-3, "eval_steps": 5, "save_steps": 5,
                  "log_steps": 5, "eval_accuracy": 4, "bf16": False, **train},
    }
    path = tmp / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def _records(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_eval_steps_log_answer_accuracy_and_stop_when_ends_the_run(tmp_path, tiny_qwen3):
    config = _config(tmp_path, tiny_qwen3, stop_when="exact_match>=1.0")
    done = run_cli("train", "--config", str(config))
    assert done.returncode == 0, done.stderr
    run = tmp_path / "runs" / "probe"
    evals = [r for r in _records(run) if "eval_loss" in r]
    assert [r["step"] for r in evals] == list(range(5, 5 * len(evals) + 1, 5))
    assert all({"eval_exact_match", "eval_edit_similarity"} <= r.keys() for r in evals)
    assert evals[0]["eval_exact_match"] < 1.0  # it starts wrong: the random model says nothing like "yes"
    assert evals[-1]["eval_exact_match"] == 1.0  # ... and the run stopped at the first eval that was right
    stopped = evals[-1]["step"]
    assert stopped < 80 and all(r["eval_exact_match"] < 1.0 for r in evals[:-1])
    record = json.loads((run / "run.json").read_text())
    assert record["final"]["steps"] == stopped
    assert record["final"]["stopped_early"] == f"train.stop_when exact_match>=1.0: eval_exact_match 1 at step {stopped}"
    assert "stopping early: train.stop_when exact_match>=1.0" in done.stdout
    # The probe's figure is the one `tunesmith eval` gives for the saved adapter on the same examples.
    scored = run_cli("eval", "--run", str(run), "--models", "finetuned", "--limit", "4")
    assert scored.returncode == 0, scored.stderr
    rows = [json.loads(line) for line in (run / "eval.jsonl").read_text().splitlines()]
    assert [row["answer"] for row in rows] == ["yes"] * 4
    # A resumed run does not train past the step where it stopped.
    resumed = run_cli("train", "--config", str(config), "--resume")
    assert resumed.returncode == 0, resumed.stderr
    assert json.loads((run / "run.json").read_text())["final"]["steps"] == stopped


def test_stop_when_must_name_a_bound(tmp_path, tiny_qwen3):
    done = run_cli("train", "--config", str(_config(tmp_path, tiny_qwen3, stop_when="exact_match=1")))
    assert done.returncode == 2
    assert "train.stop_when: Value error, expected SCORE>=NUMBER" in done.stderr
    assert "Traceback" not in done.stderr


def test_eval_records_carry_the_task_scorers_per_rule_recall_and_precision(tmp_path, tiny_qwen3):
    """goDrive's scorer at every eval step: each rule's recall and precision over the validation answers it
    applies to, in metrics.jsonl beside the headline scores (what report.html and the web UI plot per rule)."""
    godrive = Path(__file__).resolve().parent.parent / "examples" / "godrive"
    config = yaml.safe_load(_config(tmp_path, tiny_qwen3, max_steps=2, eval_steps=2, eval_accuracy=8).read_text())
    config["data"] = {"train_file": str(godrive / "train.jsonl"), "eval_file": str(godrive / "valid.jsonl")}
    config["eval"] = {"scorer": "examples.godrive.generate:score", "max_new_tokens": 8}
    path = tmp_path / "godrive.yaml"
    path.write_text(yaml.safe_dump(config))
    done = run_cli("train", "--config", str(path))
    assert done.returncode == 0, done.stderr
    evals = [record for record in _records(tmp_path / "runs" / "probe") if "eval_loss" in record]
    assert evals and evals[-1]["step"] == 2
    last = evals[-1]
    # the first 8 validation states' references give these rules (the random model's answers give none)
    from examples.godrive.generate import WORDING_TO_RULE, split_instructions

    references = [json.loads(line)["output"] for line in (godrive / "valid.jsonl").read_text().splitlines()[:8]]
    wanted = {WORDING_TO_RULE[piece] for reference in references for piece in split_instructions(reference)}
    assert {key.removeprefix("eval_recall:") for key in last if key.startswith("eval_recall:")} == wanted
    assert all(0.0 <= last[f"eval_recall:{rule}"] <= 1.0 for rule in wanted)
    assert "eval_rule_recall" in last and "eval_exact_match" in last
    # the prompt reaches the scorer: exact match apart where 4+ rules fire and where 1-3 do
    from examples.godrive.generate import fired_rules

    inputs = [json.loads(line)["input"] for line in (godrive / "valid.jsonl").read_text().splitlines()[:8]]
    counts = [len(fired_rules(line)) for line in inputs]
    assert any(count >= 4 for count in counts) and any(1 <= count <= 3 for count in counts)
    assert {"eval_exact_match:4+ rules", "eval_exact_match:1-3 rules"} <= last.keys()
