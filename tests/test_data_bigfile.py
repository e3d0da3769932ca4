"""A 200,000-record JSON Lines file validates with peak memory under 1 GB (bench/data_validate.py times it)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

# VmHWM, not getrusage's ru_maxrss: Linux carries ru_maxrss across exec, so a child of a pytest process
# that already holds models would report the parent's peak (seen: 1064 MiB), not its own.
CHILD = """
import re, sys
from tunesmith.config import DataConfig
from tunesmith.data import validate_file
report = validate_file(sys.argv[1], DataConfig(on_error="skip"))
peak = re.search(r"VmHWM:\\s+(\\d+) kB", open("/proc/self/status").read()).group(1)
print(report.loaded, len(report.skipped), peak)
"""


@pytest.mark.slow
def test_200k_records_validate_in_under_1_gb(tmp_path):
    record = {"input": "<特征>场地类型:科目二; 当前项目:倒车入库; 车辆类型:手动挡; 挡位:倒挡; 手刹:放下; 发动机:打火; "
                       "安全带:系上; 车门:关闭; 离合:踩下; 刹车:未踩; 油门:未踩; 速度:缓慢; 时间特征:夜晚</特征>",
              "output": "倒车入库看后视镜。请开启近光灯。"}
    line = json.dumps(record, ensure_ascii=False) + "\n"
    path = tmp_path / "big.jsonl"
    with path.open("w", encoding="utf-8") as f:
        for i in range(200_000):
            f.write(line if i != 123_456 else '{"input": "q", "output": ""}\n')
    out = subprocess.run([sys.executable, "-c", CHILD, str(path)], check=True, capture_output=True, text=True,
                         cwd=Path(__file__).resolve().parents[1])
    loaded, skipped, peak_kib = map(int, out.stdout.split())
    assert (loaded, skipped) == (199_999, 1)
    assert peak_kib < 1024 * 1024, f"peak RSS {peak_kib / 1024:.0f} MiB"


INSPECT = """
import io, re, sys
from rich.console import Console
from tunesmith.config import Config
from tunesmith.data.inspect import inspect_file
inspect_file(sys.argv[1], Config(), Console(file=io.StringIO(), width=100))
print(re.search(r"VmHWM:\\s+(\\d+) kB", open("/proc/self/status").read()).group(1))
"""


@pytest.mark.slow
def test_one_16_mib_record_costs_at_most_a_few_hundred_mib(tmp_path):
    """`tunesmith data inspect` on 50 short records, and on the same with one 16 MiB record first: the Rust
    tokenizer's bookkeeping for its 3.4M tokens took the process to 2.7 GB, and laying the record out for the
    terminal took minutes; now it is tokenized in pieces and shown shortened."""
    short = "".join(json.dumps({"input": f"question {i}", "output": f"answer {i}"}) + "\n" for i in range(50))
    small, big = tmp_path / "small.jsonl", tmp_path / "big.jsonl"
    small.write_text(short)
    big.write_text(json.dumps({"input": "word " * (16 * 2**20 // 5), "output": "x"}) + "\n" + short)

    def peak(path: Path) -> int:
        out = subprocess.run([sys.executable, "-c", INSPECT, str(path)], check=True, capture_output=True, text=True,
                             cwd=Path(__file__).resolve().parents[1], timeout=600)
        return int(out.stdout.split()[-1])

    extra_mib = (peak(big) - peak(small)) / 1024
    assert extra_mib < 512, f"one 16 MiB record cost {extra_mib:.0f} MiB more"
