"""`tunesmith pipeline` end to end on a tiny model: every stage, skip on re-run, resume after a kill."""

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
from tests.serve_fixtures import free_port


def _config(tmp: Path, model: Path, **train) -> Path:
    data = tmp / "train.jsonl"
    with data.open("w", encoding="utf-8") as handle:
        for i in range(40):
            handle.write(json.dumps({"input": f"item {i}", "output": ["alpha", "beta"][i % 2]}) + "\n")
    test = tmp / "test.jsonl"
    test.write_text("".join(json.dumps({"input": f"item {i}", "output": ["alpha", "beta"][i % 2]}) + "\n"
                            for i in range(100, 104)))
    config = {
        "name": "tiny",
        "runs_dir": str(tmp / "runs"),
        "model": {"base": str(model)},
        "data": {"train_file": str(data), "test_file": str(test), "eval_fraction": 0.1},
        "train": {"max_steps": 4, "batch_size": 4, "save_steps": 2, "log_steps": 1, "eval_steps": 4, **train},
        "eval": {"file": str(test), "max_new_tokens": 4},
        "export": {"quantizations": ["q8_0"], "fidelity_prompts": 2, "min_agreement": 0.0},
        "serve": {"port": free_port()},
    }
    path = tmp / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


@pytest.fixture
def store(tmp_path, monkeypatch):
    monkeypatch.setenv("TUNESMITH_MODELS", str(tmp_path / "models"))
    return tmp_path / "models"


@pytest.mark.slow
def test_pipeline_runs_every_stage_then_skips_them(tmp_path, tiny_qwen3, store):
    config = _config(tmp_path, tiny_qwen3)
    env = {"TUNESMITH_MODELS": str(store)}
    done = run_cli("pipeline", "--config", str(config), "--no-serve", env=env, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    run = tmp_path / "runs" / "tiny"
    for output in ["adapter/adapter_model.safetensors", "eval.jsonl", "Modelfile", "fidelity.json", "report.html",
                   "timings.json", "gguf/tiny.q8_0.gguf"]:
        assert (run / output).exists(), output
    models = {json.loads(line)["model"] for line in (run / "eval.jsonl").read_text().splitlines()}
    assert {"base", "finetuned", str(run / "gguf" / "tiny.q8_0.gguf")} <= models
    assert "answer:" in done.stdout and "curl http://127.0.0.1:" in done.stdout
    # Every held-out prompt (4 here: fewer than pipeline.SAMPLES), each answer marked right or shown with the
    # reference it missed.
    assert done.stdout.count("answer:") == 4
    right = done.stdout.count("✓ exact match")
    assert right + done.stdout.count("✗ expected: ") == 4 and f"{right} of 4 held-out prompts answered" in done.stdout
    assert (store / "manifests").exists()
    timings = json.loads((run / "timings.json").read_text())
    assert {"data", "train", "eval", "export", "create", "serve"} <= timings.keys()
    # Export answered the held-out prompts once with each GGUF: those answers are the fidelity check and, kept in
    # fidelity.json, the eval-gguf stage's, which only scores them.
    assert "eval-gguf" in timings and "tiny.q8_0.gguf: the answers export gave to these 4 examples" in done.stdout
    rows = [json.loads(line) for line in (run / "eval.jsonl").read_text().splitlines()]
    gguf_answers = [row["answer"] for row in rows if row["model"].endswith("tiny.q8_0.gguf")]
    fidelity = json.loads((run / "fidelity.json").read_text())["quantizations"][0]
    finetuned = [row["answer"] for row in rows if row["model"] == "finetuned"]
    assert len(gguf_answers) == len(finetuned) == 4 and fidelity["n"] == 2  # export.fidelity_prompts
    assert fidelity["exact"] == sum(a == b for a, b in zip(gguf_answers[:2], finetuned[:2])) / 2

    again = run_cli("pipeline", "--config", str(config), "--no-serve", env=env, timeout=900)
    assert again.returncode == 0, again.stderr[-3000:]
    for stage in ["train", "eval", "export", "eval-gguf"]:
        assert f"✓ {stage}: complete, skipped" in again.stdout, stage


def _start(config: Path, env: dict[str, str]) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "tunesmith.cli", "pipeline", "--config", str(config), "--no-serve"],
                            cwd=ROOT, env={**os.environ, **env}, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)


