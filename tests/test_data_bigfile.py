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
