"""Which config a stage after training uses (tunesmith/run.py): its own section from the live config, the rest from
run.json. An edited `export.quantizations` takes effect on `pipeline --force export` and `tunesmith export`, and
the server the pipeline starts gets the pipeline's serve section."""

from __future__ import annotations

import json
from pathlib import Path

import ollama
import pytest
import yaml

from tests.conftest import run_cli
from tests.serve_fixtures import add_smol, free_port
from tests.test_export_support import QUESTIONS, make_run
from tunesmith.config import ServeConfig
from tunesmith.local_server import server_at
from tunesmith.run import Run
from tunesmith.serve import client
from tunesmith.serve.store import Store

SECRET = "pipeline-serve-secret"


def _files(tmp: Path) -> dict:
    train, test = tmp / "train.jsonl", tmp / "test.jsonl"
    train.write_text("".join(json.dumps({"input": q, "output": a}) + "\n" for q, a in QUESTIONS * 3))
    test.write_text("".join(json.dumps({"input": q, "output": a}) + "\n" for q, a in QUESTIONS[:3]))
    return {"train_file": str(train), "test_file": str(test)}


@pytest.mark.slow
def test_force_export_after_editing_the_quantizations_uses_the_new_ones(tmp_path, tiny_qwen3, monkeypatch):
    monkeypatch.setenv("TUNESMITH_MODELS", str(tmp_path / "models"))
    sections = {"data": _files(tmp_path), "eval": {"max_new_tokens": 4},
                "export": {"quantizations": ["q8_0"], "fidelity_prompts": 2, "min_agreement": 0.0}}
    run = Run(make_run(tmp_path, tiny_qwen3, "tiny", lora_b=0.05, **sections))  # trained with q8_0 recorded
    config = {"name": "tiny", "runs_dir": str(tmp_path / "runs"), "model": {"base": str(tiny_qwen3)}, **sections,
              "serve": {"port": free_port(), "api_key": SECRET}}
    config["export"] = {**config["export"], "quantizations": ["f16"]}  # the edit after training
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))

    done = run_cli("pipeline", "--config", str(path), "--force", "export", "--no-serve", timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "✓ train: complete, skipped" in done.stdout
    assert [p.name for p in run.ggufs()] == ["tiny.f16.gguf"]
    assert "FROM ./gguf/tiny.f16.gguf" in run.modelfile.read_text()
    assert [q["quant"] for q in json.loads(run.fidelity.read_text())["quantizations"]] == ["f16"]
    assert f"export: using export.quantizations=['f16'] from the config ({run.record} has ['q8_0'])" in done.stderr
    # The server it started has the serve section's key (the next test), and the pipeline's requests carried it.
    assert "of 3 held-out prompts answered exactly as expected" in done.stdout

    # `tunesmith export` with --set alone edits the run's recorded config (its other export settings stay).
    again = run_cli("export", "--run", str(run.dir), "--set", "export.quantizations=[q8_0]", timeout=900)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    assert "FROM ./gguf/tiny.q8_0.gguf" in run.modelfile.read_text()
    assert json.loads(run.fidelity.read_text())["prompts"] == 2  # export.fidelity_prompts as recorded
    # With neither, run.json's settings: q8_0 again, and nothing said about a difference.
    plain = run_cli("export", "--run", str(run.dir), "--quant", "q8_0", timeout=900)
    assert plain.returncode == 0 and "from the config" not in plain.stderr, plain.stderr[-3000:]


def test_the_server_started_for_the_pipeline_gets_its_serve_section(tmp_path, smollm2_gguf, monkeypatch):
    """Not only host and port: num_ctx (the context each loaded model gets) and the API key reach it."""
    add_smol(Store(tmp_path / "models"), smollm2_gguf)
    monkeypatch.setenv("TUNESMITH_HOME", str(tmp_path))
    monkeypatch.delenv("TUNESMITH_API_KEY", raising=False)
    host = f"127.0.0.1:{free_port()}"
    with server_at(host, ServeConfig(num_ctx=1024, api_key=SECRET)) as server:
        assert server is not None
        assert not client.heartbeat(host) and client.heartbeat(host, SECRET)  # it wants the key
        ollama.Client(host=host, headers={"Authorization": f"Bearer {SECRET}"}).generate(model="smol", prompt="")
        assert client.ps(host, SECRET)[0]["context_length"] == 1024
    assert not client.heartbeat(host, SECRET)  # stopped with the block
