"""The built-in base model: materialized once, atomically, and it still knows the capital of France."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tunesmith.errors import ModelError
from tunesmith.models import load_model, load_tokenizer, resolve_base
from tunesmith.models.builtin import COMPLETE_MARKER

QUESTION = [{"role": "user", "content": "What is the capital of France?"}]
MATERIALIZE = "import sys; from tunesmith.models import resolve_base; print(resolve_base(sys.argv[1]))"


def _greedy_answer(checkpoint: Path) -> str:
    tokenizer = load_tokenizer(checkpoint)
    model = load_model(checkpoint)
    inputs = tokenizer.apply_chat_template(QUESTION, add_generation_prompt=True, return_tensors="pt",
                                           return_dict=True)
    output = model.generate(**inputs, max_new_tokens=16, do_sample=False)
    return tokenizer.decode(output[0][inputs["input_ids"].shape[1]:], skip_special_tokens=True)


def _greedy_completion(checkpoint: Path) -> str:
    """Gemma 3 270M is a pretrained (base) model: asked as a text to continue, not as a chat."""
    tokenizer = load_tokenizer(checkpoint)
    model = load_model(checkpoint)
    inputs = tokenizer("Question: What is the capital of France?\nAnswer:", return_tensors="pt")
    output = model.generate(**inputs, max_new_tokens=4, do_sample=False)
    return tokenizer.decode(output[0][inputs["input_ids"].shape[1]:], skip_special_tokens=True)


@pytest.mark.slow
@pytest.mark.parametrize("name, answer, extra", [
    ("smollm2-135m", _greedy_answer, set()),
    # Gemma's SentencePiece model, rebuilt from the GGUF so that llama.cpp's converter writes the original vocabulary
    ("gemma3-270m", _greedy_completion, {"tokenizer.model"}),
])
def test_crash_mid_materialization_leaves_nothing_that_loads_then_a_rerun_completes(tmp_path, name, answer, extra):
    env = {**os.environ, "TUNESMITH_HOME": str(tmp_path)}
    target = tmp_path / "base" / name
    command = [sys.executable, "-c", MATERIALIZE, f"builtin:{name}"]
    process = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    # Kill it once it has started writing its temporary directory, i.e. mid-conversion.
    deadline = time.monotonic() + 120
    while not list((tmp_path / "base").glob(f".tmp-{name}-*")) and time.monotonic() < deadline:
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert list((tmp_path / "base").glob(f".tmp-{name}-*")), "killed before it began writing"
    assert not target.exists(), "a killed materialization left a directory under the final name"

    done = subprocess.run(command, check=False, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr
    assert (target / COMPLETE_MARKER).exists()
    assert not list((tmp_path / "base").glob(".tmp-*")), "stale temporary directory kept"
    assert {p.name for p in target.iterdir()} == {"config.json", "generation_config.json", "model.safetensors",
                                                  "tokenizer.json", "tokenizer_config.json", "chat_template.jinja",
                                                  COMPLETE_MARKER} | extra
    assert "Paris" in answer(target)


def test_builtin_answers_paris_in_transformers_and_through_llama_cpp(builtin_checkpoint, tmp_path):
    """The materialized checkpoint answers Paris, and so does llama.cpp on an f16 GGUF converted from it.

    (llama.cpp on the package's original Q4_1 file answers garbage with this build: 8-bit activations
    times 4-bit weights are too coarse for a 135M model. That is why export has a fidelity check.)
    """
    from llama_cpp import Llama

    from tunesmith.export import llama_cpp

    assert "Paris" in _greedy_answer(builtin_checkpoint)
    gguf = tmp_path / "smollm2.f16.gguf"
    done = llama_cpp.run("convert_hf_to_gguf.py", [str(builtin_checkpoint), "--outfile", str(gguf), "--outtype", "f16"])
    assert done.returncode == 0, done.stderr[-2000:]
    llm = Llama(model_path=str(gguf), n_ctx=256, verbose=False, seed=0)
    reply = llm.create_chat_completion(messages=QUESTION, max_tokens=16, temperature=0.0)
    assert "Paris" in reply["choices"][0]["message"]["content"]


def test_checkpoint_carries_the_chat_template(builtin_checkpoint):
    tokenizer = load_tokenizer(builtin_checkpoint)
    text = tokenizer.apply_chat_template(QUESTION, add_generation_prompt=True, tokenize=False)
    assert text.endswith("<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n")


def test_local_directory_and_bad_specs(builtin_checkpoint, tmp_path):
    assert resolve_base(str(builtin_checkpoint)) == builtin_checkpoint
    with pytest.raises(ModelError, match="unknown built-in 'builtin:nope'"):
        resolve_base("builtin:nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelError, match="no config.json"):
        resolve_base(str(tmp_path / "empty"))
    with pytest.raises(ModelError, match="neither an existing directory nor a hub id"):
        resolve_base("not a model")


def test_hub_id_without_network_says_so_and_names_the_offline_alternatives(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HOME", str(tmp_path))  # an empty hub cache, so nothing is found locally
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # what a machine with no network ends up at, without waiting
    with pytest.raises(ModelError) as info:
        resolve_base("Qwen/Qwen3-0.6B")
    assert "hub is unreachable" in info.value.message
    assert "builtin:smollm2-135m" in info.value.hint


def test_tiny_models_load_and_generate(tiny_qwen3, tiny_llama):
    for checkpoint, model_type in [(tiny_qwen3, "qwen3"), (tiny_llama, "llama")]:
        model = load_model(checkpoint)
        assert model.config.model_type == model_type and model.config.num_hidden_layers == 2
        tokenizer = load_tokenizer(checkpoint)
        ids = tokenizer("hello", return_tensors="pt")
        assert model.generate(**ids, max_new_tokens=3, do_sample=False).shape[1] == ids["input_ids"].shape[1] + 3
