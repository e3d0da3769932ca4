"""llama.cpp's GGUF converter scripts, taken from the pinned llama-cpp-python source distribution.

The scripts (`convert_hf_to_gguf.py`, `convert_lora_to_gguf.py`, `conversion/`, `gguf-py/`) must match the
llama.cpp compiled into the installed bindings, so they come from the same version's sdist, extracted once
into `$TUNESMITH_HOME/llama.cpp/<version>/`. Nothing of llama.cpp lives in this repository.

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
    prefix = f"llama_cpp_python-{version}/vendor/llama.cpp/"
    wanted = 0
    with tarfile.open(sdist) as archive:
        for member in archive.getmembers():
            if not member.name.startswith(prefix) or not (member.isfile() or member.isdir()):
                continue
            relative = member.name[len(prefix):]
            if relative in SCRIPTS or relative.startswith(PACKAGES):
                member.name = relative
                archive.extract(member, out, filter="data")
                wanted += relative in SCRIPTS
    if wanted != len(SCRIPTS):
        raise ToolingError(f"{sdist} does not contain llama.cpp's converter scripts", _FIX)


if __name__ == "__main__":
    if len(sys.argv) < 2 or sys.argv[1] != "install":
        sys.exit("usage: python -m tunesmith.export.llama_cpp install [SDIST]")
    print(install(Path(sys.argv[2]) if len(sys.argv) > 2 else None))
