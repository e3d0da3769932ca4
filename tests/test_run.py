"""The run folder has one owner (tunesmith/run.py): no other module spells its file names, the eval split and the
scored answers have different names, and a later stage runs with run.json's config plus its own live section."""

from __future__ import annotations

import ast
import json
import logging
from pathlib import Path

import pytest

from tunesmith import run as runs
from tunesmith.config import Config
from tunesmith.run import Run

PACKAGE = Path(runs.__file__).parent
# Calls whose arguments are path parts: a run-folder name there is a path spelled outside run.py.
PATH_CALLS = {"Path", "PurePath", "joinpath", "inside", "read_json", "_read_json", "with_name"}


def _call_name(node: ast.Call) -> str | None:
    func = node.func
    return func.id if isinstance(func, ast.Name) else func.attr if isinstance(func, ast.Attribute) else None


def spelled_names(source: str) -> list[tuple[int, str]]:
    """(line, name) for each run-folder name written as a string literal in `source`: a file name (run.json,
    metrics.jsonl, Modelfile) anywhere but in a docstring; a folder name (adapter, gguf, data) where it is a
    path part: after `/`, in Path(...), joinpath(...), the UI's inside(...), or with another such name in one
    tuple or list (a list of outputs)."""
    tree = ast.parse(source)
    docstrings = {id(node.body[0].value) for node in ast.walk(tree)
                  if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef)
                  and node.body and isinstance(node.body[0], ast.Expr) and isinstance(node.body[0].value, ast.Constant)}
    names = set(runs.NAMES)
    files = {name for name in names if "." in name or name == runs.MODELFILE}
    path_parts: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Div):
            path_parts |= {id(node.left), id(node.right)}
        elif isinstance(node, ast.Call) and _call_name(node) in PATH_CALLS:
            path_parts |= {id(arg) for arg in node.args}
        elif isinstance(node, ast.Tuple | ast.List):
            named = [e for e in node.elts if isinstance(e, ast.Constant) and e.value in names]
            if len(named) >= 2:
                path_parts |= {id(e) for e in named}
    return sorted((node.lineno, node.value) for node in ast.walk(tree)
                  if isinstance(node, ast.Constant) and isinstance(node.value, str) and node.value in names
                  and id(node) not in docstrings and (node.value in files or id(node) in path_parts))


def test_no_module_but_run_py_spells_a_run_folder_file_name():
    found = [f"{path.relative_to(PACKAGE.parent)}:{line}: {name!r}"
             for path in sorted(PACKAGE.rglob("*.py")) if path.name != "run.py" or path.parent != PACKAGE
             for line, name in spelled_names(path.read_text(encoding="utf-8"))]
    assert not found, "ask tunesmith/run.py for these instead:\n" + "\n".join(found)


def test_the_check_finds_what_it_looks_for():
    """The ways the run folder's names were spelled before run.py owned them (each from a module of the time)."""
    source = '''
"""A docstring may name run.json and eval.jsonl."""
record = run_dir / "run.json"
rows = (run_dir / "eval.jsonl").read_text()
for name in ("checkpoints", "adapter", "tb"):
    pass
path = inside(run_dir, "report.html")
adapter = run_dir / "adapter"
row = {"model": "base", "data": []}   # JSON keys, not path parts
message = "no run.json here"          # inside a sentence
'''
    assert spelled_names(source) == [(3, "run.json"), (4, "eval.jsonl"), (5, "adapter"), (5, "checkpoints"),
                                     (5, "tb"), (7, "report.html"), (8, "adapter")]


def test_the_eval_split_and_the_scored_answers_have_different_names(tmp_path):
    run = Run(tmp_path)
    assert runs.EVAL_SPLIT != runs.EVAL_ANSWERS and run.eval_split.parent == run.data
    assert run.eval_split_to_read() == run.eval_split  # nothing there yet: where the data stage writes it
    # A run prepared before the rename has the split under the answers' old name: still read.
    old = run.data / runs.OLD_EVAL_SPLIT
    old.parent.mkdir()
    old.write_text("{}\n")
    assert run.eval_split_to_read() == old
    run.eval_split.write_text("{}\n")
    assert run.eval_split_to_read() == run.eval_split


def _recorded(tmp_path: Path, **sections) -> tuple[Run, Config]:
    config = Config.model_validate({"name": "r", "runs_dir": str(tmp_path), "serve": {"api_key": "k"}, **sections})
    run = Run.of(config)
    run.write_record({"config": runs.record_config(config)})
    return run, config


def test_a_later_stage_takes_only_its_own_section_from_the_live_config(tmp_path, caplog):
    run, trained_with = _recorded(tmp_path, export={"quantizations": ["q8_0"]}, lora={"r": 8})
    assert "api_key" not in json.loads(run.record.read_text())["config"]["serve"]  # no secret in a run folder
    live = trained_with.model_copy(update={
        "export": trained_with.export.model_copy(update={"quantizations": ["f16"]}),
        "lora": trained_with.lora.model_copy(update={"r": 64}),
        "eval": trained_with.eval.model_copy(update={"max_new_tokens": 7})})
    with caplog.at_level(logging.INFO, logger="tunesmith.run"):
        export = run.config_for("export", live)
    assert export.export.quantizations == ["f16"]  # its own section: the live one
    assert export.lora.r == 8 and export.eval.max_new_tokens == 128  # the rest: what training recorded
    said = [record.getMessage() for record in caplog.records]
    assert said == [f"export: using export.quantizations=['f16'] from the config ({run.record} has ['q8_0'])"]

    caplog.clear()
    with caplog.at_level(logging.INFO, logger="tunesmith.run"):
        evaluation = run.config_for("eval", live)
        serve = run.config_for("serve", live)
        recorded = run.config_for("export")
    assert evaluation.eval.max_new_tokens == 7 and evaluation.export.quantizations == ["q8_0"]
    assert serve.serve.api_key == "k"  # the live section whole, its key too (which run.json never holds) ...
    assert [record.getMessage() for record in caplog.records] == [  # ... and never said aloud
        f"eval: using eval.max_new_tokens=7 from the config ({run.record} has 128)"]
    assert recorded.export.quantizations == ["q8_0"]  # no live config: run.json's whole


def test_not_a_run_is_one_clear_error(tmp_path):
    from tunesmith.errors import ConfigError

    with pytest.raises(ConfigError, match="not a tunesmith run"):
        Run(tmp_path).recorded_config()


def test_each_stage_is_complete_when_its_outputs_exist_and_clear_removes_them(tmp_path):
    run, config = _recorded(tmp_path)
    assert not any(run.complete(stage, config) for stage in ("train", "eval", "export"))
    assert not run.has_outputs("train")
    run.checkpoints.mkdir()
    assert not run.has_outputs("train")  # an empty checkpoints/ holds no training
    run.metrics.write_text("{}\n")
    assert run.has_outputs("train") and not run.complete("train", config)
    run.adapter.mkdir()
    (run.adapter / "adapter_model.safetensors").write_bytes(b"")
    assert run.complete("train", config)
    run.modelfile.write_text("FROM ./gguf/r.q8_0.gguf\n")
    assert not run.complete("export", config)  # the Modelfile and fidelity.json together mark it
    run.fidelity.write_text("{}")
    assert run.complete("export", config)
    run.clear("train")
    assert not run.has_outputs("train") and run.record.is_file() and run.modelfile.is_file()
