"""Data-parallel training on CPU: 2 processes over gloo through the real `tunesmith train --gpus 2` path.

No multi-GPU machine is needed: `train.device: cpu` with `--gpus 2` runs 2 CPU processes under torchrun.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml

from tests.conftest import ROOT, run_cli
from tests.test_train import _config, _losses
from tests.train_support import adapter_weights as _adapter


def _examples(n: int, seed: int = 0) -> list[dict[str, list[int]]]:
    import random

    rng = random.Random(seed)
    out = []
    for _ in range(n):
        length = rng.randint(3, 40)
        out.append({"input_ids": [1] * length, "labels": [-100] * (length // 2) + [1] * (length - length // 2)})
    return out


@pytest.mark.parametrize(("examples", "batch_size", "world_size"), [(42, 4, 2), (37, 3, 2), (50, 2, 3)])
def test_hf_shards_cover_each_epoch_once(examples, batch_size, world_size):
    """Across ranks, every example of an epoch is trained exactly once; the tail batch leaves no gap."""
    import torch

    from tunesmith.config import Config
    from tunesmith.train.distributed import World
    from tunesmith.train.engines import HFEngine

    data = SimpleNamespace(train=_examples(examples), eval=[])
    config = Config.model_validate({"model": {"base": "x"}, "train": {"batch_size": batch_size, "grad_accum": 2}})
    engines = [HFEngine(torch.nn.Linear(1, 1), data, config, "cpu", 0, None, None, World(rank, world_size))
               for rank in range(world_size)]
    steps = engines[0].micro_per_epoch
    assert steps == -(-examples // (batch_size * world_size))  # one global batch is batch_size × world size
    starved: set[int] = set()
    for epoch in range(3):
        seen: list[int] = []
        for micro in range(epoch * steps, (epoch + 1) * steps):
            for engine in engines:
                indices = engine._micro_batch(micro)
                mine = engine.world.shard(indices)
                assert len(mine) <= batch_size
                seen += mine
                if not mine:  # an epoch's short batch: this rank still runs one, with nothing trained in it
                    assert (engine._collate(indices)["labels"] == -100).all()
                    starved.add(epoch)
        assert sorted(seen) == list(range(examples)), f"epoch {epoch}: duplicates or gaps"
    assert bool(starved) == (0 < examples % (batch_size * world_size) < world_size)


@pytest.mark.parametrize(("buffers", "world_size"), [(7, 2), (9, 3), (4, 2)])
def test_fast_path_shards_cover_each_epoch_once(buffers, world_size):
    """The packed buffers: each global micro-batch is one buffer per rank, none twice, none left out."""
    import torch

    from tunesmith.config import Config
    from tunesmith.train.distributed import World
    from tunesmith.train.engines import FastEngine

    config = Config.model_validate({"model": {"base": "x"}})
    fake = [SimpleNamespace(index=i, targets=torch.zeros(4), num_targets=4) for i in range(buffers)]
    engines = []
    for rank in range(world_size):
        # The plan without a model: FastEngine's fields that _global_buffers and _mine read.
        engine = FastEngine.__new__(FastEngine)
        engine.config, engine.world, engine.buffers, engine._plan = config, World(rank, world_size), fake, {}
        engine.micro_per_epoch = -(-buffers // world_size)
        engines.append(engine)
    orders = []
    for epoch in range(3):
        seen = []
        per_epoch = engines[0].micro_per_epoch
        for micro in range(epoch * per_epoch, (epoch + 1) * per_epoch):
            indices = engines[0]._global_buffers(micro)
            for engine in engines:
                assert engine._global_buffers(micro) == indices  # every rank computes the same plan
                if engine.world.rank < len(indices):
                    seen.append(engine._mine(indices).index)
        assert sorted(seen) == list(range(buffers)), f"epoch {epoch}: duplicates or gaps"
        orders.append(seen)
    assert orders[0] != orders[1] or buffers < 3  # reshuffled per epoch


def _forty_one(path: Path) -> Path:
    """test_train's 48 examples, 7 of them held out: 41 left, 4k + 1 for a global batch of 4."""
    config = yaml.safe_load(path.read_text())
    config["data"]["eval_fraction"] = 0.146
    path.write_text(yaml.safe_dump(config))
    return path


def _first(run: Path, key: str) -> float:
    lines = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return next(record[key] for record in lines if key in record)


