"""A run folder survives what happens to real ones: torn and truncated files, changed settings, a second `train`,
a planted pickle, a loss that blows up, a full disk. Each ends in a finished run or in one line and exit 2."""

from __future__ import annotations

import hashlib
import json
import pathlib
import shutil
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from tests.disk import leave_free, pages, small_disk
from tests.train_support import adapter_weights, write_train_config

SECRET = "s3cret-api-key-0123456789"
ROOT = Path(__file__).resolve().parent.parent


@dataclass
class Done:
    returncode: int
    stdout: str
    stderr: str


@pytest.fixture
def cli(capsys):
    """`tunesmith ARGS` through the CLI's own entry point in this process (its exit code and its two streams):
    a subprocess would import torch and transformers again for every call."""
    from tunesmith.cli import main

    def run(*args: str) -> Done:
        capsys.readouterr()
        code = main(list(args))
        out, err = capsys.readouterr()
        return Done(code, " ".join(out.split()), err)  # rich wraps long lines for the terminal: compare words

    return run


def _write_config(tmp: Path, model: Path, data: Path, name: str = "run", **train) -> Path:
    return write_train_config(tmp, model, data, name, serve={"api_key": SECRET}, **train)


def _same_adapter(a: dict, b: dict) -> None:
    import torch

    assert a.keys() == b.keys()
    for key, value in a.items():
        torch.testing.assert_close(value, b[key], rtol=1e-5, atol=1e-6)


def _one_line_error(done, expected: str) -> None:
    assert done.returncode == 2, done.stdout + done.stderr
    assert expected in done.stderr and "Traceback" not in done.stderr, done.stderr


@pytest.fixture(scope="module")
def trained(tiny_qwen3, tmp_path_factory) -> tuple[Path, Path, dict]:
    """One finished 12-step run (checkpoints at 9 and 12 kept): (its folder, its config, its adapter)."""
    tmp = tmp_path_factory.mktemp("trained")
    data = tmp / "train.jsonl"
    data.write_text("".join(json.dumps({"input": f"colour of item {i}?", "output": ["red", "green", "blue"][i % 3]})
                            + "\n" for i in range(48)))
    config = _write_config(tmp, tiny_qwen3, data)
    from rich.console import Console

    from tunesmith.config import load_config
    from tunesmith.train.loop import train

    train(load_config(config), Console(quiet=True))
    run = tmp / "runs" / "run"
    return run, config, adapter_weights(run)


def _copy(trained: tuple[Path, Path, dict], tmp_path: Path) -> tuple[Path, Path]:
    """A copy of the finished run in tmp_path, with its config pointing there."""
    run, config, _ = trained
    shutil.copytree(run, tmp_path / "runs" / run.name)
    settings = yaml.safe_load(config.read_text())
    settings["runs_dir"] = str(tmp_path / "runs")
    copied = tmp_path / config.name
    copied.write_text(yaml.safe_dump(settings))
    return tmp_path / "runs" / run.name, copied


def test_no_secret_is_written_into_the_run_folder(trained):
    run, _, _ = trained
    leaked = [path for path in run.rglob("*") if path.is_file() and SECRET.encode() in path.read_bytes()]
    assert not leaked, f"serve.api_key written into {leaked}"


def test_resume_passes_over_a_truncated_checkpoint_trims_a_torn_metrics_line_and_sweeps_temporaries(
        trained, tmp_path, cli):
    run, config = _copy(trained, tmp_path)
    newest = run / "checkpoints" / "step-00000012" / "trainable.safetensors"
    newest.write_bytes(newest.read_bytes()[: newest.stat().st_size // 2])  # a power loss before the data was on disk
    with (run / "metrics.jsonl").open("a") as metrics:
        metrics.write('{"step": 13, "lo')  # killed in the middle of a line
    shutil.rmtree(run / "adapter")
    # What a SIGKILL in the middle of writing the adapter, a checkpoint or the data files leaves behind:
    (run / ".tmp-adapter-k1ll3d").mkdir()
    (run / ".tmp-adapter-k1ll3d" / "adapter_model.safetensors").write_bytes(b"\0" * 4096)
    (run / "checkpoints" / ".tmp-step-00000015-k1ll3d").mkdir()
    (run / "data" / ".tmp-train.jsonl-k1ll3d").write_text("{")

    done = cli("train", "--config", str(config), "--resume")
    assert done.returncode == 0, done.stderr
    assert "checkpoint step-00000012 is damaged: trainable.safetensors has" in done.stdout
    assert "resuming from step-00000009 (step 9 of 12)" in done.stdout
    _same_adapter(adapter_weights(run), trained[2])  # the three steps retraced exactly
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "loss" in r] == list(range(1, 13))
    assert not list(run.rglob(".tmp-*")), "a killed process's temporaries were kept"


def test_resume_with_changed_settings_names_them_and_exits_2(trained, tmp_path, cli):
    run, config = _copy(trained, tmp_path)
    shutil.rmtree(run / "adapter")
    done = cli("train", "--config", str(config), "--resume", "--set", "lora.r=8",
                   "--set", "train.learning_rate=0.001")
    _one_line_error(done, "cannot resume with changed settings: lora.r was 16, now 8; "
                          "train.learning_rate was 0.005, now 0.001")
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step-00000009", "step-00000012"]


def test_plain_train_over_a_trained_run_refuses_and_force_starts_over(trained, tmp_path, cli):
    run, config = _copy(trained, tmp_path)
    before = {path: path.read_bytes() for path in (run / "checkpoints").rglob("*") if path.is_file()}
    done = cli("train", "--config", str(config))
    _one_line_error(done, f"{run} already holds a trained run")
    assert "--resume" in done.stderr and "--set name=" in done.stderr and "--force" in done.stderr
    assert {path: path.read_bytes() for path in (run / "checkpoints").rglob("*") if path.is_file()} == before

    done = cli("train", "--config", str(config), "--force", "--set", "train.max_steps=2",
                   "--set", "train.save_steps=2")
    assert done.returncode == 0, done.stderr
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step-00000002"]
    assert json.loads((run / "run.json").read_text())["final"]["steps"] == 2


def test_save_total_limit_null_keeps_every_checkpoint_for_the_curve(trained, tmp_path, cli):
    # The default keeps the newest two (the fixture's 12-step run: 9 and 12); null keeps all, which
    # bench/accuracy_curve.py --checkpoints then scores one by one.
    run, config = _copy(trained, tmp_path)
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step-00000009", "step-00000012"]
    done = cli("train", "--config", str(config), "--force", "--set", "train.max_steps=6",
               "--set", "train.save_steps=2", "--set", "train.save_total_limit=null")
    assert done.returncode == 0, done.stderr
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step-00000002", "step-00000004",
                                                                       "step-00000006"]
    import importlib.util

    spec = importlib.util.spec_from_file_location("accuracy_curve", ROOT / "bench" / "accuracy_curve.py")
    curve = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(curve)
    cases = Path(yaml.safe_load(config.read_text())["data"]["train_file"])
    label, points = curve.checkpoint_curve(run, config, cases, limit=3)
    assert [point[0] for point in points] == [2, 4, 6] and "3 of train.jsonl" in label
    minutes = [point[1] for point in points]
    assert minutes == sorted(minutes) and minutes[0] > 0
    assert all(0.0 <= point[2] <= 1.0 for point in points)


