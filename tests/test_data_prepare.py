"""The data stage end to end: prepare() and `tunesmith data inspect`, on real files with the SmolLM2 tokenizer."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from rich.console import Console

from tunesmith.cli import main
from tunesmith.config import Config, DataConfig, TrainConfig
from tunesmith.data import IGNORE_INDEX, prepare, summary_lines
from tunesmith.data.inspect import inspect_file
from tunesmith.errors import DataError
from tunesmith.models import load_tokenizer, resolve_base


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer(resolve_base("builtin:smollm2-135m"))


def write(path: Path, lines: list) -> Path:
    path.write_text("".join((x if isinstance(x, str) else json.dumps(x, ensure_ascii=False)) + "\n" for x in lines),
                    encoding="utf-8")
    return path


def pairs(n: int, start: int = 0) -> list[dict]:
    return [{"input": f"问题 {i}", "output": f"答案 {i}"} for i in range(start, start + n)]


def config(tmp_path: Path, **data) -> Config:
    return Config(name="t", runs_dir=str(tmp_path / "runs"), data=DataConfig(**data), train=TrainConfig(seed=1))


def test_prepare_reports_skips_and_duplicates_and_writes_its_files_atomically(tmp_path, tokenizer):
    records = pairs(40)
    lines = records[:10] + [records[3], "{broken", records[3]] + records[10:]
    train = write(tmp_path / "train.jsonl", lines)
    cfg = config(tmp_path, train_file=str(train), on_error="skip", eval_fraction=0.1, system_prompt="系统")
    prepared = prepare(cfg, tokenizer)

    assert (len(prepared.train), len(prepared.eval)) == (36, 4)
    stats = prepared.stats
    assert stats["load"]["skipped"] == [(f"{train}, line 12 (record 11): not valid JSON at column 2: "
                                        "Expecting property name enclosed in double quotes")]
    assert stats["duplicates"] == [f"{train}, line 11 (record 10) duplicates {train}, line 4 (record 3)",
                                   f"{train}, line 13 (record 12) duplicates {train}, line 4 (record 3)"]
    assert stats["tokens"]["train"]["count"] == 36 and stats["tokens"]["train"]["over_max"] == 0
    assert stats["trained_tokens"]["min"] >= 2
    out = cfg.run_dir / "data"
    assert sorted(p.name for p in out.iterdir()) == ["duplicates.txt", "stats.json", "train.jsonl",
                                                     "validation.jsonl"]  # no .tmp- left
    assert (out / "duplicates.txt").read_text(encoding="utf-8").splitlines() == stats["duplicates"]
    assert json.loads((out / "stats.json").read_text(encoding="utf-8"))["split"]["eval"] == 4
    written = [json.loads(line) for line in (out / "validation.jsonl").read_text(encoding="utf-8").splitlines()]
    assert [w["messages"] for w in written] == [e.messages for e in prepared.eval_examples]
    assert written[0]["messages"][0] == {"role": "system", "content": "系统"}
    lines = summary_lines(stats)
    assert lines[0] == f"{train}: 43 records (input_output), 1 skipped, 2 duplicates removed"
    assert lines[1] == "split: 36 train / 4 eval (eval_fraction 0.1, seed 1)"
    first = prepared.train[0]
    trained = [t for t, label in zip(first["input_ids"], first["labels"]) if label != IGNORE_INDEX]
    assert tokenizer.decode(trained) == f"{prepared.train_examples[0].messages[-1]['content']}<|im_end|>"


def test_split_is_deterministic_and_follows_the_seed(tmp_path, tokenizer):
    train = write(tmp_path / "train.jsonl", pairs(50))

    def eval_lines(seed: int, run: str) -> list[int]:
        cfg = config(tmp_path, train_file=str(train), eval_fraction=0.2)
        cfg.train.seed, cfg.name = seed, run
        return [e.source.line for e in prepare(cfg, tokenizer).eval_examples]

    assert eval_lines(3407, "a") == eval_lines(3407, "b")
    assert eval_lines(3407, "a") != eval_lines(1, "c")
    assert len(eval_lines(1, "c")) == 10


def test_eval_file_is_used_and_its_overlap_with_training_reported(tmp_path, tokenizer):
    train = write(tmp_path / "train.jsonl", pairs(10))
    evaluation = write(tmp_path / "eval.jsonl", pairs(3, start=8))
    prepared = prepare(config(tmp_path, train_file=str(train), eval_file=str(evaluation)), tokenizer)
    assert (len(prepared.train), len(prepared.eval)) == (10, 3)
    assert prepared.stats["eval_in_train"] == [
        f"{evaluation}, line 1 (record 0) also in training at {train}, line 9 (record 8)",
        f"{evaluation}, line 2 (record 1) also in training at {train}, line 10 (record 9)"]


def test_overlong_examples_are_dropped_or_truncated_and_always_reported(tmp_path, tokenizer):
    records = pairs(5) + [{"input": "长" * 60, "output": "短"}, {"input": "短", "output": "长" * 60}]
    train = write(tmp_path / "train.jsonl", records)
    cfg = config(tmp_path, train_file=str(train), eval_fraction=0.0)
    cfg.train.max_seq_length = 64
    dropped = prepare(cfg, tokenizer)
    assert len(dropped.train) == 5 and dropped.stats["overlength_count"] == 2
    assert dropped.stats["overlength"][0].startswith(f"{train}, line 6 (record 5): ")
    assert dropped.stats["overlength"][0].endswith("tokens > train.max_seq_length 64, dropped")
    cfg.data.overlength = "truncate"
    cut = prepare(cfg, tokenizer)
    # Line 6's reply falls past the cut, so nothing of it is trained: it is dropped even when truncating.
    assert len(cut.train) == 6 and all(len(t["input_ids"]) <= 64 for t in cut.train)
    assert [line.rsplit(", ", 1)[1] for line in cut.stats["overlength"]] == ["dropped", "truncated"]


def test_prepare_without_a_train_file(tmp_path, tokenizer):
    with pytest.raises(DataError, match="data.train_file is not set"):
        prepare(config(tmp_path), tokenizer)


def test_inspect_prints_shape_counts_lengths_problems_and_the_trained_part(tmp_path):
    train = write(tmp_path / "train.jsonl", pairs(3) + [pairs(1)[0], {"input": "q", "output": "a", "id": 1}])
    console = Console(record=True, width=200)
    inspect_file(train, Config(), console)
    text = console.export_text()
    for expected in ("input_output", "records        5", "exact duplicates: 1",
                     f"{train}, line 4 (record 3) duplicates {train}, line 1 (record 0)",
                     "fields not used for training: 1", "'id' in 1 records", "whole example", "median",
                     "first example:", "trained: '答案 0<|im_end|>'"):
        assert expected in text, expected


@pytest.mark.parametrize("text", ["x" * 200_000, "ab\n" * 66_000], ids=["one long line", "many short lines"])
def test_inspect_cuts_a_huge_example_and_says_how_much(tmp_path, text):
    """A 200,000-character example printed whole filled about a thousand terminal lines (short lines passed the
    characters' cut); both are cut now, and the gap says how much."""
    train = write(tmp_path / "train.jsonl", [{"input": text, "output": "ok"}, *pairs(2)])
    console = Console(record=True, width=100)
    inspect_file(train, Config(), console)
    out = console.export_text()
    assert len(out.splitlines()) < 120, len(out.splitlines())
    gap = next(line for line in out.splitlines() if "not shown" in line)
    shown = out.count("x") + out.count("ab")
    cut = int(gap.split("…")[1].split()[0].replace(",", ""))
    assert 0.95 * len(text) < cut < len(text) and shown < len(text) - cut + 100, gap
    assert ("lines)" in gap) == ("\n" in text)


def test_data_inspect_command_exit_codes(tmp_path, capsys):
    good = write(tmp_path / "good.jsonl", pairs(2))
    assert main(["data", "inspect", str(good)]) == 0
    assert "trained: '答案 0<|im_end|>'" in capsys.readouterr().out
    bad = write(tmp_path / "bad.jsonl", pairs(2) + [{"input": "q", "output": ""}])
    assert main(["data", "inspect", str(bad)]) == 2
    assert f"{bad}, line 3 (record 2), field 'output': empty output" in capsys.readouterr().err
    cfg = write(tmp_path / "c.yaml", ["data:", "  on_error: skip"])
    assert main(["data", "inspect", str(bad), "--config", str(cfg)]) == 0
    assert "skipped records (data.on_error: skip): 1" in capsys.readouterr().out


def test_many_duplicates_are_a_count_and_three_examples_once_and_a_file_with_all(tmp_path, tokenizer, caplog):
    """65 duplicates printed 130 lines: one per duplicate, in the pipeline's data stage and again in training."""
    import logging

    records = pairs(20)
    train = write(tmp_path / "train.jsonl", records + [records[i % 20] for i in range(65)])
    cfg = config(tmp_path, train_file=str(train), eval_fraction=0.1)
    with caplog.at_level(logging.INFO, logger="tunesmith.data"):
        prepare(cfg, tokenizer)
        prepare(cfg, tokenizer)  # the train stage reads the split back
    said = [r.getMessage() for r in caplog.records if r.name == "tunesmith.data" and r.levelno >= logging.INFO]
    listing = cfg.run_dir / "data" / "duplicates.txt"
    assert said[:4] == [f"65 duplicates removed (data.dedupe) (the first 3; all of them in {listing}, and with --debug):",
                        f"  {train}, line 21 (record 20) duplicates {train}, line 1 (record 0)",
                        f"  {train}, line 22 (record 21) duplicates {train}, line 2 (record 1)",
                        f"  {train}, line 23 (record 22) duplicates {train}, line 3 (record 2)"]
    assert len(said) == 5 and "read back, not split again" in said[4]
    assert len(listing.read_text(encoding="utf-8").splitlines()) == 65
    caplog.clear()
    cfg.name = "again"  # a run of its own: prepared from the file
    with caplog.at_level(logging.DEBUG, logger="tunesmith.data"):  # --debug
        prepare(cfg, tokenizer)
    assert sum("duplicates" in record.getMessage() for record in caplog.records if record.levelno == logging.DEBUG) == 65


def test_a_current_split_is_read_back_and_a_changed_file_or_setting_makes_a_new_one(tmp_path, tokenizer, caplog):
    """The pipeline prepared the data in its data stage and again in the train stage (a resumed training too):
    training now reads the split the data stage wrote while it was made from the same files and settings."""
    import logging

    train = write(tmp_path / "train.jsonl", pairs(40))
    cfg = config(tmp_path, train_file=str(train), eval_fraction=0.1)
    first = prepare(cfg, tokenizer)
    split = cfg.run_dir / "data" / "train.jsonl"
    written = split.stat().st_ino
    with caplog.at_level(logging.INFO, logger="tunesmith.data"):
        again = prepare(cfg, tokenizer)
    assert split.stat().st_ino == written  # read, not written again
    said = f"data: {split} and {split.parent / 'validation.jsonl'} are current (same data files and settings): read "
    assert [r.getMessage() for r in caplog.records] == [said + "back, not split again"]
    assert (again.train, again.eval) == (first.train, first.eval)
    assert [e.messages for e in again.train_examples] == [e.messages for e in first.train_examples]
    assert [e.source for e in again.eval_examples] == [e.source for e in first.eval_examples]
    assert again.stats == json.loads(json.dumps(first.stats))

    def made_again() -> bool:
        nonlocal written
        before, written = written, (prepare(cfg, tokenizer), split.stat().st_ino)[1]
        return written != before

    write(train, pairs(41))  # the data file changed
    assert made_again() and json.loads((split.parent / "stats.json").read_text())["load"]["records"] == 41
    assert not made_again()
    cfg.train.seed = 2  # a setting the split depends on
    assert made_again()
    cfg.data.test_file = str(train)  # one it does not
    assert not made_again()
    split.write_text("".join(split.read_text(encoding="utf-8").splitlines(keepends=True)[1:]), encoding="utf-8")
    assert made_again() and len(split.read_text(encoding="utf-8").splitlines()) == 37  # edited by hand: made again
