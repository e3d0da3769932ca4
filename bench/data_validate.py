"""Validate a 200,000-record JSON Lines file: wall time and peak memory (the data issue's "Done when").

    .venv/bin/python bench/data_validate.py [--records 200000] [--keep]

Writes goDrive-shaped records to a temporary file (deleted afterwards unless --keep), then runs
`tunesmith.data.validate_file` (streaming: nothing kept) and `load_examples` (every Example kept in a
list) each in a fresh subprocess, and reports its wall time and its own peak RSS (ru_maxrss),
interpreter and imports included.
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from examples.godrive.generate import expected, format_features, sample_features

CHILD = """
import resource
import sys
from tunesmith.config import DataConfig
from tunesmith.data import load_examples, validate_file
cfg = DataConfig(system_prompt="你是驾驶教练，根据车辆特征给出指令。")
if sys.argv[2] == "validate_file":
    n = validate_file(sys.argv[1], cfg).loaded
else:
    n = len(load_examples(sys.argv[1], cfg))
print(n, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)  # KiB on Linux
"""


def write_records(path: Path, count: int, seed: int = 0) -> None:
    rng = random.Random(seed)
    with path.open("w", encoding="utf-8") as f:
        for _ in range(count):
            line = format_features(sample_features(rng))
            f.write(json.dumps({"input": line, "output": expected(line)}, ensure_ascii=False) + "\n")


def measure(path: Path, how: str) -> tuple[int, float, float]:
    """(records loaded, wall seconds, peak RSS in MiB) of one run in a fresh interpreter."""
    started = time.perf_counter()
    out = subprocess.run([sys.executable, "-c", CHILD, str(path), how], check=True, capture_output=True,
                         text=True, cwd=ROOT)
    seconds = time.perf_counter() - started
    loaded, peak_kib = out.stdout.split()
    return int(loaded), seconds, int(peak_kib) / 1024


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--records", type=int, default=200_000)
    parser.add_argument("--keep", action="store_true", help="keep the generated file")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "big.jsonl"
        write_records(path, args.records)
        size = path.stat().st_size / 2**20
        rows = [("validate_file (streaming)", *measure(path, "validate_file")),
                ("load_examples (all kept)", *measure(path, "load_examples"))]
        if args.keep:
            kept = ROOT / "bench" / "big.jsonl"
            path.replace(kept)
            print(f"kept {kept}")
    print(f"{args.records} records, {size:.1f} MiB JSON Lines; Python {platform.python_version()}, "
          f"{platform.machine()}, {platform.processor() or 'cpu'}")
    print(f"| {'call':<26} | records | seconds | peak RSS MiB | records/s |")
    print(f"|{'-' * 28}|---------|---------|--------------|-----------|")
    for name, loaded, seconds, peak in rows:
        print(f"| {name:<26} | {loaded} | {seconds:.1f} | {peak:.0f} | {loaded / seconds:,.0f} |")


if __name__ == "__main__":
    main()
