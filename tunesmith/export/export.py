"""`tunesmith export`: a trained run → merged/, GGUF files, a GGUF LoRA, fidelity.json and the Modelfile.

    merge adapter → merged/ → <name>.<outtype>.gguf (llama.cpp's converter) → each quantization
    → <name>.lora.<outtype>.gguf → fidelity check → fidelity.json → Modelfile (FROM the smallest GGUF that keeps
    the merged model's accuracy: export/choice.py)

A fully fine-tuned run (`train.method: full`) has no adapter: its model/ is converted as it is (no merged/, no
LoRA GGUF). A QLoRA run's adapter is merged into the dequantized 4-bit base it was trained on (merge.py).

Every user error (no adapter, unknown quantization, unsupported architecture, unknown template family,
too little disk) is found before anything is written. Every file is written under a temporary name and
renamed; if a step fails, what this export already wrote is removed, so nothing partial is left behind.
The Modelfile is written last: it exists exactly when the export is complete.
"""

from __future__ import annotations

import json
import shutil
import struct
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rich.console import Console

from tunesmith.atomic import remove_temporaries, write_json
from tunesmith.config import Config, ExportConfig
from tunesmith.data.render import template_kwargs
from tunesmith.errors import ConfigError, ModelError, TunesmithError
from tunesmith.export import choice, convert, fidelity, merge, ollama_template, quantize
from tunesmith.inference import hf
from tunesmith.inference.cases import cases_digest, held_out_cases, load_cases, recorded_answers
from tunesmith.inference.gguf import gguf_answers
from tunesmith.llama.load import idle_cores, open_vocab
from tunesmith.llama.logliks import answer_logliks
from tunesmith.models import load_model
from tunesmith.run import Run, held_out_file
from tunesmith.scorers import exact_match
from tunesmith.serve.known_templates import FAMILIES
from tunesmith.serve.modelfile import format_value, typed_parameter


class NotEnoughDisk(TunesmithError):
    """The export's outputs would not fit on the disk."""


class FidelityFailed(TunesmithError):
    """`--strict` and a quantization fell under export.min_agreement (the files are kept)."""

    exit_code = 1


@dataclass
class ExportResult:
    run_dir: Path
    merged: Path
    ggufs: dict[str, Path]
    """Quantization name → GGUF file, in the order asked for."""
    lora: Path | None
    """The adapter alone as a GGUF LoRA; None for a fully fine-tuned run."""
    modelfile: Path
    chosen: str
    """The quantization the Modelfile's FROM points at."""
    fidelity: list[fidelity.QuantFidelity] = field(default_factory=list)
    seconds: dict[str, float] = field(default_factory=dict)

    @property
    def failed(self) -> list[str]:
        return [result.quant for result in self.fidelity if not result.passed]


