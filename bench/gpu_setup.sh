#!/usr/bin/env bash
# On the GPU machine, sourced from the checkout's root: `source .gpu/bench/gpu_setup.sh` (bench/gpu_carry.sh made
# .gpu here). Installs the carried wheels into /tmp/tsdeps, unpacks Unsloth's site into /tmp/site (on PYTHONPATH
# for Unsloth's processes only: its packages shadow others) and links its bitsandbytes alone into /tmp/bnbsite
# (for tunesmith's QLoRA processes). Idempotent: a warm machine keeps /tmp.
gpu=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
if [ ! -d /tmp/tsdeps/pydantic ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/tsdeps "$gpu"/whl/*.whl
fi
if [ ! -d /tmp/site/unsloth ]; then
  mkdir -p /tmp/site && tar xzf "$gpu/unsloth-site.tgz" -C /tmp/site
fi
mkdir -p /tmp/bnbsite && ln -sfn /tmp/site/bitsandbytes /tmp/bnbsite/bitsandbytes
export UNSLOTH_SITE=/tmp/site BNB_SITE=/tmp/bnbsite PYTHONPATH=/tmp/tsdeps:$gpu${PYTHONPATH:+:$PYTHONPATH}
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1
