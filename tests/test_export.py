"""`tunesmith export` with real files and real llama.cpp: outputs, fidelity, kills, and every user error."""

from __future__ import annotations

import json
import os
import shutil
import signal
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import ROOT, run_cli
from tests.test_export_support import make_run

OUTPUTS = ("merged", "gguf", "Modelfile", "fidelity.json")


def _assert_nothing_written(run: Path) -> None:
    left = [name for name in OUTPUTS if (run / name).exists()] + [p.name for p in run.glob(".tmp-*")]
    assert not left, f"export left {left} behind"


def _complete_gguf(path: Path) -> None:
    """Raises unless `path` is a whole GGUF: gguf-py maps every tensor, which fails on a truncated file."""
    from gguf import GGUFReader

    reader = GGUFReader(path)
    assert reader.tensors and path.stat().st_size >= max(t.data_offset + t.n_bytes for t in reader.tensors)


@pytest.fixture(scope="module")
def tiny_run(tiny_qwen3, tmp_path_factory) -> Path:
    return make_run(tmp_path_factory.mktemp("export"), tiny_qwen3, "tiny", system_prompt="Answer briefly.",
                    lora_b=0.05, eval={"max_new_tokens": 8}, export={"fidelity_prompts": 3})


def test_export_writes_merged_ggufs_lora_modelfile_and_fidelity(tiny_run, tiny_qwen3):
    import torch
    from llama_cpp import Llama
    from transformers import AutoModelForCausalLM

    from tunesmith.serve.modelfile import parse

    done = run_cli("export", "--run", str(tiny_run), "--quant", "q8_0,f16,q4_k_m,bf16")
    assert done.returncode == 0, done.stderr + done.stdout
    assert "fidelity vs the merged model" in done.stdout

    merged = AutoModelForCausalLM.from_pretrained(tiny_run / "merged")
    assert merged.config.dtype == torch.float16
    base = AutoModelForCausalLM.from_pretrained(tiny_qwen3)
    key = "model.layers.0.self_attn.q_proj.weight"
    moved = (merged.state_dict()[key].float() - base.state_dict()[key]).abs().max()
    assert moved > 1e-3, "the adapter was not merged in"
    assert (tiny_run / "merged" / "chat_template.jinja").is_file() or "chat_template" in json.loads(
        (tiny_run / "merged" / "tokenizer_config.json").read_text())

    names = sorted(p.name for p in (tiny_run / "gguf").iterdir())
    assert names == sorted(["tiny.q8_0.gguf", "tiny.f16.gguf", "tiny.q4_k_m.gguf", "tiny.bf16.gguf",
                            "tiny.lora.f16.gguf"])
    for name in names:
        _complete_gguf(tiny_run / "gguf" / name)
    from tunesmith.serve.gguf_meta import read_metadata

    types = {name: read_metadata(tiny_run / "gguf" / name)[0].get("general.file_type") for name in names}
    assert types["tiny.q8_0.gguf"] == 7 and types["tiny.q4_k_m.gguf"] == 15 and types["tiny.bf16.gguf"] == 32
    # The LoRA GGUF applies to the base model in llama.cpp.
    base_gguf = tiny_run.parent / "base.f16.gguf"
    from tunesmith.export.convert import convert_checkpoint

    convert_checkpoint(tiny_qwen3, base_gguf, "f16")
    Llama(model_path=str(base_gguf), lora_path=str(tiny_run / "gguf" / "tiny.lora.f16.gguf"), verbose=False,
          n_ctx=64).close()

    report = json.loads((tiny_run / "fidelity.json").read_text())
    # The smallest GGUF that passed, its exact match within 1 point of the merged model's (export/choice.py).
    fine = [q for q in report["quantizations"]
            if q["passed"] and q["exact_match"] >= report["merged_exact_match"] - 0.01]
    smallest = min(fine, key=lambda q: q["size"])["quant"]
    assert report["modelfile"]["quant"] == smallest and report["modelfile"]["reason"].startswith("the smallest within")
    assert f"the Modelfile serves {smallest}: the smallest within 1 point" in done.stdout
    modelfile = parse((tiny_run / "Modelfile").read_text())
    assert modelfile.from_ == f"./gguf/tiny.{smallest}.gguf"
    assert modelfile.system == "Answer briefly."
    assert modelfile.parameters["stop"] == ["<|im_start|>", "<|im_end|>"]
    assert modelfile.parameters["temperature"] == 0.0
    assert "<|im_start|>assistant\n" in modelfile.template

    assert report["prompts"] == report["examples"] == 3  # no test file: the first fidelity_prompts of the eval split
    assert [q["quant"] for q in report["quantizations"]] == ["q8_0", "f16", "q4_k_m", "bf16"]
    assert all(len(q["answers"]) == 3 for q in report["quantizations"])
    assert not list(tiny_run.glob(".tmp-*")) and not list((tiny_run / "gguf").glob(".tmp-*"))


