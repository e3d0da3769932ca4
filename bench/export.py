"""Export of the built-in-size model (SmolLM2-135M + a LoRA adapter): merge, convert, quantize f16 + q8_0 + q4_k_m.

    .venv/bin/python bench/export.py [--repeats 2] [--quant f16,q8_0,q4_k_m] [--no-record]

Builds a run folder in a temporary directory (run.json, a LoRA adapter r=16 on the 7 projections with
non-zero B, no held-out data), then times `tunesmith.export.export_run` with the fidelity check off
(export.fidelity_prompts: 0), stage by stage. The issue's bound: merge + convert + quantize < 60 s on
2 cores. Appends a table to bench/RESULTS.md (section "Export (issue 5)") unless --no-record.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from importlib import metadata
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def make_run(tmp: Path) -> Path:
    import torch

    from tunesmith.config import Config
    from tunesmith.models import load_model, load_tokenizer, resolve_base
    from tunesmith.train.lora import apply_lora

    config = Config.model_validate({"name": "bench", "runs_dir": str(tmp / "runs"),
                                    "export": {"fidelity_prompts": 0}})
    run = config.run_dir
    run.mkdir(parents=True)
    (run / "run.json").write_text(json.dumps({"config": config.model_dump(mode="json")}))
    base = resolve_base(config.model.base)
    model = apply_lora(load_model(base), config.lora, seed=0)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "lora_B" in name:
                parameter.normal_(0, 0.01)
    model.save_pretrained(run / "adapter")
    load_tokenizer(base).save_pretrained(run / "adapter")
    return run


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--quant", default="f16,q8_0,q4_k_m")
    parser.add_argument("--no-record", action="store_true")
    args = parser.parse_args()

    from rich.console import Console

    from tunesmith.export import export_run
    from tunesmith.run import Run

    quants = args.quant.split(",")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        run = make_run(Path(tmp))
        for repeat in range(1, args.repeats + 1):
            load = os.getloadavg()[0]
            started = time.perf_counter()
            result = export_run(Run(run), quants, Console(quiet=True))
            total = time.perf_counter() - started
            s = result.seconds
            core = s["merge"] + s["convert"] + sum(v for k, v in s.items() if k.startswith("quantize"))
            rows.append((repeat, s["merge"], s["convert"], sum(v for k, v in s.items() if k.startswith("quantize")),
                         core, s["lora"], total, load))
    header = "| run | merge s | convert s | quantize s | merge+convert+quantize s | LoRA GGUF s | export total s | load |"
    lines = [header, "|" + "---|" * 8]
    lines += [f"| {r[0]} | {r[1]:.1f} | {r[2]:.1f} | {r[3]:.1f} | **{r[4]:.1f}** | {r[5]:.1f} | {r[6]:.1f} | {r[7]:.1f} |"
              for r in rows]
    table = "\n".join(lines)
    print(table)
    if args.no_record:
        return
    versions = ", ".join(f"{name} {metadata.version(name)}" for name in
                         ("llama-cpp-python", "torch", "transformers", "peft"))
    text = (f"\n### {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}: {', '.join(quants)}, fidelity off\n\n"
            f"Machine: {platform.machine()}, {os.cpu_count()} cores, {platform.processor() or 'cpu'}, no GPU; "
            f"Python {platform.python_version()}, {versions}.\n\n"
            f"    .venv/bin/python bench/export.py --repeats {args.repeats} --quant {args.quant}\n\n{table}\n")
    results = ROOT / "bench" / "RESULTS.md"
    content = results.read_text(encoding="utf-8")
    marker = "## Export (issue 5)"
    if marker not in content:
        content = content.rstrip("\n") + (
            f"\n\n{marker}\n\nSmolLM2-135M (the built-in) + a LoRA adapter r=16 on 7 projections: `export_run` "
            "with the fidelity check off, f16 merged checkpoint. `load` is the 1-minute load average at the start "
            "(other engineers' jobs share the 2 cores).\n")
    start = content.index(marker)
    following = content.find("\n## ", start + len(marker))
    end = len(content) if following < 0 else following
    content = content[:end].rstrip("\n") + "\n" + text + content[end:]
    results.write_text(content, encoding="utf-8")


if __name__ == "__main__":
    main()
