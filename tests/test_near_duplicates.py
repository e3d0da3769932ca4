"""Held-out examples that repeat training examples, on hand-made train/test pairs: found, counted by `tunesmith data
inspect` and `tunesmith eval`, and scored apart from the rest."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest
import yaml
from rich.console import Console

from tests.conftest import run_cli
from tunesmith.data.near_duplicates import DUPLICATE, NEAR, find_repeats, summary

TRAIN = [
    ("Ship six green t-shirts to Bergen by regular post.", '{"product": "t-shirt", "city": "Bergen"}'),
    ("Please send 4 white backpacks to Ghent, express.", '{"product": "backpack", "city": "Ghent"}'),
    ("I would like two red mugs delivered to Lyon.", '{"product": "mug", "city": "Lyon"}'),
    ("Ten blue scarves for Oslo please, standard shipping.", '{"product": "scarf", "city": "Oslo"}'),
]
# (input, expected answer, what it is)
TEST = [
    ("Ship six green  t-shirts to Bergen\nby regular post.", TRAIN[0][1], DUPLICATE),  # whitespace only
    ("Please send 4 white backpacks to Ghent, express!", TRAIN[1][1], NEAR),  # one character, same answer
    ("Please send 4 white backpacks to Genk, express.", '{"product": "backpack", "city": "Genk"}', None),  # same
    # template, another city: similar text, but a right answer cannot be recalled
    ("Could you post a yellow umbrella to Rome?", TRAIN[2][1], None),  # the same answer, another message
    ("I would like two red mugs delivered to Lyon.", '{"product": "mug", "city": "Paris"}', DUPLICATE),  # the
    # training input with another answer: the data contradicts itself
    ("Twelve black caps to Madrid, express.", '{"product": "cap", "city": "Madrid"}', None),
]


def test_duplicates_and_near_duplicates_are_found():
    training = [(text, answer, f"train.jsonl, line {i + 1}") for i, (text, answer) in enumerate(TRAIN)]
    found = find_repeats(training, [(text, answer) for text, answer, _ in TEST], similarity=95)
    assert [None if r is None else r.kind for r in found] == [kind for _, _, kind in TEST]
    assert found[0].training_source == "train.jsonl, line 1" and found[0].similarity == 100.0
    assert found[1].training_source == "train.jsonl, line 2" and 95 <= found[1].similarity < 100
    assert found[4].training_source == "train.jsonl, line 3"
    assert summary(found, 95) == ("3 of 6 held-out examples repeat a training example: 2 duplicate inputs (whitespace "
                                  "normalised), 1 near duplicates (input fuzz.ratio >= 95 and the same answer)")
    # A lower threshold admits less similar inputs, still only with the same answer.
    loose = find_repeats(training, [(text, answer) for text, answer, _ in TEST], similarity=30)
    assert loose[3] is not None and loose[3].kind == NEAR and loose[2] is None and loose[5] is None


def _write(path: Path, pairs: list[tuple[str, str]]) -> Path:
    path.write_text("".join(json.dumps({"input": text, "output": answer}, ensure_ascii=False) + "\n"
                            for text, answer in pairs), encoding="utf-8")
    return path


def _config(tmp: Path) -> Path:
    config = {"name": "near", "runs_dir": str(tmp / "runs"),
              "data": {"train_file": str(_write(tmp / "train.jsonl", TRAIN)),
                       "test_file": str(_write(tmp / "test.jsonl", [(t, a) for t, a, _ in TEST])),
                       "system_prompt": "Extract the order as JSON."},
              "eval": {"expect": "json"}}
    path = tmp / "config.yaml"
    path.write_text(yaml.safe_dump(config, allow_unicode=True), encoding="utf-8")
    return path


@pytest.mark.parametrize("inspected", ["train.jsonl", "test.jsonl"])
def test_data_inspect_counts_them(tmp_path, builtin_checkpoint, inspected):
    config = _config(tmp_path)
    done = run_cli("data", "inspect", str(tmp_path / inspected), "--config", str(config))
    assert done.returncode == 0, done.stderr
    out = " ".join(done.stdout.split())
    assert "3 of 6 held-out examples repeat a training example: 2 duplicate inputs" in out
    assert "held-out examples that repeat a training example (tunesmith eval scores them apart): 3" in out
    assert f"{tmp_path / 'test.jsonl'}, line 2 (record 1): near duplicate of {tmp_path / 'train.jsonl'}, line 2" in out
    assert f"{tmp_path / 'test.jsonl'}, line 5 (record 4): duplicate of {tmp_path / 'train.jsonl'}, line 3" in out


def test_eval_scores_repeats_apart_from_the_rest(tmp_path):
    """A model's answers (here the ones export recorded for a GGUF, so no model runs): right on two of the three
    repeats (the third recalls the training answer the test contradicts), on one of the three others."""
    from tunesmith.config import load_config
    from tunesmith.evaluate.compare import evaluate, print_summary
    from tunesmith.inference.cases import cases_digest, load_cases
    from tunesmith.run import Run

    config = load_config(_config(tmp_path))
    run = Run.of(config)
    run.dir.mkdir(parents=True)
    cases = load_cases(config.data.test_file, config, None)
    gguf = run.gguf / "near.q8_0.gguf"
    answers = [TEST[0][1], TEST[1][1], "{}", "{}", TRAIN[2][1], TEST[5][1]]
    run.fidelity.write_text(json.dumps({"cases": cases_digest(cases), "quantizations": [
        {"quant": "q8_0", "path": str(gguf), "answers": answers}]}))
    console = Console(file=io.StringIO(), width=200)
    (result,) = evaluate(config, run, None, [str(gguf)], console)
    assert result.means["exact_match"] == pytest.approx(3 / 6)
    seen_n, seen = result.apart["repeats training"]
    new_n, new = result.apart["new"]
    assert (seen_n, new_n) == (3, 3)
    assert seen["exact_match"] == pytest.approx(2 / 3) and new["exact_match"] == pytest.approx(1 / 3)
    rows = run.eval_rows()
    assert [row["repeats"]["kind"] if row["repeats"] else None for row in rows] == [kind for _, _, kind in TEST]
    print_summary([result], console)
    text = " ".join(console.file.getvalue().split())
    assert "3 of 6 held-out examples repeat a training example" in text
    assert "repeats training │ 0.667 of 3" in text and "new │ 0.333 of 3" in text