@pytest.mark.slow
def test_two_cpu_processes_match_one_with_the_same_global_batch(tmp_path, tiny_qwen3):
    """2-process DDP (gloo) with batch_size 2 against one process with batch_size 4: the same 4 sequences per
    optimizer step, so the same loss curve up to fp32 rounding (the sums are taken in another order and the
    padding widths differ): logged losses within 1e-4 relative. Both ranks end with identical weights. The same
    with FSDP2. Then a copy of the DDP run whose launcher is SIGKILLed after its step-4 checkpoint leaves no
    worker behind, and resumed, ends on the same adapter and curve.

    One epoch of 41 examples: 10 global batches of 4 and one of 1, where rank 1 runs a masked stand-in."""

    import torch

    settings = {"device": "cpu", "max_steps": 11, "save_steps": 4, "eval_steps": 4, "gradient_checkpointing": False}
    one = _forty_one(_config(tmp_path, tiny_qwen3, "one", batch_size=4, **settings))
    two = _forty_one(_config(tmp_path, tiny_qwen3, "two", batch_size=2, **settings))

    done = run_cli("train", "--config", str(two), "--gpus", "2", env={"OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout.count("adapter saved to") == 1  # rank 0 alone prints
    single = run_cli("train", "--config", str(one), env={"OMP_NUM_THREADS": "1"})
    assert single.returncode == 0, single.stderr

    run_one, run_two = tmp_path / "runs" / "one", tmp_path / "runs" / "two"
    record = json.loads((run_two / "run.json").read_text())
    digests = record["final"]["rank_weight_sha256"]
    assert record["world_size"] == 2 and len(digests) == 2 and digests[0] == digests[1]
    assert record["examples"]["train"] == 41
    assert record["final"]["trained_tokens"] == json.loads((run_one / "run.json").read_text())["final"][
        "trained_tokens"]  # the same examples were trained, none twice

    reference = _losses(run_one)
    assert [step for step, _ in _losses(run_two)] == [step for step, _ in reference] == list(range(1, 12))
    assert [loss for _, loss in _losses(run_two)] == pytest.approx([loss for _, loss in reference], rel=1e-4)
    assert reference[-1][1] < reference[0][1] - 0.3  # it trained: the comparison is of a moving curve
    # The first step's gradient (its norm is logged before clipping) is the same sum, up to rounding: a
    # missing × world size would halve it, a duplicated shard would change it and the loss.
    assert _first(run_two, "grad_norm") == pytest.approx(_first(run_one, "grad_norm"), rel=1e-4)
    # Adam amplifies that rounding afterwards (its first updates are lr × sign(gradient), and some LoRA
    # gradients are near zero), so after 11 steps the adapters agree to ~0.5% (measured up to 0.5% per tensor);
    # lora_B starts at zero, so for B this is 0.5% of what was learned.
    a, b = _adapter(run_one), _adapter(run_two)
    assert a.keys() == b.keys()
    for key in a:
        assert float((b[key] - a[key]).norm() / a[key].norm()) < 2e-2, key

    # FSDP2 (train.fsdp) shards the model instead of replicating it; the arithmetic is the same.
    sharded = _forty_one(_config(tmp_path, tiny_qwen3, "fsdp", batch_size=2, fsdp=True, **settings))
    done = run_cli("train", "--config", str(sharded), "--gpus", "2", env={"OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stdout + done.stderr
    run_fsdp = tmp_path / "runs" / "fsdp"
    assert [loss for _, loss in _losses(run_fsdp)] == pytest.approx([loss for _, loss in reference], rel=1e-4)
    for key, value in _adapter(run_fsdp).items():
        assert float((value - a[key]).norm() / a[key].norm()) < 2e-2, key

    # SIGKILL the launcher (`tunesmith train --gpus 2`) once the step-4 checkpoint exists: its workers must die
    # with it, not train on orphaned (they did, on 2 H200s, before children.die_with_parent); then
    # every rank resumes from rank 0's checkpoint and lands on the uninterrupted run's adapter.
    killed = _forty_one(_config(tmp_path, tiny_qwen3, "killed", batch_size=2, **settings))
    run_killed = tmp_path / "runs" / "killed"
    launcher = subprocess.Popen([sys.executable, "-m", "tunesmith.cli", "train", "--config", str(killed), "--gpus",
                                 "2"], cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"},
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 300
    while not (run_killed / "checkpoints" / "step-00000004").exists() and time.monotonic() < deadline:
        time.sleep(0.02)
    launcher.kill()
    launcher.wait()
    deadline = time.monotonic() + 20
    while _processes_with(str(killed)) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not _processes_with(str(killed)), "workers outlived their launcher"
    assert not (run_killed / "adapter").exists() and not (run_killed / "checkpoints" / "step-00000011").exists()
    resumed = run_cli("train", "--config", str(killed), "--gpus", "2", "--resume", env={"OMP_NUM_THREADS": "1"})
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert resumed.stdout.count("resuming from step-0000000") == 1
    assert [loss for _, loss in _losses(run_killed)] == pytest.approx([loss for _, loss in _losses(run_two)],
                                                                       rel=1e-5)
    for key, value in _adapter(run_killed).items():
        torch.testing.assert_close(value, b[key], rtol=1e-5, atol=1e-6)


@pytest.mark.slow
def test_two_nodes_on_loopback_match_one_process_with_the_same_global_batch(tmp_path, tiny_qwen3):
    """Multi-node as README documents it: one torchrun launcher per node (`--nnodes 2`, c10d rendezvous at one
    HOST:PORT), here two launchers of one CPU process each on loopback (gloo) with batch_size 2, against one
    process with batch_size 4: the same 4 sequences per optimizer step, so the same loss curve up to fp32
    rounding, the same trained tokens, and both ranks end on identical weights."""
    import socket

    settings = {"device": "cpu", "max_steps": 6, "save_steps": 100, "eval_steps": 100,
                "gradient_checkpointing": False}
    one = _forty_one(_config(tmp_path, tiny_qwen3, "one", batch_size=4, **settings))
    nodes = _forty_one(_config(tmp_path, tiny_qwen3, "nodes", batch_size=2, **settings))
    with socket.socket() as probe:  # a free port for the rendezvous
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    launch = [sys.executable, "-m", "torch.distributed.run", "--nnodes=2", "--nproc-per-node=1",
              "--rdzv-backend=c10d", f"--rdzv-endpoint=127.0.0.1:{port}", "--rdzv-id=two-nodes", "--max-restarts=0",
              "-m", "tunesmith.cli", "train", "--config", str(nodes)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "COLUMNS": "200"}
    launchers = [subprocess.Popen(launch, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                  text=True) for _ in range(2)]
    try:
        outputs = [launcher.communicate(timeout=600) for launcher in launchers]  # a loaded 2-core CI machine
    finally:
        for launcher in launchers:
            launcher.kill()
    for launcher, (out, err) in zip(launchers, outputs, strict=True):
        assert launcher.returncode == 0, out + err
    assert sum(out.count("adapter saved to") for out, _ in outputs) == 1  # global rank 0 alone prints
    single = run_cli("train", "--config", str(one), env={"OMP_NUM_THREADS": "1"})
    assert single.returncode == 0, single.stderr

    run_one, run_nodes = tmp_path / "runs" / "one", tmp_path / "runs" / "nodes"
    record = json.loads((run_nodes / "run.json").read_text())
    digests = record["final"]["rank_weight_sha256"]
    assert record["world_size"] == 2 and len(digests) == 2 and digests[0] == digests[1]
    assert record["final"]["trained_tokens"] == json.loads((run_one / "run.json").read_text())["final"][
        "trained_tokens"]
    reference = _losses(run_one)
    assert [step for step, _ in _losses(run_nodes)] == [step for step, _ in reference] == list(range(1, 7))
    assert [loss for _, loss in _losses(run_nodes)] == pytest.approx([loss for _, loss in reference], rel=1e-4)
    assert reference[-1][1] < reference[0][1] - 0.1  # a moving curve, not two flat ones
    a, b = _adapter(run_one), _adapter(run_nodes)
    assert a.keys() == b.keys()
    for key in a:  # Adam amplifies fp32 rounding (see the test above): ~0.5% after a few steps
        assert float((b[key] - a[key]).norm() / a[key].norm()) < 2e-2, key


def _processes_with(text: str) -> list[int]:
    """Live processes whose command line contains `text` (zombies, already dead, excluded)."""
    found = []
    for entry in Path("/proc").iterdir():
        try:
            if entry.name.isdigit() and text in (entry / "cmdline").read_bytes().decode(errors="replace") \
                    and " Z " not in (entry / "stat").read_text():
                found.append(int(entry.name))
        except OSError:
            continue
    return found


def test_more_gpus_than_torch_sees_is_one_line(tmp_path, tiny_qwen3):
    config = _config(tmp_path, tiny_qwen3, "many", device="cuda")
    done = run_cli("train", "--config", str(config), "--gpus", "2")
    assert done.returncode == 2
    assert "--gpus 2 asked for, but torch sees 0 CUDA GPU(s)" in done.stderr and "Traceback" not in done.stderr