def test_a_larger_gguf_answers_only_the_fidelity_prompts_once_a_smaller_one_keeps_the_accuracy(tiny_qwen3, tmp_path):
    """Answering is export's cost: the GGUFs answer the whole held-out set smallest first (not in the order asked
    for), and once one is within export.modelfile_tolerance and passes, a larger one could not be chosen, so it
    answers only the fidelity prompts. The gate is opened wide so the plan, not the random model, is tested."""
    from tests.test_export_support import QUESTIONS

    held_out = tmp_path / "test.jsonl"
    held_out.write_text("".join(json.dumps({"input": q, "output": a}) + "\n" for q, a in QUESTIONS))
    run = make_run(tmp_path, tiny_qwen3, "plan", system_prompt="Answer briefly.", lora_b=0.05,
                   eval={"max_new_tokens": 8, "file": str(held_out)},
                   export={"fidelity_prompts": 3, "modelfile_tolerance": 1.0, "max_exact_match_loss": 1.0,
                           "min_agreement": 0.0})
    done = run_cli("export", "--run", str(run), "--quant", "f16,q8_0")
    assert done.returncode == 0, done.stderr + done.stdout
    report = json.loads((run / "fidelity.json").read_text())
    assert report["examples"] == len(QUESTIONS) and report["prompts"] == 3 and report["loglik_prompts"] == 3
    quants = {q["quant"]: q for q in report["quantizations"]}
    assert list(quants) == ["f16", "q8_0"]  # the table keeps the order asked for
    assert len(quants["q8_0"]["answers"]) == len(QUESTIONS) and quants["q8_0"]["exact_match"] is not None
    assert len(quants["f16"]["answers"]) == 3 and quants["f16"]["exact_match"] is None
    assert quants["f16"]["n"] == 3 and quants["f16"]["passed"]
    assert report["modelfile"]["quant"] == "q8_0"
    assert (run / "Modelfile").read_text().startswith("FROM ./gguf/plan.q8_0.gguf\n")
    assert "not needed" in done.stdout
    # The pipeline's eval-gguf stage scores q8_0 alone, from the answers export kept: f16 is not answered again.
    from tunesmith.evaluate.compare import gguf_models, scored_gguf_models
    from tunesmith.run import Run

    assert scored_gguf_models(Run(run)) == [str(run / "gguf" / "plan.q8_0.gguf")]
    assert len(gguf_models(Run(run))) == 2


def test_fidelity_check_catches_a_broken_quantization(builtin_checkpoint, tmp_path):
    """The built-in 135M model answers garbage at q4_0 (seen on "What is the capital of France?")."""
    run = make_run(tmp_path, builtin_checkpoint, "small", eval={"max_new_tokens": 8},
                   export={"fidelity_prompts": 4})
    done = run_cli("export", "--run", str(run), "--quant", "q4_0,f16", "--strict", timeout=900)
    assert done.returncode == 1, done.stderr + done.stdout
    assert "fidelity check failed for q4_0" in done.stderr
    report = {q["quant"]: q for q in json.loads((run / "fidelity.json").read_text())["quantizations"]}
    assert report["f16"]["passed"] and report["f16"]["exact"] >= 0.8
    assert not report["q4_0"]["passed"] and report["q4_0"]["exact"] < 0.8
    assert report["q4_0"]["loglik_gap"] > report["f16"]["loglik_gap"]
    # q4_0 was asked for first, but the Modelfile points at the passing f16.
    assert (run / "Modelfile").read_text().startswith("FROM ./gguf/small.f16.gguf\n")