def export_run(run: Run, quants: list[str] | None, console: Console, strict: bool = False,
               live: Config | None = None) -> ExportResult:
    """Export a trained run. `quants` overrides export.quantizations; `live`: the config whose export section
    this export uses (the pipeline's, or the command's --config), else the one run.json recorded (run.py)."""
    from tunesmith.models import load_tokenizer, resolve_base

    run_dir = run.dir
    config = run.config_for("export", live)
    settings = config.export
    names = quantize.check_names(settings.quantizations if quants is None else quants)
    if settings.modelfile_quant is not None and settings.modelfile_quant not in names:
        raise ConfigError(f"export.modelfile_quant {settings.modelfile_quant} is not among the quantizations made "
                          f"({', '.join(names)})", "add it to export.quantizations (or --quant), or unset it")
    full = config.train.method == "full"
    trained = run.trained_dir(config)
    if not run.trained(config):
        what = "fine-tuned model" if full else "adapter"
        raise ModelError(f"{run_dir}: the run has no trained {what} ({trained} is missing or incomplete)",
                         "run `tunesmith train` for it first")
    base = resolve_base(config.model.base, config.model.revision)
    if config.train.method == "qlora":
        merge.check_four_bit()
    convert.check_architecture(trained if full else base)
    tokenizer = load_tokenizer(trained if (trained / "tokenizer_config.json").is_file() else base)
    if settings.template is None:
        ollama_template.detect_family(getattr(tokenizer, "chat_template", None))
    for key, value in settings.parameters.items():  # Ollama refuses a Modelfile with an unknown PARAMETER
        for item in value if isinstance(value, list) else [value]:
            typed_parameter(key, format_value(item))
    check_disk(run_dir, trained if full else base, None if full else trained, names, settings.outtype)

    name = config.name
    gguf_dir = run.gguf
    remove_temporaries(run_dir, gguf_dir)  # a killed export's leftovers: they never look like outputs, but take disk
    # The Modelfile (with fidelity.json) marks a complete export; a re-export that is interrupted must not
    # leave the old marker next to new files.
    for marker in (run.modelfile, run.fidelity):
        marker.unlink(missing_ok=True)
    written: list[Path] = []
    seconds: dict[str, float] = {}
    scratch = Path(tempfile.mkdtemp(prefix=".tmp-export-", dir=run_dir))
    try:
        clock = time.perf_counter()
        if full:
            merged = trained  # the fine-tuned checkpoint itself: nothing to merge
        else:
            merged = run.merged
            check = merge.merge_adapter(base, trained, merged, settings.outtype, config.model.trust_remote_code,
                                        four_bit=config.train.method == "qlora",
                                        template_kwargs=template_kwargs(config.data))
            written.append(merged)
            seconds["merge"] = time.perf_counter() - clock
            console.print(f"export: merged adapter into {merged} ({seconds['merge']:.0f} s; its logits equal base "
                          f"+ adapter's within {check.relative:.1g} of the largest, allowed {check.tolerance:g})")

        clock = time.perf_counter()
        outtype = settings.outtype
        source = gguf_dir / f"{name}.{outtype}.gguf" if outtype in names else scratch / f"{name}.{outtype}.gguf"
        gguf_dir.mkdir(parents=True, exist_ok=True)
        convert.convert_checkpoint(merged, source, outtype)
        written.append(source)
        seconds["convert"] = time.perf_counter() - clock
        console.print(f"export: converted to {source.name} with llama.cpp's converter ({seconds['convert']:.0f} s)")

        ggufs: dict[str, Path] = {}
        for quant in names:
            clock = time.perf_counter()
            target = gguf_dir / f"{name}.{quant}.gguf"
            if target != source:
                quantize.quantize(source, target, quant)
                written.append(target)
            ggufs[quant] = target
            seconds[f"quantize {quant}"] = time.perf_counter() - clock
            console.print(f"export: {target.name} {target.stat().st_size / 2**20:.0f} MiB "
                          f"({seconds[f'quantize {quant}']:.0f} s)")

        lora = None
        if not full:
            clock = time.perf_counter()
            lora = convert.convert_lora(trained, base, gguf_dir / f"{name}.lora.{outtype}.gguf", outtype)
            written.append(lora)
            seconds["lora"] = time.perf_counter() - clock
            console.print(f"export: LoRA adapter alone as {lora.name} ({seconds['lora']:.0f} s)")

        clock = time.perf_counter()
        results, summary, picked = _fidelity(run, config, merged, tokenizer, ggufs, settings, console)
        write_json(run.fidelity, summary)
        written.append(run.fidelity)
        seconds["fidelity"] = time.perf_counter() - clock

        chosen = picked.quant
        template, system, stop = _template(tokenizer, config, settings, ggufs[chosen])
        modelfile = ollama_template.write_modelfile(run.modelfile, f"./{run.relative(ggufs[chosen])}", template,
                                               system, stop, settings.parameters)
        written.append(modelfile)
    except BaseException:
        for path in reversed(written):
            shutil.rmtree(path, ignore_errors=True) if path.is_dir() else path.unlink(missing_ok=True)
        raise
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    console.print(f"export: {modelfile} → FROM ./{run.relative(ggufs[chosen])}"
                  f"  (try: tunesmith create {name} -f {modelfile})")
    result = ExportResult(run_dir, merged, ggufs, lora, modelfile, chosen, results, seconds)
    if result.failed:
        console.print(f"[bold red]export: {', '.join(result.failed)} failed the fidelity check[/]; the Modelfile "
                      f"uses {chosen}")
        if strict:
            raise FidelityFailed(f"fidelity check failed for {', '.join(result.failed)} (--strict)",
                                 "see fidelity.json; use a larger quantization such as q8_0")
    return result


