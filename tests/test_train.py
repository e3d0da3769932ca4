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
from tests.train_support import adapter_weights, write_train_config


def _dataset(path: Path, n: int = 48) -> Path:
    with path.open("w", encoding="utf-8") as handle:
        for i in range(n):
            handle.write(json.dumps({"input": f"colour of item {i}?", "output": ["red", "green", "blue"][i % 3]}) + "\n")
    return path


def _config(tmp: Path, model: Path, name: str, **train) -> Path:
    return write_train_config(tmp, model, _dataset(tmp / "train.jsonl"), name, **train)


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

    a, b = adapter_weights(tmp_path / "runs" / "straight"), adapter_weights(run)
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
    assert "gradient checkpointing off: activations of the largest batch" in done.stdout  # auto, said once
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
        ({"lora": {"target_modules": ["q_proj", "qkv_proj"]}},
         ["no module named qkv_proj", "q_proj", "down_proj"]),  # names what the model has
        ({"train": {"method": "qlora"}}, ["qlora needs a CUDA GPU"]),
        ({"train": {"max_seq_length": 8}}, ["train.max_seq_length"]),
        ({"data": {"train_file": "missing.jsonl"}}, ["missing.jsonl"]),
        # a rank no layer can hold (it failed as a torch allocation error); k_proj and v_proj are 64 -> 32
        ({"lora": {"r": 200_000}}, ["lora.r: 200000 is larger than the narrowest targeted layer (32 wide)"]),
        ({"runs_dir": "{tmp}/a-file/runs"}, ["{tmp}/a-file is a file, not a folder"]),
    ],
    ids=["target-module", "qlora-on-cpu", "seq-too-short", "no-data", "lora-r-too-large", "runs-dir-is-a-file"],
)
def test_wrong_inputs_are_one_line_and_exit_2(tmp_path, tiny_qwen3, settings, expected):
    path = _config(tmp_path, tiny_qwen3, "bad")
    (tmp_path / "a-file").write_text("not a folder")
    config = yaml.safe_load(path.read_text())
    for section, values in settings.items():
        if isinstance(values, dict):
            config.setdefault(section, {}).update(values)
        else:
            config[section] = values.format(tmp=tmp_path)
    path.write_text(yaml.safe_dump(config))
    done = run_cli("train", "--config", str(path))
    assert done.returncode == 2, done.stdout + done.stderr
    assert "Traceback" not in done.stderr
    for part in expected:
        assert part.format(tmp=tmp_path) in done.stderr, done.stderr


def test_gradient_checkpointing_auto_is_on_only_where_activations_would_not_fit():
    """auto: off for SmolLM2-135M's batches with GBs free (checkpointing only recomputed every layer), on for
    Qwen3-0.6B at 8 x 1024 tokens in fp32 on a 16 GB card."""
    from types import SimpleNamespace

    from tunesmith.train.memory import activation_bytes, checkpointing_needed

    smollm2 = SimpleNamespace(hidden_size=576, intermediate_size=1536, num_hidden_layers=30)
    qwen3 = SimpleNamespace(hidden_size=1024, intermediate_size=3072, num_hidden_layers=28)
    assert activation_bytes(smollm2, 960, 2) == 960 * 30 * (18 * 576 + 4 * 1536) * 2  # 0.9 GiB
    on, why = checkpointing_needed(smollm2, 960, 2, free=16 * 2**30)  # orders: 8 x 120 tokens, bf16
    assert not on and why == ("activations of the largest batch (960 tokens) need about 907 MiB, 16.0 GiB of "
                              "memory are free")
    assert checkpointing_needed(smollm2, 960, 2, free=1 * 2**30)[0]  # a 1 GB machine: on
    assert checkpointing_needed(qwen3, 8 * 1024, 4, free=16 * 2**30)[0]  # 26 GiB of activations


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
    reference = adapter_weights(run)
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
    for key, value in adapter_weights(run).items():
        torch.testing.assert_close(value, reference[key], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(("setting", "device", "expected"), [
    ("auto", "cpu", None), (True, "cpu", True), (False, "cpu", False), (False, "cuda", False)])
def test_bf16_auto_follows_the_cpus_bf16_instructions(setting, device, expected):
    """auto: bf16 on CPUs with AMX or AVX512-BF16 (1.48x on goDrive, bench/RESULTS.md), fp32 elsewhere."""
    from tunesmith.config import Config
    from tunesmith.train.loss import cpu_has_bf16, use_bf16

    config = Config.model_validate({"model": {"base": "x"}, "train": {"bf16": setting}})
    flags = Path("/proc/cpuinfo").read_text().split()
    assert cpu_has_bf16() == ("amx_bf16" in flags or "avx512_bf16" in flags)
    assert use_bf16(config, device) == (cpu_has_bf16() if expected is None else expected)