def _spawn(run: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "tunesmith.cli", "export", "--run", str(run), "--quant",
                             "f16,q8_0"], cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)


def _kill_when(process: subprocess.Popen, ready, what: str) -> None:
    deadline = time.monotonic() + 240
    while not ready():
        assert process.poll() is None, f"export ended before {what}"
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.005)
    os.killpg(process.pid, signal.SIGKILL)  # the whole group: the converter child dies too
    process.wait()


def _no_complete_looking_file(run: Path) -> None:
    from transformers import AutoModelForCausalLM

    if (run / "merged").exists():
        AutoModelForCausalLM.from_pretrained(run / "merged")
    for path in (run / "gguf").glob("*.gguf") if (run / "gguf").exists() else []:
        _complete_gguf(path)
    if (run / "Modelfile").exists():
        assert (run / "fidelity.json").exists()
        from tunesmith.serve.modelfile import parse

        assert (run / parse((run / "Modelfile").read_text()).from_).exists()


def test_sigkill_during_export_leaves_no_file_that_looks_complete(tiny_qwen3, tmp_path):
    run = make_run(tmp_path, tiny_qwen3, "killed", lora_b=0.05, eval={"max_new_tokens": 8},
                   export={"fidelity_prompts": 2})
    moments = {
        "merging": lambda: any(run.glob(".tmp-merged-*")) or (run / "merged").exists(),
        "converting": lambda: (run / "gguf").is_dir() and any((run / "gguf").glob(".tmp-*")),
        "quantizing": lambda: (run / "gguf" / "killed.f16.gguf").exists(),
        "checking fidelity": lambda: (run / "gguf" / "killed.lora.f16.gguf").exists(),
    }
    for what, ready in moments.items():
        _kill_when(_spawn(run), ready, what)
        _no_complete_looking_file(run)
        assert not (run / "Modelfile").exists(), f"killed while {what}, yet the export looks complete"
    done = run_cli("export", "--run", str(run), "--quant", "f16,q8_0")
    assert done.returncode == 0, done.stderr
    _no_complete_looking_file(run)
    assert not list(run.glob(".tmp-*")) and not list((run / "gguf").glob(".tmp-*")), "stale temporaries kept"


# ------------------------------------------------------------------------------------------------ errors

def _retarget(run: Path, base: Path) -> None:
    record = json.loads((run / "run.json").read_text())
    record["config"]["model"]["base"] = str(base)
    (run / "run.json").write_text(json.dumps(record))


def _sparse_checkpoint(source: Path, out: Path, parameters: int) -> Path:
    """A checkpoint whose one bf16 tensor has `parameters` elements, in a sparse file (no disk used)."""
    out.mkdir()
    shutil.copy(source / "config.json", out / "config.json")
    header = json.dumps({"huge": {"dtype": "BF16", "shape": [parameters], "data_offsets": [0, 2 * parameters]}})
    header += " " * (-len(header) % 8)
    with (out / "model.safetensors").open("wb") as handle:
        handle.write(struct.pack("<Q", len(header)) + header.encode())
        handle.truncate(8 + len(header) + 2 * parameters)
    return out


