"""`tunesmith doctor` reports the machine and exits non-zero with a fix for each problem."""

from __future__ import annotations

from tests.conftest import run_cli


def test_doctor_on_this_machine():
    done = run_cli("doctor")
    out = done.stdout
    for needle in ["python", "torch", "cuda", "gpu", "bf16", "llama-cpp-python 0.3.36", "gguf converter",
                   "free disk", "model cache"]:
        assert needle in out, needle
    assert done.returncode == 0, out
    assert "no problems found" in out


def test_doctor_reports_a_missing_converter_with_its_fix(tmp_path):
    done = run_cli("doctor", env={"TUNESMITH_HOME": str(tmp_path)})
    assert done.returncode == 1
    assert "problem gguf converter: python -m tunesmith.export.llama_cpp install" in done.stdout
    assert "built-in smollm2-135m" in done.stdout and "built on first use" in done.stdout
    assert "built-in gemma3-270m" in done.stdout and "Gemma Terms of Use" in done.stdout