def _fidelity(run: Run, config: Any, merged: Path, tokenizer: Any, ggufs: dict[str, Path], settings: ExportConfig,
              console: Console) -> tuple[list[fidelity.QuantFidelity], dict, choice.Choice]:
    """Each GGUF answers the first export.fidelity_prompts of the held-out set (eval.file or data.test_file;
    without one, of the run's eval split), batched as the server decodes, and is compared with the merged model
    there (export/fidelity.py). The whole held-out set is answered only by the GGUFs the Modelfile's choice
    needs (export/choice.py): smallest first, until one keeps the merged model's accuracy; a larger one could not
    be chosen over it. Answering is what export spends its time on (the address example on 2 cores: ~180 s a
    GGUF for 200 answers, twice, of a 454-s export). The answers are kept in fidelity.json for `tunesmith eval`;
    the merged model's come from the eval stage when it has answered the same prompts."""
    candidates = [choice.Candidate(quant, path.stat().st_size, None) for quant, path in ggufs.items()]
    unchecked = choice.choose(candidates, None, settings.modelfile_tolerance, settings.modelfile_quant)
    if not settings.fidelity_prompts:
        console.print("[yellow]export: fidelity check skipped (export.fidelity_prompts is 0)[/]")
        return [], {"prompts": 0, "skipped": "export.fidelity_prompts is 0", "quantizations": []}, unchecked
    held_out = held_out_file(config)
    cases = (load_cases(held_out, config, config.eval.limit) if held_out
             else held_out_cases(run, settings.fidelity_prompts))
    if not cases:
        console.print("[yellow]export: fidelity check skipped (no held-out examples)[/]")
        return [], {"prompts": 0, "skipped": "no held-out examples", "quantizations": []}, unchecked
    conversations = [case.messages for case in cases]
    max_new = hf.answer_limit(tokenizer, [case.reference for case in cases], config.eval.max_new_tokens)
    n = min(settings.fidelity_prompts, len(cases))

    clock = time.perf_counter()
    model = None
    reference = recorded_answers(run.eval_rows(), "finetuned", cases) if held_out else None
    if reference is None:
        model = load_model(merged)
        model.eval()
        reference = hf.generate_batch(model, tokenizer, conversations, config, max_new)
    scored = cases[:min(n, fidelity.LOGLIK_PROMPTS)]  # the prompts of the log-likelihood gap
    pairs = list(zip(*fidelity.prompt_and_reference_ids(tokenizer, scored, config), strict=True))
    if model is None:
        model = load_model(merged)
        model.eval()
    merged_logliks = hf.answer_logliks(model, pairs)
    del model
    reference_seconds = time.perf_counter() - clock

    def first_ids(texts: list[str]) -> list[list[int]]:
        return [tokenizer(text, add_special_tokens=False)["input_ids"][:1] for text in texts]

    def accuracy(texts: list[str]) -> float:
        return sum(exact_match(text, case.reference) for text, case in zip(texts, cases, strict=True)) / len(cases)

    merged_exact_match = accuracy(reference)
    console.print(f"export: each GGUF answers {n} held-out prompts to compare with the merged model, and the "
                  f"smallest first all {len(cases)} until one keeps its exact match {choice.percent(merged_exact_match)} "
                  f"(greedy, up to {max_new} tokens, batched as the server decodes)")
    answers: dict[str, list[str]] = {}
    results: dict[str, fidelity.QuantFidelity] = {}
    settled = False  # a GGUF already keeps the accuracy (or the config names the Modelfile's): the rest need n
    for quant in scoring_order(ggufs, settings.modelfile_quant):
        path = ggufs[quant]
        whole = not settled if settings.modelfile_quant is None else quant == settings.modelfile_quant
        clock = time.perf_counter()
        answers[quant] = gguf_answers(path, config, conversations if whole else conversations[:n], max_new,
                                      tokenizer=tokenizer)
        seconds = time.perf_counter() - clock
        logliks = answer_logliks(path, pairs, n_threads=idle_cores())
        result = fidelity.compare(quant, path, reference[:n], answers[quant][:n],
                                  (first_ids(reference[:n]), first_ids(answers[quant][:n])),
                                  (merged_logliks, logliks), seconds)
        if len(answers[quant]) == len(cases):
            fidelity.judge(result, accuracy(answers[quant]), merged_exact_match, settings)
            settled = settled or (result.passed and merged_exact_match - result.exact_match
                                  <= settings.modelfile_tolerance + choice.EPSILON)
        else:
            fidelity.judge_agreement(result, settings)
        results[quant] = result
    ordered = [results[quant] for quant in ggufs]  # the table in the order asked for
    candidates = [choice.Candidate(r.quant, r.size, r.exact_match, r.passed) for r in ordered]
    picked = choice.choose(candidates, merged_exact_match, settings.modelfile_tolerance, settings.modelfile_quant)
    fidelity.print_table(ordered, console, settings, merged_exact_match, len(cases), picked)
    summary = fidelity.report(ordered, reference_seconds, n, settings.min_agreement,
                              max_exact_match_loss=settings.max_exact_match_loss,
                              merged_exact_match=merged_exact_match, examples=len(cases), choice=picked,
                              answers=answers, digest=cases_digest(cases))
    return ordered, summary, picked


