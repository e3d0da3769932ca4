"""`tunesmith doctor`: what this machine has for fine-tuning and serving, and a one-line fix for each problem."""

from __future__ import annotations

import platform
import shutil
import sys
from dataclasses import dataclass
from importlib import metadata

from rich.console import Console
from rich.table import Table

from tunesmith import paths

MIN_FREE_GB = 5.0


@dataclass
class Check:
    name: str
    value: str
    fix: str | None = None
    """Set when this is a problem: the one line that fixes it."""


def run_checks() -> list[Check]:
    checks = [_python()]
    checks += _torch()
    checks += _llama_cpp()
    checks.extend(_builtins())
    checks.append(_disk())
    checks.append(_store())
    return checks


def print_report(checks: list[Check], console: Console) -> int:
    table = Table(title="tunesmith doctor", show_lines=False)
    table.add_column("check")
    table.add_column("status")
    for check in checks:
        mark = "[red]✗[/]" if check.fix else "[green]✓[/]"
        table.add_row(check.name, f"{mark} {check.value}")
    console.print(table)
    problems = [check for check in checks if check.fix]
    for check in problems:
        console.print(f"[red]problem[/] {check.name}: {check.fix}", highlight=False, soft_wrap=True)
    if not problems:
        console.print("[green]no problems found[/]")
    return len(problems)


def _version(package: str) -> str | None:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def _python() -> Check:
    version = platform.python_version()
    fix = None if sys.version_info >= (3, 11) else "tunesmith needs Python 3.11 or newer"
    return Check("python", f"{version} ({sys.executable})", fix)


def _torch() -> list[Check]:
    try:
        import torch
    except ImportError:
        return [Check("torch", "not installed", "run `make demo` (it installs torch 2.13.0)")]
    checks = [Check("torch", torch.__version__)]
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        count = torch.cuda.device_count()
        checks.append(Check("cuda", f"available: {torch.version.cuda}, {count} GPU(s)"))
        checks.append(Check("gpu", f"{props.name}, {props.total_memory / 2**30:.1f} GiB"))
        bf16 = torch.cuda.is_bf16_supported()
        checks.append(Check("bf16", "supported" if bf16 else "not supported (training uses fp16)"))
        if not _version("bitsandbytes"):
            checks.append(Check("bitsandbytes", "not installed: train.optimizer adamw_8bit falls back to AdamW, "
                                "train.method: qlora stops with an error",
                                "pip install 'tunesmith[gpu]' (bitsandbytes==0.50.2)"))
    else:
        # Not a problem: tunesmith trains on CPU too, only slower.
        checks.append(Check("cuda", "not available: training runs on the CPU"))
        checks.append(Check("gpu", "none"))
        from tunesmith.train.loss import cpu_has_bf16

        checks.append(Check("bf16", "CPU has AMX/AVX512-BF16: training computes in bf16" if cpu_has_bf16()
                            else "CPU without bf16 instructions: training uses fp32"))
    return checks


def _llama_cpp() -> list[Check]:
    from tunesmith.export import llama_cpp

    version = _version("llama-cpp-python")
    if not version:
        return [Check("llama.cpp", "llama-cpp-python not installed", "run `make demo` (it builds llama-cpp-python)")]
    checks = [Check("llama.cpp", f"llama-cpp-python {version}")]
    directory = llama_cpp.converter_dir(version)
    if llama_cpp.is_installed(version):
        checks.append(Check("gguf converter", f"cached in {directory}"))
    else:
        checks.append(Check("gguf converter", f"missing from {directory}",
                            "python -m tunesmith.export.llama_cpp install"))
    return checks


def _builtins() -> list[Check]:
    """One line per built-in base model: ready or built on first use, and where its weights come from."""
    from tunesmith.models import builtin

    checks = []
    for spec in builtin.BUILTINS.values():
        label = f"built-in {spec.name}"
        if not _version(spec.package):
            checks.append(Check(label, f"{spec.package} not installed ({spec.origin})", "make demo"))
        elif (builtin.builtin_dir(spec.name) / builtin.COMPLETE_MARKER).exists():
            checks.append(Check(label, f"ready in {builtin.builtin_dir(spec.name)}; {spec.origin}"))
        else:
            checks.append(Check(label, f"built on first use (30-60 s); {spec.origin}"))
    return checks


def _disk() -> Check:
    home = paths.home()
    probe = home if home.exists() else home.parent
    while not probe.exists():
        probe = probe.parent
    free = shutil.disk_usage(probe).free / 2**30
    fix = None if free >= MIN_FREE_GB else f"free some disk: {free:.1f} GiB left under {probe}, {MIN_FREE_GB:.0f} needed"
    return Check("free disk", f"{free:.1f} GiB at {probe}", fix)


def _store() -> Check:
    manifests = paths.models_dir() / "manifests"
    count = sum(1 for _ in manifests.glob("*/*.json")) if manifests.exists() else 0
    return Check("model cache", f"{paths.home()} ({count} model(s) in the store)")
