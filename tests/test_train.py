"""`tunesmith train` on tiny models: it learns, resumes exactly after SIGKILL, and refuses bad settings."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from tests.conftest import ROOT, run_cli


def _dataset(path: Path, n: int = 48) -> Path:
    with path.open("w", encoding="utf-8") as handle:
        for i in range(n):
            handle.write(json.dumps({"input": f"colour of item {i}?", "output": ["red", "green", "blue"][i % 3]}) + "\n")
    return path


def _config(tmp: Path, model: Path, name: str, **train) -> Path:
    config = {
        "name": name,
        "runs_dir": str(tmp / "runs"),
        "model": {"base": str(model)},
        "data": {"train_file": str(_dataset(tmp / "train.jsonl")), "eval_fraction": 0.125},
        # fp32: the comparisons below are at fp32 rounding (bf16, the default on AMX CPUs, is tested apart)
        "train": {"max_steps": 12, "batch_size": 4, "save_steps": 3, "log_steps": 1, "eval_steps": 6,
                  "learning_rate": 5e-3, "bf16": False, **train},
    }
    path = tmp / f"{name}.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def _adapter(run: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(run / "adapter" / "adapter_model.safetensors")


def _losses(run: Path) -> list[tuple[int, float]]:
    lines = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [(record["step"], record["loss"]) for record in lines if "loss" in record]


@pytest.mark.slow
def test_sigkill_then_resume_matches_an_uninterrupted_run(tmp_path, tiny_qwen3):
    import torch

    # log_steps 4 with save_steps 3: the resumed run's first logged loss spans the checkpoint, so the loss
    # summed before it must come back from the checkpoint for the curve to match.
    straight = _config(tmp_path, tiny_qwen3, "straight", log_steps=4)
    done = run_cli("train", "--config", str(straight))
    assert done.returncode == 0, done.stderr

    killed = _config(tmp_path, tiny_qwen3, "killed", log_steps=4)
    run = tmp_path / "runs" / "killed"
    process = subprocess.Popen([sys.executable, "-m", "tunesmith.cli", "train", "--config", str(killed)],
                               cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 300
    while not (run / "checkpoints" / "step-00000006").exists() and time.monotonic() < deadline:
        time.sleep(0.02)
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    assert not (run / "adapter").exists(), "killed too late: the run had already finished"

    resumed = run_cli("train", "--config", str(killed), "--resume")
    assert resumed.returncode == 0, resumed.stderr
    assert "resuming from step-" in resumed.stdout

    a, b = _adapter(tmp_path / "runs" / "straight"), _adapter(run)
    assert a.keys() == b.keys() and len(a) == 2 * 7 * 2  # A and B for 7 projections in 2 layers
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-5, atol=1e-6)
    reference = _losses(tmp_path / "runs" / "straight")
    assert [step for step, _ in _losses(run)] == [step for step, _ in reference] == [4, 8, 12]
    assert [loss for _, loss in _losses(run)] == pytest.approx([loss for _, loss in reference], rel=1e-4)


def test_training_lowers_the_loss_and_writes_its_outputs(tmp_path, tiny_qwen3):
    from peft import PeftModel

    from tunesmith.models import load_model

    config = _config(tmp_path, tiny_qwen3, "learn", max_steps=30, learning_rate=2e-2, save_steps=30)
    done = run_cli("train", "--config", str(config))
    assert done.returncode == 0, done.stderr
    run = tmp_path / "runs" / "learn"
    losses = [loss for _, loss in _losses(run)]
    assert losses[-1] < 0.92 * losses[0], losses  # a random 64-wide model over a 49k vocabulary learns slowly
    assert "{'loss': " in done.stdout and "'grad_norm': " in done.stdout and "'epoch': " in done.stdout
    record = json.loads((run / "run.json").read_text())
    assert record["final"]["steps"] == 30 and record["config"]["lora"]["r"] == 16
    assert {"torch", "transformers", "peft"} <= record["versions"].keys()
    assert len(record["dataset_sha256"]) == 64 and record["device"] == "cpu"
    assert any("eval_loss" in line for line in (run / "metrics.jsonl").read_text().splitlines())
    assert list((run / "tb").glob("events.out.tfevents.*"))
    PeftModel.from_pretrained(load_model(tiny_qwen3), run / "adapter")  # loadable the standard way


@pytest.mark.parametrize(
    ("settings", "expected"),
    [
        ({"lora": {"target_modules": ["q_proj", "qkv_proj"]}}, "no module named qkv_proj"),
        ({"train": {"method": "qlora"}}, "qlora needs a CUDA GPU"),
        ({"train": {"max_seq_length": 8}}, "train.max_seq_length"),
        ({"data": {"train_file": "missing.jsonl"}}, "missing.jsonl"),
    ],
    ids=["target-module", "qlora-on-cpu", "seq-too-short", "no-data"],
)
def test_wrong_inputs_are_one_line_and_exit_2(tmp_path, tiny_qwen3, settings, expected):
    path = _config(tmp_path, tiny_qwen3, "bad")
    config = yaml.safe_load(path.read_text())
    for section, values in settings.items():
        config.setdefault(section, {}).update(values)
    path.write_text(yaml.safe_dump(config))
    done = run_cli("train", "--config", str(path))
    assert done.returncode == 2, done.stdout + done.stderr
    assert expected in done.stderr and "Traceback" not in done.stderr
    if "target_modules" in str(settings):
        assert "q_proj" in done.stderr and "down_proj" in done.stderr  # names what the model has


@pytest.mark.slow
def test_fast_path_through_tunesmith_train_resumes_and_saves_a_peft_adapter(tmp_path, tiny_qwen3):
    """The GPU fast path's plumbing (packing, checkpoints, resume, adapter export), run eagerly on CPU."""
    import torch
    from peft import PeftModel

    from tunesmith.models import load_model

    straight = _config(tmp_path, tiny_qwen3, "fast", fast=True, max_steps=6, save_steps=3)
    done = run_cli("train", "--config", str(straight))
    assert done.returncode == 0, done.stderr
    assert "GPU fast path: packed" in done.stdout
    run = tmp_path / "runs" / "fast"
    PeftModel.from_pretrained(load_model(tiny_qwen3), run / "adapter")
    reference = _adapter(run)
    # The step keeps its loss and gradient norm on the device; the loop reads both at log steps (log_steps 1).
    logged = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in logged if "loss" in r] == list(range(1, 7))
    assert all(isinstance(r["loss"], float) and r["grad_norm"] > 0 for r in logged if "loss" in r)

    # Resume from the step-3 checkpoint of the same run: the adapter must come out the same.
    import shutil

    shutil.rmtree(run / "checkpoints" / "step-00000006")
    shutil.rmtree(run / "adapter")
    resumed = run_cli("train", "--config", str(straight), "--resume")
    assert resumed.returncode == 0, resumed.stderr
    assert "resuming from step-00000003" in resumed.stdout
    for key, value in _adapter(run).items():
        torch.testing.assert_close(value, reference[key], rtol=1e-5, atol=1e-6)