class _Payload:
    """What a planted state.pt could hold: unpickling it calls Path.touch (it could as well call os.system)."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return pathlib.Path.touch, (self.marker,)


def test_a_checkpoint_whose_state_unpickles_code_is_refused_without_running_it(trained, tmp_path, cli):
    import torch

    run, config = _copy(trained, tmp_path)
    checkpoint = run / "checkpoints" / "step-00000012"
    marker = tmp_path / "code-ran"
    torch.save({"optimizer": _Payload(marker), "scheduler": {}, "rng": {}}, checkpoint / "state.pt")
    manifest = json.loads((checkpoint / "manifest.json").read_text())  # whoever plants it can fix the digests
    data = (checkpoint / "state.pt").read_bytes()
    manifest["files"]["state.pt"] = {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    (checkpoint / "manifest.json").write_text(json.dumps(manifest))
    shutil.rmtree(run / "adapter")

    try:
        done = cli("train", "--config", str(config), "--resume")
    finally:
        assert not marker.exists(), "loading a checkpoint ran code from it"
    _one_line_error(done, f"{checkpoint / 'state.pt'}: not a tunesmith checkpoint state")


@pytest.mark.parametrize("setting", ["learning_rate: .inf", "weight_decay: .inf", "epochs: .inf",
                                     "learning_rate: .nan"])
def test_non_finite_settings_are_refused(tmp_path, setting, cli):
    key, _, value = setting.partition(": ")
    path = tmp_path / "c.yaml"
    path.write_text(f"name: x\ntrain:\n  {key}: {value}\n")
    done = cli("train", "--config", str(path))
    _one_line_error(done, f"train.{key}: Input should be a finite number")


def test_a_loss_that_turns_non_finite_stops_the_run_and_saves_no_adapter(trained, tmp_path, cli):
    settings = yaml.safe_load(trained[1].read_text())
    data = settings["data"]["train_file"]
    diverging = _write_config(tmp_path, Path(settings["model"]["base"]), Path(data), name="diverging",
                              learning_rate=1e30)  # finite, so allowed; AdamW's first steps overflow the weights
    done = cli("train", "--config", str(diverging))
    _one_line_error(done, "the loss is nan (not a finite number); no adapter was saved")
    out = tmp_path / "runs" / "diverging"
    assert not (out / "adapter").exists()
    def refuse(name: str) -> None:
        raise AssertionError(f"metrics.jsonl holds a bare {name}, which is not JSON")

    for line in (out / "metrics.jsonl").read_text().splitlines():
        json.loads(line, parse_constant=refuse)
    assert not (out / "checkpoints").exists() or not any((out / "checkpoints").iterdir())  # it blew up at step 3


def test_a_full_disk_while_saving_a_checkpoint_is_one_line_and_the_run_resumes_after(trained, tmp_path, cli):
    run, config, adapter = trained
    checkpoint = pages(run / "checkpoints" / "step-00000012")
    with small_disk(tmp_path / "disk", "16m") as disk:
        settings = yaml.safe_load(config.read_text())
        settings["runs_dir"] = str(disk / "runs")
        on_disk = tmp_path / "on_disk.yaml"
        on_disk.write_text(yaml.safe_dump(settings))
        (disk / "runs").mkdir()
        everything_else = sum(pages(path) for path in run.iterdir() if path.name not in ("checkpoints", "adapter"))
        filler = leave_free(disk, everything_else + checkpoint * 3 // 2)  # room for one checkpoint, not two

        done = cli("train", "--config", str(on_disk))
        out = disk / "runs" / run.name
        _one_line_error(done, f"{out / 'checkpoints' / 'step-00000006'}: the disk is full")
        assert "tunesmith train --resume` continues from step-00000003" in done.stderr
        assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-00000003"]
        assert not list(out.rglob(".tmp-*"))

        filler.unlink()
        resumed = cli("train", "--config", str(on_disk), "--resume")
        assert resumed.returncode == 0, resumed.stderr
        assert "resuming from step-00000003" in resumed.stdout
        _same_adapter(adapter_weights(out), adapter)