def _error_run(kind: str, tmp: Path, tiny: Path) -> tuple[Path, list[str], str]:
    """(run, extra CLI args, expected message) for one user error."""
    from tunesmith.testing import tiny_checkpoint

    export = {"parameters": {"temprature": 0.5}} if kind == "parameter" else (
        {"modelfile_quant": "q6_k"} if kind == "modelfile-quant" else {})
    run = make_run(tmp, tiny, kind, export=export, train={"method": "qlora"} if kind == "qlora-on-cpu" else {})
    if kind == "qlora-on-cpu":  # the adapter belongs to the 4-bit base: merging needs what training needed
        return run, [], "trained with train.method: qlora"
    if kind == "parameter":
        return run, [], "unknown parameter 'temprature'"
    if kind == "no-adapter":
        shutil.rmtree(run / "adapter")
        return run, [], "the run has no trained adapter"
    if kind == "unknown-quant":
        return run, ["--quant", "q8_0,q4_k_x"], "unknown quantization q4_k_x; valid: f32, f16, bf16, q8_0"
    if kind == "modelfile-quant":
        return run, [], "export.modelfile_quant q6_k is not among the quantizations made (q4_k_m, q8_0)"
    if kind == "architecture":
        strange = tmp / "strange"
        shutil.copytree(tiny, strange)
        config = json.loads((strange / "config.json").read_text())
        config["architectures"] = ["TunesmithTestForCausalLM"]
        (strange / "config.json").write_text(json.dumps(config))
        _retarget(run, strange)
        return run, [], "does not support the architecture TunesmithTestForCausalLM"
    if kind == "disk":
        # As many bf16 parameters as the disk has free bytes / 2: merged/ alone would fill it; the sparse
        # file claiming them takes no space.
        _retarget(run, _sparse_checkpoint(tiny, tmp / "huge", shutil.disk_usage(tmp).free // 2))
        return run, [], "not enough disk space"
    if kind == "template":
        zephyr = "{% for m in messages %}<|{{ m.role }}|>\n{{ m.content }}</s>\n{% endfor %}"
        other = tiny_checkpoint(tmp / "zephyr", "qwen3", chat_template=zephyr)
        shutil.rmtree(run)
        run = make_run(tmp, other, kind)
        return run, [], "no family tunesmith knows"
    raise AssertionError(kind)


@pytest.mark.parametrize("kind", ["no-adapter", "unknown-quant", "modelfile-quant", "architecture", "disk", "template",
                                  "parameter", "qlora-on-cpu"])
def test_user_errors_are_one_line_exit_2_and_write_nothing(kind, tiny_qwen3, tmp_path):
    run, args, expected = _error_run(kind, tmp_path, tiny_qwen3)
    done = run_cli("export", "--run", str(run), *args)
    assert done.returncode == 2, done.stderr + done.stdout
    assert expected in done.stderr
    first, *rest = done.stderr.strip().splitlines()
    assert first.startswith("error: ") and all(line.startswith("  hint: ") for line in rest), done.stderr
    assert "Traceback" not in done.stderr
    _assert_nothing_written(run)
    if kind == "architecture":
        assert "LlamaForCausalLM" in done.stderr and "Qwen3ForCausalLM" in done.stderr
    if kind == "template":
        assert "export.template" in done.stderr


def test_merged_model_computes_what_base_plus_adapter_computes(tiny_qwen3, tmp_path):
    """The merge is checked by outputs: logits of merged/ (float32) equal the PEFT model's on prompts it never
    saw, within merge.TOLERANCE (1e-4 of the largest logit); the f16 merge within f16 rounding (5e-3)."""
    import torch
    from peft import PeftModel

    from tunesmith.export import merge
    from tunesmith.models import load_model, load_tokenizer

    run = make_run(tmp_path, tiny_qwen3, "merge", lora_b=0.05)
    tokenizer = load_tokenizer(tiny_qwen3)
    prompts = [tokenizer(text, add_special_tokens=False)["input_ids"]
               for text in ("Once upon a time", "速度:静止 belt: off", "1 2 3 4 5 6 7 8")]
    peft_model = PeftModel.from_pretrained(load_model(tiny_qwen3), run / "adapter")
    expected = merge.logits(peft_model, prompts)
    base = merge.logits(load_model(tiny_qwen3), prompts)
    assert max(float((a - b).abs().max()) for a, b in zip(expected, base)) > 0.05, "the adapter changes nothing"
    for outtype, tolerance in (("f32", merge.TOLERANCE), ("f16", 5e-3)):
        check = merge.merge_adapter(tiny_qwen3, run / "adapter", tmp_path / outtype, outtype)
        assert check.relative <= merge.TOLERANCE  # the float32 merge, before the cast to outtype
        merged = load_model(tmp_path / outtype, dtype=torch.float32)
        got = merge.logits(merged, prompts)
        scale = max(float(a.abs().max()) for a in expected)
        assert max(float((a - b).abs().max()) for a, b in zip(expected, got)) <= tolerance * scale, outtype


def test_merge_check_fails_when_the_merged_model_computes_something_else():
    import torch

    from tunesmith.export import merge

    expected = [torch.tensor([[1.0, -4.0, 2.0]])]
    assert merge.check_logits(expected, [torch.tensor([[1.0, -4.0, 2.0002]])], merge.TOLERANCE).relative < 1e-4
    with pytest.raises(merge.MergeMismatch, match="differ from base"):
        merge.check_logits(expected, [torch.tensor([[1.0, -4.0, 2.01]])], merge.TOLERANCE)
    with pytest.raises(merge.MergeMismatch):
        merge.check_logits(expected, [torch.tensor([[1.0, float("nan"), 2.0]])], merge.TOLERANCE)


def _children(pid: int, script: str) -> list[int]:
    """Processes whose parent is `pid` and whose command line names `script`."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            command = (entry / "cmdline").read_bytes()
        except OSError:
            continue
        if int(stat.rsplit(")", 1)[1].split()[1]) == pid and script.encode() in command:
            found.append(int(entry.name))
    return found


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def test_a_sigkilled_export_takes_llama_cpps_converter_with_it(tiny_qwen3, tmp_path):
    run = make_run(tmp_path, tiny_qwen3, "orphan", lora_b=0.05, eval={"max_new_tokens": 8},
                   export={"fidelity_prompts": 2})
    process = _spawn(run)
    converters: list[int] = []
    try:
        deadline = time.monotonic() + 240
        while not converters:
            assert process.poll() is None and time.monotonic() < deadline, "the export never started converting"
            converters = _children(process.pid, "convert_hf_to_gguf.py")
            time.sleep(0.005)
        # Held still, so it cannot finish on its own while we look: only its parent's death can end it now.
        os.kill(converters[0], signal.SIGSTOP)
        os.kill(process.pid, signal.SIGKILL)  # the export alone, as the OOM killer would, not its process group
        process.wait()
        deadline = time.monotonic() + 60
        while _alive(converters[0]):
            assert time.monotonic() < deadline, "llama.cpp's converter outlived the export that started it"
            time.sleep(0.05)
    finally:
        for pid in converters:
            if _alive(pid):
                os.kill(pid, signal.SIGKILL)


def test_a_full_disk_during_export_is_one_line_and_leaves_nothing_that_looks_complete(tiny_qwen3, tmp_path,
                                                                                       capsys):
    from tests.disk import leave_free, small_disk
    from tunesmith.cli import main
    from tunesmith.export.export import bytes_needed, parameter_count

    with small_disk(tmp_path / "disk", "64m") as disk:
        run = make_run(disk, tiny_qwen3, "full", lora_b=0.05, eval={"max_new_tokens": 8},
                       export={"fidelity_prompts": 2})
        adapter = sum(path.stat().st_size for path in (run / "adapter").iterdir())
        # Enough for the export's own estimate, so its check before starting passes; the estimate leaves out the
        # tokenizer that merged/ and every GGUF carry, so the disk fills on the way.
        leave_free(disk, bytes_needed(parameter_count(tiny_qwen3), ["f16", "q8_0"], "f16", adapter) + (256 << 10))
        assert main(["export", "--run", str(run), "--quant", "f16,q8_0"]) == 2
        err = capsys.readouterr().err  # in this process it also holds llama.cpp's log, which a terminal never sees
        errors = [line for line in err.splitlines() if line.startswith("error: ")]
        assert len(errors) == 1 and errors[0].startswith(f"error: {run}/") and ": the disk is full" in errors[0], err
        assert not (run / "Modelfile").exists() and not (run / "merged").exists()
        assert not list(run.glob(".tmp-*")) and not list(run.glob("gguf/*")), "the export left files behind"