@pytest.mark.slow
def test_time_budget_fits_the_schedule_and_a_resume_keeps_its_length(tmp_path, tiny_qwen3):
    """train.max_minutes: after the timed steps the run's length is set to what fits, the learning rate decays
    to zero over it, and a resumed run keeps that length even with another budget."""
    import re
    import shutil

    import torch

    config = _config(tmp_path, tiny_qwen3, "budget", max_steps=100_000, max_minutes=0.15, save_steps=4,
                     log_steps=1, eval_steps=20)
    done = run_cli("train", "--config", str(config))
    assert done.returncode == 0, done.stderr
    found = re.search(r"time budget 0.15 min: (\d+) steps fit", done.stdout)
    assert found, done.stdout
    run = tmp_path / "runs" / "budget"
    steps = json.loads((run / "run.json").read_text())["final"]["steps"]
    fitted = int(found.group(1))
    assert 10 <= steps <= fitted < 100_000
    logged = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    last = [record for record in logged if "loss" in record][-1]
    assert last["step"] == steps
    if "spent at step" not in done.stdout:  # the loop kept to its timing: the schedule ended where it fitted
        assert steps == fitted and last["learning_rate"] == 0.0
    reference = _adapter(run)

    # Lose everything after the newest checkpoint before the end, then resume under a budget 100x larger: the
    # length fitted before the loss stands.
    earlier = sorted((run / "checkpoints").iterdir())[-2]
    assert json.loads((earlier / "trainer_state.json").read_text())["total_steps"] == fitted
    shutil.rmtree(max((run / "checkpoints").iterdir()))
    shutil.rmtree(run / "adapter")
    resumed = run_cli("train", "--config", str(config), "--resume", "--set", "train.max_minutes=15")
    assert resumed.returncode == 0, resumed.stderr
    assert f"resuming from {earlier.name} (step {int(earlier.name[5:])} of {fitted})" in resumed.stdout
    assert json.loads((run / "run.json").read_text())["final"]["steps"] == fitted
    if steps == fitted:  # the first run was not cut short: the resumed one retraced it
        for key, value in _adapter(run).items():
            torch.testing.assert_close(value, reference[key], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(("setting", "device", "expected"), [
    ("auto", "cpu", None), (True, "cpu", True), (False, "cpu", False), (False, "cuda", False)])
def test_bf16_auto_follows_the_cpus_bf16_instructions(setting, device, expected):
    """auto: bf16 on CPUs with AMX or AVX512-BF16 (1.48x on goDrive, bench/RESULTS.md), fp32 elsewhere."""
    from tunesmith.config import Config
    from tunesmith.train.loop import cpu_has_bf16, use_bf16

    config = Config.model_validate({"model": {"base": "x"}, "train": {"bf16": setting}})
    flags = Path("/proc/cpuinfo").read_text().split()
    assert cpu_has_bf16() == ("amx_bf16" in flags or "avx512_bf16" in flags)
    assert use_bf16(config, device) == (cpu_has_bf16() if expected is None else expected)

