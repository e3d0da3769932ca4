"""llama.cpp's own `llama-server`, built from the pinned llama-cpp-python source distribution, for benchmarks only.

`bench/serve_load.py` compares `tunesmith serve` against it on the same GGUF and thread count. It is never part
of `make demo`: tunesmith's engine does not need it.

    .venv/bin/python bench/llama_server.py      # build once (minutes on 2 cores); prints the binary's path

The build uses the Makefile's portable CPU flags (LLAMA_CMAKE_ARGS), so both servers run the same kernels,
and leaves out the web UI (its assets would be downloaded) and HTTPS. The binary lands in
`$TUNESMITH_HOME/llama-server/<version>/llama-server`, written under a temporary name and renamed when complete.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tunesmith import paths
from tunesmith.export.llama_cpp import _find_sdist, bindings_version

EXTRA_CMAKE_ARGS = [
    "-DCMAKE_BUILD_TYPE=Release", "-DBUILD_SHARED_LIBS=OFF", "-DLLAMA_BUILD_TESTS=OFF",
    "-DLLAMA_BUILD_EXAMPLES=OFF", "-DLLAMA_BUILD_SERVER=ON", "-DLLAMA_BUILD_UI=OFF",
    "-DLLAMA_USE_PREBUILT_UI=OFF", "-DLLAMA_OPENSSL=OFF",
]


def makefile_cmake_args() -> list[str]:
    """LLAMA_CMAKE_ARGS as the environment or the Makefile sets them: the flags the bindings were built with."""
    if os.environ.get("LLAMA_CMAKE_ARGS"):
        return shlex.split(os.environ["LLAMA_CMAKE_ARGS"])
    match = re.search(r"^LLAMA_CMAKE_ARGS \?= (.*)$", (ROOT / "Makefile").read_text(), re.MULTILINE)
    if not match:
        raise SystemExit("Makefile has no LLAMA_CMAKE_ARGS line")
    return shlex.split(match.group(1))


def binary_path(version: str | None = None) -> Path:
    return paths.home() / "llama-server" / (version or bindings_version()) / "llama-server"


def ensure_built(version: str | None = None, jobs: int | None = None) -> Path:
    """The llama-server binary of the installed bindings' version, built on first use."""
    version = version or bindings_version()
    target = binary_path(version)
    if target.is_file():
        return target
    sdist = _find_sdist(version)
    if sdist is None:
        raise SystemExit(f"no llama_cpp_python-{version}.tar.gz in the wheels cache; run `make setup` first")
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as scratch:
        with tarfile.open(sdist) as tar:
            members = [m for m in tar.getmembers() if "/vendor/llama.cpp/" in m.name and (m.isreg() or m.isdir())]
            tar.extractall(scratch, members=members, filter="data")
        source = next(Path(scratch).glob("*/vendor/llama.cpp"))
        build = Path(scratch) / "build"
        print(f"building llama-server {version} from {sdist.name} (a few minutes on 2 cores)", flush=True)
        subprocess.run(["cmake", "-S", str(source), "-B", str(build), "-G", "Ninja",
                        *makefile_cmake_args(), *EXTRA_CMAKE_ARGS], check=True)
        subprocess.run(["cmake", "--build", str(build), "--target", "llama-server",
                        "-j", str(jobs or os.cpu_count() or 2)], check=True)
        tmp = target.with_name(".tmp-llama-server")
        shutil.copy2(build / "bin" / "llama-server", tmp)
        tmp.rename(target)
    return target


if __name__ == "__main__":
    print(ensure_built())
