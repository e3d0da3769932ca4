#!/usr/bin/env bash
# Everything bench/train_gpu.py needs on the lent GPU machine (no package registry there), in one folder of the
# checkout the device tool sends. Run here, once (a minute; ~33 MiB):
#
#     bash bench/gpu_carry.sh /work/main/.gpu      # the folder must be ignored there (.git/info/exclude: /.gpu/)
#
# It holds: this checkout's tunesmith/ and bench/ (the code under test, also from a worktree the tool does not
# send); unsloth-site.tgz (../shared/bench/unsloth_site.sh: Unsloth 2026.10.9, TRL, bitsandbytes 0.50.2 with its
# CUDA 13 library, ...); wheels of what tunesmith imports and that machine lacks (pydantic and its dependencies,
# rapidfuzz); the shared anchor scripts. Then every device command names `.gpu` in carry and starts with
#
#     source .gpu/bench/gpu_setup.sh
#
# (unpacks them under /tmp, sets PYTHONPATH, UNSLOTH_SITE and BNB_SITE), e.g.
#
#     source .gpu/bench/gpu_setup.sh && cd .gpu && python3 bench/train_gpu.py --arch qwen3-8b ... --json $OUT/r.json
set -euo pipefail
out=${1:?usage: gpu_carry.sh FOLDER}
here=$(cd "$(dirname "$0")/.." && pwd)
shared=${SHARED:-$here/../shared}
[ -d "$shared/bench" ] || shared=/work/shared
mkdir -p "$out/whl"
rm -rf "$out/tunesmith" "$out/bench" "$out/shared_bench"
cp -r "$here/tunesmith" "$here/bench" "$out/"
mkdir -p "$out/shared_bench" && cp "$shared/bench/"*.py "$shared/bench/"*.json "$out/shared_bench/"
find "$out" -name __pycache__ -prune -exec rm -rf {} +
[ -f "$out/unsloth-site.tgz" ] || bash "$shared/bench/unsloth_site.sh" "$out/unsloth-site.tgz"
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 -d "$out/whl" \
  pydantic==2.14.4 pydantic-core==2.50.5 annotated-types==0.7.0 typing-inspection==0.4.5 rapidfuzz==3.14.6
du -sh "$out"