def scoring_order(ggufs: dict[str, Path], named: str | None) -> list[str]:
    """The order GGUFs answer the held-out set in: the one the config names first, then the smallest first (the
    order asked for among equal sizes), so that the first one to keep the accuracy is the one the Modelfile
    serves."""
    by_size = sorted(ggufs, key=lambda quant: ggufs[quant].stat().st_size)  # stable: ties keep the asked order
    return [quant for quant in by_size if quant == named] + [quant for quant in by_size if quant != named]


def _template(tokenizer: Any, config: Any, settings: ExportConfig, gguf: Path) -> tuple[str, str | None, list[str]]:
    """(TEMPLATE, SYSTEM, stop tokens), proven against the training chat template on probe conversations.

    A user's export.template is taken as given (with the family's stop tokens when the family is known).
    """
    if settings.template is not None:
        family = FAMILIES.get(_family_or_none(tokenizer) or "")
        return settings.template, config.data.system_prompt, list(family.stop) if family else []
    vocab = open_vocab(gguf)
    adds_bos = len(vocab.tokenize(b"", add_bos=True, special=True)) > 0

    def served_ids(text: str) -> list[int]:  # as tunesmith's server (and Ollama's runner) tokenizes
        return vocab.tokenize(text.encode("utf-8"), add_bos=True, special=True)

    def hf_ids(text: str) -> list[int]:  # as training tokenized (the template writes any BOS itself)
        return tokenizer(text, add_special_tokens=False)["input_ids"]

    render = ollama_template.jinja_renderer(tokenizer, template_kwargs(config.data))
    training_system = config.data.system_prompt
    try:
        derived = ollama_template.derive(tokenizer, template_kwargs(config.data), adds_bos)
        system = training_system or derived.default_system
        ollama_template.verify(derived.template, system, render, hf_ids, served_ids, training_system=training_system)
    finally:
        vocab.close()
    return derived.template, system, derived.stop


def _family_or_none(tokenizer: Any) -> str | None:
    try:
        return ollama_template.detect_family(getattr(tokenizer, "chat_template", None))
    except TunesmithError:
        return None


# ------------------------------------------------------------------------------------------------ disk

def parameter_count(checkpoint: Path) -> int:
    """Parameters of a safetensors checkpoint, from the file headers (no tensor is read)."""
    total = 0
    files = sorted(checkpoint.glob("*.safetensors"))
    for file in files:
        with file.open("rb") as handle:
            (length,) = struct.unpack("<Q", handle.read(8))
            header = json.loads(handle.read(length))
        for key, tensor in header.items():
            if key != "__metadata__":
                count = 1
                for size in tensor["shape"]:
                    count *= size
                total += count
    if not files:  # *.bin or other formats: assume 2 bytes a parameter, a safe overestimate for fp32 files
        total = sum(path.stat().st_size for path in checkpoint.iterdir() if path.suffix in (".bin", ".pt")) // 2
    return total


def bytes_needed(parameters: int, names: list[str], outtype: str, adapter_bytes: int, merged: bool = True) -> int:
    """Disk the export writes: merged/ + the converted GGUF + each quantization + the LoRA, plus 10 %."""
    per_weight = {"f16": 2, "bf16": 2, "f32": 4}[outtype]
    gguf_bits = sum(quantize.BITS_PER_WEIGHT[name] for name in names if name != outtype)
    total = parameters * per_weight * (2 if merged else 1) + parameters * gguf_bits / 8 + adapter_bytes
    return int(total * 1.1)


def check_disk(run_dir: Path, base: Path, adapter: Path | None, names: list[str], outtype: str) -> None:
    """`adapter` None: a fully fine-tuned checkpoint (`base`), converted without a merged/ copy or a LoRA GGUF."""
    adapter_bytes = sum(path.stat().st_size for path in adapter.iterdir() if path.is_file()) if adapter else 0
    needed = bytes_needed(parameter_count(base), names, outtype, adapter_bytes, merged=adapter is not None)
    existing = run_dir
    while not existing.exists():
        existing = existing.parent
    free = shutil.disk_usage(existing).free
    if free < needed:
        raise NotEnoughDisk(f"not enough disk space in {existing}: the export needs about {needed / 1e9:.1f} GB "
                            f"({', '.join(names)} + merged/), {free / 1e9:.1f} GB are free",
                            "free some space, or export fewer quantizations with --quant")