def _kill_when(process: subprocess.Popen, condition, timeout: float = 600) -> None:
    deadline = time.monotonic() + timeout
    while not condition() and time.monotonic() < deadline and process.poll() is None:
        time.sleep(0.02)
    assert process.poll() is None, "the pipeline finished before the moment to kill it"
    os.kill(process.pid, signal.SIGKILL)
    process.wait()


@pytest.mark.slow
def test_killed_in_training_resumes_killed_in_export_redoes_only_export(tmp_path, tiny_qwen3, store):
    config = _config(tmp_path, tiny_qwen3, max_steps=12, save_steps=3)
    env = {"TUNESMITH_MODELS": str(store)}
    run = tmp_path / "runs" / "tiny"
    process = _start(config, env)
    _kill_when(process, lambda: (run / "checkpoints" / "step-00000006").exists())
    assert not (run / "adapter").exists()

    process = _start(config, env)
    # Kill it once export has begun (merged/ appears), i.e. after train and eval completed.
    _kill_when(process, lambda: any(run.glob("merged*")) or any(run.glob(".tmp-merged*")) or (run / "gguf").exists())
    output = process.stdout.read()
    assert "resuming from step-00000006" in output
    assert not (run / "Modelfile").exists()
    assert not list((run / "gguf").glob("*.gguf")) if (run / "gguf").exists() else True

    done = run_cli("pipeline", "--config", str(config), "--no-serve", env=env, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "✓ train: complete, skipped" in done.stdout and "✓ eval: complete, skipped" in done.stdout
    assert "▶ export" in done.stdout and (run / "Modelfile").exists()


@pytest.mark.slow
def test_full_fine_tuning_through_the_pipeline_then_skipped(tmp_path, tiny_qwen3, store):
    """train.method: full writes the whole checkpoint to model/ (no adapter/), which eval, export (no merge, no
    LoRA GGUF), create and serve use; a second run skips the completed training."""
    from safetensors.torch import load_file

    config = _config(tmp_path, tiny_qwen3, method="full", learning_rate=1e-3)
    env = {"TUNESMITH_MODELS": str(store)}
    done = run_cli("pipeline", "--config", str(config), "--no-serve", env=env, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    run = tmp_path / "runs" / "tiny"
    assert (run / "model" / "model.safetensors").is_file() and (run / "model" / "tokenizer.json").is_file()
    assert not (run / "adapter").exists() and not (run / "merged").exists()
    assert sorted(p.name for p in (run / "gguf").iterdir()) == ["tiny.q8_0.gguf"]  # no LoRA GGUF
    tuned, base = load_file(run / "model" / "model.safetensors"), load_file(tiny_qwen3 / "model.safetensors")
    key = "model.layers.1.mlp.down_proj.weight"
    assert tuned[key].dtype == base[key].dtype and (tuned[key] - base[key]).abs().max() > 1e-4  # every weight trains
    models = {json.loads(line)["model"] for line in (run / "eval.jsonl").read_text().splitlines()}
    assert {"base", "finetuned", str(run / "gguf" / "tiny.q8_0.gguf")} <= models
    assert done.stdout.count("answer:") == 4 and (store / "manifests").exists()

    again = run_cli("pipeline", "--config", str(config), "--no-serve", env=env, timeout=900)
    assert again.returncode == 0, again.stderr[-3000:]
    for stage in ["train", "eval", "export", "eval-gguf"]:
        assert f"✓ {stage}: complete, skipped" in again.stdout, stage
