"""llama.cpp's GGUF converter scripts, taken from the pinned llama-cpp-python source distribution.

The scripts (`convert_hf_to_gguf.py`, `convert_lora_to_gguf.py`, `conversion/`, `gguf-py/`) must match the
llama.cpp compiled into the installed bindings, so they come from the same version's sdist, extracted once
into `$TUNESMITH_HOME/llama.cpp/<version>/`. Nothing of llama.cpp lives in this repository.

The same sdist carries llama.cpp's own test assets: real chat templates (`models/templates/*.jinja`) and
vocabulary-only GGUFs with tokenizer test vectors (`models/ggml-vocab-*.gguf` + `.inp`/`.out`). `ensure_models()`
extracts the few tunesmith's tests use into `$TUNESMITH_HOME/llama.cpp/<version>/models/` on first use.

    python -m tunesmith.export.llama_cpp install [SDIST]   # what `make` runs at set-up
"""

from __future__ import annotations

import os
import subprocess
import sys
import tarfile
import tempfile
from importlib import metadata
from pathlib import Path

from tunesmith import paths
from tunesmith.atomic import atomic_path
from tunesmith.children import die_with_parent
from tunesmith.errors import ToolingError

PACKAGE = "llama-cpp-python"
SCRIPTS = ("convert_hf_to_gguf.py", "convert_lora_to_gguf.py")
PACKAGES = ("conversion/", "gguf-py/")
COMPLETE_MARKER = ".tunesmith-complete"
# llama.cpp's test assets that tunesmith's tests use (tunesmith/testing.py): every chat template, and the
# vocabularies (with their test vectors) of the families verified end to end.
MODEL_ASSETS = ("models/templates/",) + tuple(
    f"models/ggml-vocab-{name}.gguf{suffix}" for name in ("qwen2", "llama-bpe") for suffix in ("", ".inp", ".out"))
_FIX = "run `make demo` (or `python -m tunesmith.export.llama_cpp install`) to extract them"


def bindings_version() -> str:
    try:
        return metadata.version(PACKAGE)
    except metadata.PackageNotFoundError as exc:
        raise ToolingError(f"{PACKAGE} is not installed", "run `make demo` to build it") from exc


def converter_dir(version: str | None = None) -> Path:
    return paths.llama_cpp_dir(version or bindings_version())


def is_installed(version: str | None = None) -> bool:
    return (converter_dir(version) / COMPLETE_MARKER).exists()


def ensure_converter() -> Path:
    """The converter directory for the installed bindings; extracted on first use if the sdist can be had."""
    if not is_installed():
        install()
    return converter_dir()


def install(sdist: Path | None = None, version: str | None = None) -> Path:
    version = version or bindings_version()
    target = converter_dir(version)
    if (target / COMPLETE_MARKER).exists():
        return target
    with tempfile.TemporaryDirectory() as scratch:
        sdist = sdist or _find_sdist(version) or _download_sdist(version, Path(scratch))
        with atomic_path(target, directory=True) as tmp:
            _extract(sdist, version, tmp)
            (tmp / COMPLETE_MARKER).write_text(f"{sdist.name}\n")
    return target


def models_dir(version: str | None = None) -> Path:
    return converter_dir(version) / "models"


def ensure_models() -> Path:
    """llama.cpp's `models/` test assets (MODEL_ASSETS) for the installed bindings, extracted on first use."""
    version = bindings_version()
    target = models_dir(version)
    if (target / COMPLETE_MARKER).exists():
        return target
    with tempfile.TemporaryDirectory() as scratch:
        sdist = _find_sdist(version) or _download_sdist(version, Path(scratch))
        with atomic_path(target, directory=True) as tmp:
            found = _extract_members(sdist, version, tmp, MODEL_ASSETS, strip="models/")
            if sum(not name.startswith("templates/") for name in found) != len(MODEL_ASSETS) - 1:
                raise ToolingError(f"{sdist} lacks some of llama.cpp's test assets {', '.join(MODEL_ASSETS)}", _FIX)
            (tmp / COMPLETE_MARKER).write_text(f"{sdist.name}\n")
    return target


def run(script: str, args: list[str]) -> subprocess.CompletedProcess[str]:
    """Run one of the converter scripts with this Python; its own gguf-py comes first on the path."""
    directory = ensure_converter()
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(directory / "gguf-py"), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    # The converter dies with us: a SIGKILLed export (or pipeline) otherwise left it converting on, writing a
    # GGUF nobody would rename into place.
    return subprocess.run(
        [sys.executable, str(directory / script), *args], env=env, capture_output=True, text=True, check=False,
        preexec_fn=die_with_parent,
    )


def _sdist_name(version: str) -> str:
    return f"llama_cpp_python-{version}.tar.gz"


def _find_sdist(version: str) -> Path | None:
    wheels = os.environ.get("TUNESMITH_WHEELS")
    for folder in [Path(wheels)] if wheels else [paths.home() / "wheels"]:
        candidate = folder / _sdist_name(version)
        if candidate.is_file():
            return candidate
    return None


def _download_sdist(version: str, into: Path) -> Path:
    done = subprocess.run(
        [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--no-binary", ":all:",
         f"{PACKAGE}=={version}", "-d", str(into)],
        capture_output=True, text=True, check=False,
    )
    found = into / _sdist_name(version)
    if done.returncode != 0 or not found.is_file():
        last = (done.stderr.strip().splitlines() or ["no output"])[-1]
        raise ToolingError(f"llama.cpp converter scripts missing and the {PACKAGE} {version} sdist could not be "
                           f"downloaded: {last}", _FIX)
    return found


def _extract(sdist: Path, version: str, out: Path) -> None:
    found = _extract_members(sdist, version, out, SCRIPTS + PACKAGES)
    if sum(name in SCRIPTS for name in found) != len(SCRIPTS):
        raise ToolingError(f"{sdist} does not contain llama.cpp's converter scripts", _FIX)


def _extract_members(sdist: Path, version: str, out: Path, wanted: tuple[str, ...], strip: str = "") -> list[str]:
    """Extract the files of vendor/llama.cpp/ named in `wanted` (a name, or a folder ending in "/") into `out`,
    without the leading `strip`; returns their names as written."""
    prefix = f"llama_cpp_python-{version}/vendor/llama.cpp/"
    found = []
    with tarfile.open(sdist) as archive:
        for member in archive.getmembers():
            if not member.name.startswith(prefix) or not (member.isfile() or member.isdir()):
                continue
            relative = member.name[len(prefix):]
            if relative in wanted or relative.startswith(tuple(name for name in wanted if name.endswith("/"))):
                member.name = relative.removeprefix(strip)
                archive.extract(member, out, filter="data")
                found.append(member.name)
    return found


if __name__ == "__main__":
    if len(sys.argv) < 2 or sys.argv[1] != "install":
        sys.exit("usage: python -m tunesmith.export.llama_cpp install [SDIST]")
    print(install(Path(sys.argv[2]) if len(sys.argv) > 2 else None))
