"""The one config: defaults from the article, overrides, and one clear line for every kind of mistake."""

from __future__ import annotations

import pytest

from tests.conftest import run_cli
from tunesmith.config import PROJECTIONS, Config, load_config
from tunesmith.errors import ConfigError


def test_defaults_follow_the_article():
    config = Config()
    assert (config.lora.r, config.lora.alpha, config.lora.dropout, config.lora.bias) == (16, 16, 0.0, "none")
    assert config.lora.target_modules == PROJECTIONS == [
        "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    assert config.train.seed == 3407
    assert config.train.gradient_checkpointing == "auto"  # on only where memory needs it (train/memory.py)
    assert config.export.quantizations == ["q4_k_m", "q8_0"]
    assert config.model.base == "builtin:smollm2-135m"


def test_yaml_and_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("name: demo\nlora:\n  r: 8\ndata:\n  train_file: d/train.jsonl\n")
    config = load_config(path, ["train.max_steps=20", "lora.target_modules=[q_proj, v_proj]", "name=other"])
    assert config.lora.r == 8
    assert config.train.max_steps == 20
    assert config.lora.target_modules == ["q_proj", "v_proj"]
    assert config.name == "other"
    # data paths are relative to the config file, not to the working directory
    assert config.data.train_file == str(tmp_path / "d" / "train.jsonl")


def test_unknown_key_names_the_closest_valid_key(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("lora:\n  rank: 8\n")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert str(path) in info.value.message
    assert "lora.rank" in info.value.message and "did you mean lora.r?" in info.value.message


def test_unknown_section_suggests_a_section(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("trian:\n  epochs: 1\n")
    with pytest.raises(ConfigError, match=r"unknown key 'trian'; did you mean train\?"):
        load_config(path)


def test_wrong_type_names_key_and_expectation(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("train:\n  batch_size: lots\n")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert "train.batch_size" in info.value.message and "integer" in info.value.message
    assert "'lots'" in info.value.message


def test_bad_override_and_unknown_quantization():
    with pytest.raises(ConfigError, match="expected key.path=value"):
        load_config(None, ["train.max_steps"])
    with pytest.raises(ConfigError, match="unknown quantization 'q9_x'"):
        load_config(None, ["export.quantizations=[q9_x]"])


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        ("lora:\n  r: [8\n", "YAML syntax error"),
        ("lora:\n  rank: 8\n", "unknown key 'lora.rank'; did you mean lora.r?"),
        ("train:\n  epochs: many\n", "train.epochs"),
        (None, "config file not found"),
        # PyYAML keeps the second silently: this `train:` would have lost max_steps
        ("train:\n  max_steps: 3\nlora:\n  r: 4\ntrain:\n  epochs: 2\n",
         ":5:1: duplicate key 'train' (first at line 1"),
        # a run's name is a folder under runs_dir: these trained outside it
        ("name: ../escaped\n", "name: Value error, a run name is letters, digits"),
        ("name: /tmp/absolute\n", "name: Value error, a run name is letters, digits"),
        ("name: ''\n", "name: Value error, a run name is letters, digits"),
    ],
    ids=["yaml-syntax", "unknown-key", "wrong-type", "missing-file", "duplicate-key", "name-dotdot",
         "name-absolute", "name-empty"],
)
def test_cli_bad_config_is_one_line_exit_2(tmp_path, content, expected):
    path = tmp_path / "bad.yaml"
    if content is not None:
        path.write_text(content)
    done = run_cli("train", "--config", str(path))
    assert done.returncode == 2, done.stderr
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert lines[0].startswith("error: ") and str(path) in lines[0] and expected in lines[0], done.stderr
    assert "Traceback" not in done.stderr
    assert len(lines) <= 2  # the message, and at most a hint

    debug = run_cli("train", "--config", str(path), "--debug")
    assert debug.returncode == 2 and "Traceback" in debug.stderr


def test_yaml_error_names_the_line(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("name: x\nlora:\n  r: [8\n")
    with pytest.raises(ConfigError, match=rf"{path}:\d+:\d+: YAML syntax error"):
        load_config(path)


def test_run_names_are_what_a_model_name_allows():
    """The run's name becomes its model's name (`tunesmith create NAME`): every valid run name is a valid model
    name, and names that are paths are not run names."""
    from tunesmith.config import Config
    from tunesmith.serve.store import parse_name

    for name in ("goDrive", "orders", "a.b_c-1", "9lives", "x" * 80):
        assert Config(name=name).run_dir.name == name and parse_name(name) == (name, "latest")
    for name in ("", "..", ".hidden", "a/b", "../x", "/abs", "a:b", "x" * 81, "a b"):
        with pytest.raises(ValueError, match="a run name is"):
            Config(name=name)
