"""GPU training speed: tunesmith's fast path vs Unsloth (and transformers + peft), one command, one card.

Issue 31: every stack runs `--rounds` times (default 3), each run its own process, interleaved (round r runs the
stacks in order, rotated by r), after `--warm-machine` seconds of warming a fresh machine (host memory touched,
a host-bound probe loop timed in 5 s windows: the first minutes of a fresh machine ran host-bound stacks slow).
The table printed last gives each stack's median and range, and each pair's ratio of medians (with the range of
the ratio over all sample pairs). `--arch qwen3-8b` / `llama-8b` runs the 8B architectures (random weights,
`bs` 8 by default, as ../shared/bench/anchor_sft.py --arch 8b); `fast_qlora` / `unsloth_qlora` train on a 4-bit
(NF4) base under `--qlora-cap-gib` (torch.cuda.set_per_process_memory_fraction: a 16 GB card's usable memory).
`checks` verifies, on the GPU, the fast path's NF4 dequantizer against bitsandbytes (bit for bit), the 4-bit fast
path's loss and gradients against transformers + peft on the same bitsandbytes base, and export's QLoRA merge of
an adapter the fast path trained. Results go to `--json` after every sample (a command cut off keeps them).

Carrying what it needs onto the GPU machine (no registry there): `bench/gpu_carry.sh` here (once), then every
command on the device starts with `bash .gpu/bench/gpu_setup.sh` (see that script; bench/RESULTS.md, issue 31).

The workload of issue 8 (and ../shared/bench/anchor_sft.py): the Qwen3-0.6B architecture with random
weights, LoRA r=16 alpha=16 on the seven projections, bf16, AdamW, lr 2e-4, batches of 16 sequences with
lengths uniform in 64-512 and random tokens, every token trained. Reports useful (non-pad) tokens/s after
warm-up, ms per optimizer step, peak GPU memory, MFU (model FLOPs of the useful tokens over 989 TFLOP/s dense
bf16), load and warm-up seconds, and the equivalence of the fast path with transformers + peft. Each stack
runs in its own process, all in one command: Unsloth and transformers + peft move 20-45% between commands on
the same card (their steps are host-bound), so a ratio holds only between rows of one command.

The pairs it compares (issue 18): normal mode (`fast`) against Unsloth's fastest configuration (no gradient
checkpointing, `unsloth`, or its padding-free mode through TRL, `unsloth_packed`, whichever is faster), and
`low_memory` (`fast_low`) against Unsloth with its own gradient checkpointing (`unsloth_gc`), the matched-memory
pair. `fast` times `FastEngine`, the engine `tunesmith train` runs, step by step as the loop calls it; `cli` runs
`tunesmith train` itself on the same sequences (random_tokens.py) and times its steps from its log lines, so
the two rows show what the CLI costs over the engine.

    python bench/train_gpu.py                      # every stack; Unsloth if importable
    python bench/train_gpu.py --stacks fast,cli --profile --record bench/RESULTS.md
    python bench/train_gpu.py --scaling --record bench/RESULTS.md   # fast path on 1 and 2 GPUs (issue 9)

`--scaling`: the fast path, data-parallel as `tunesmith train --gpus N` runs it (train/distributed.py: each rank
packs the same buffers, takes its share of every global batch, one all-reduce of the LoRA gradient per step),
with the same global batch (`--global-buffers` buffers of `--seq-len` tokens per optimizer step) on 1 GPU
(grad_accum = global buffers) and on 2 (half each). Reports useful tokens/s over all GPUs, scaling efficiency
(2-GPU tokens/s over twice the 1-GPU tokens/s) and how far apart the two loss curves are.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

QWEN3_06B = {
    "attention_bias": False, "attention_dropout": 0.0, "bos_token_id": 151643, "eos_token_id": 151645,
    "head_dim": 128, "hidden_act": "silu", "hidden_size": 1024, "initializer_range": 0.02,
    "intermediate_size": 3072, "max_position_embeddings": 40960, "max_window_layers": 28,
    "num_attention_heads": 16, "num_hidden_layers": 28, "num_key_value_heads": 8, "rms_norm_eps": 1e-06,
    "rope_theta": 1000000, "sliding_window": None, "tie_word_embeddings": True, "use_cache": False,
    "use_sliding_window": False, "vocab_size": 151936,
}
# The 8B architectures, checked against their published config.json (Qwen/Qwen3-8B; meta-llama/Llama-3.1-8B,
# rope_scaling llama3 factor 8, low 1, high 4, original 8192) with the search tool, 2026-12-07.
QWEN3_8B = QWEN3_06B | {"hidden_size": 4096, "intermediate_size": 12288, "num_attention_heads": 32,
                        "num_hidden_layers": 36, "max_window_layers": 36, "tie_word_embeddings": False}
LLAMA31_8B = {
    "attention_bias": False, "attention_dropout": 0.0, "bos_token_id": 128000, "eos_token_id": 128001,
    "head_dim": 128, "hidden_act": "silu", "hidden_size": 4096, "initializer_range": 0.02,
    "intermediate_size": 14336, "max_position_embeddings": 131072, "mlp_bias": False, "num_attention_heads": 32,
    "num_hidden_layers": 32, "num_key_value_heads": 8, "rms_norm_eps": 1e-05, "rope_theta": 500000.0,
    "rope_scaling": {"factor": 8.0, "high_freq_factor": 4.0, "low_freq_factor": 1.0,
                     "original_max_position_embeddings": 8192, "rope_type": "llama3"},
    "tie_word_embeddings": False, "use_cache": False, "vocab_size": 128256,
}
ARCHS = {  # name: (config, class, per-arch defaults: batch of the padded stacks, their steps and warm-up, batches
    # packed for the fast path)
    "0.6b": (QWEN3_06B, "Qwen3", {"bs": 16, "steps": 30, "warm": 8, "docs_batches": 60}),
    "qwen3-8b": (QWEN3_8B, "Qwen3", {"bs": 8, "steps": 22, "warm": 6, "docs_batches": 44}),
    "llama-8b": (LLAMA31_8B, "Llama", {"bs": 8, "steps": 22, "warm": 6, "docs_batches": 44}),
    # for checking the driver and the fast workers on a CPU (--device cpu), not for timing
    "tiny": (QWEN3_06B | {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "head_dim": 16,
                          "num_attention_heads": 4, "num_key_value_heads": 2}, "Qwen3",
             {"bs": 4, "steps": 6, "warm": 2, "docs_batches": 20}),
}
C = QWEN3_06B
"""The architecture of this process (set from --arch)."""
MODULES = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
PEAK_BF16 = 989e12  # H100/H200 SXM dense bf16, datasheet
STACKS = {
    "fast": "tunesmith normal (FastEngine)",
    "cli": "`tunesmith train`, normal",
    "fast_low": "tunesmith low_memory (FastEngine)",
    "fast_ungrouped": "tunesmith normal, LoRA projections one by one (before issue 31)",
    "fast_blk64": "tunesmith normal, flex attention blocks of 64 tokens (not 128)",
    "fast_qlora": "tunesmith QLoRA (FastEngine, NF4 base, checkpointed)",
    "fast_qlora_c256": "tunesmith QLoRA, 256-token loss chunks",
    "fast_qlora2k": "tunesmith QLoRA, 2,048-token buffers, 256-token loss chunks",
    "unsloth_qlora": "Unsloth QLoRA (4-bit), its gradient checkpointing, padded",
    "unsloth_qlora_nogc": "Unsloth QLoRA (4-bit), no gradient checkpointing, padded",
    "unsloth": "Unsloth, no gradient checkpointing, padded",
    "unsloth_packed": "Unsloth + TRL SFTTrainer, padding_free",
    "unsloth_gc": "Unsloth, its gradient checkpointing, padded",
    "hf": "transformers + peft, SDPA, padded",
}
T0 = time.perf_counter()  # a worker's start: its load and warm-up seconds count from here


# Workload -------------------------------------------------------------------------------------------
def make_model_dir(path: str, arch: str = "0.6b") -> float:
    """Random bf16 weights of `arch` saved at `path` (initialized on the GPU: minutes on the CPU at 8B); seconds."""
    import torch
    import transformers
    from transformers import AutoModelForCausalLM

    if os.path.exists(os.path.join(path, "config.json")):
        return 0.0
    t0 = time.perf_counter()
    values, family, _ = ARCHS[arch]
    torch.manual_seed(0)
    cfg = getattr(transformers, f"{family}Config")(**values)
    cfg.architectures = [f"{family}ForCausalLM"]
    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
        model = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16)
    model.save_pretrained(path)
    del model
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return round(time.perf_counter() - t0, 1)


def batches(n_batches: int, bs: int = 16, lo: int = 64, hi: int = 512, seed: int = 0):
    """anchor_sft.py's batches: (ids, attention_mask, labels, useful tokens), padded per batch."""
    import torch

    g = torch.Generator().manual_seed(seed)
    for _ in range(n_batches):
        lens = torch.randint(lo, hi + 1, (bs,), generator=g)
        width = int(lens.max())
        ids = torch.randint(0, 150000, (bs, width), generator=g)
        mask = (torch.arange(width)[None, :] < lens[:, None]).long()
        yield ids, mask, ids.masked_fill(mask == 0, -100), int(lens.sum())


def documents(batch_list) -> list[tuple[list[int], list[int]]]:
    """The same sequences as (input_ids, labels) examples, for packing."""
    docs = []
    for ids, mask, labels, _ in batch_list:
        for i in range(ids.shape[0]):
            n = int(mask[i].sum())
            docs.append((ids[i, :n].tolist(), labels[i, :n].tolist()))
    return docs


def model_flops(lengths: list[int]) -> float:
    """Training FLOPs of LoRA on these documents: frozen matmuls forward + input-gradient (4 N per
    token), LoRA weights 6 N, causal attention forward x 3; recomputation not counted."""
    c = C
    d, f, layers, heads, hd, kv = (c["hidden_size"], c["intermediate_size"], c["num_hidden_layers"],
                                   c["num_attention_heads"], c["head_dim"], c["num_key_value_heads"])
    frozen = layers * (d * heads * hd + 2 * d * kv * hd + heads * hd * d + 3 * d * f) + c["vocab_size"] * d
    r = 16
    lora = layers * r * ((d + heads * hd) * 2 + (d + kv * hd) * 2 + (d + f) * 3)
    tokens = sum(lengths)
    attention = sum(3 * 2 * n * n * heads * hd * layers for n in lengths)
    return tokens * (4 * frozen + 6 * lora) + attention


# Workers ----------------------------------------------------------------------------------------------
def load_model(path: str, attn: str = "sdpa", device: str = "cuda"):
    import torch
    from transformers import AutoModelForCausalLM

    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    if device == "cuda":  # straight onto the GPU (an 8B model through host memory first takes ~10 s longer)
        return AutoModelForCausalLM.from_pretrained(path, dtype=dtype, attn_implementation=attn, device_map="cuda")
    return AutoModelForCausalLM.from_pretrained(path, dtype=dtype, attn_implementation=attn).to(device)


def peft_model(model):
    from peft import LoraConfig, get_peft_model

    return get_peft_model(model, LoraConfig(r=16, lora_alpha=16, lora_dropout=0.0, bias="none",
                                            target_modules=MODULES, task_type="CAUSAL_LM"))


def run_padded(model, a, all_batches) -> dict:
    """The article's loop: one padded batch of 16 per step (anchor_sft.py)."""
    import torch

    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=2e-4, fused=True)
    model.train()
    torch.cuda.reset_peak_memory_stats()
    lengths, t0, t_start = [], None, time.perf_counter()
    for step, (ids, mask, labels, _n) in enumerate(all_batches[: a.steps]):
        if step == a.warm:
            torch.cuda.synchronize()
            t0, lengths = time.perf_counter(), []
        out = model(input_ids=ids.cuda(), attention_mask=mask.cuda(), labels=labels.cuda())
        out.loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        lengths += mask.sum(1).tolist()
    torch.cuda.synchronize()
    dt = time.perf_counter() - t0
    return {**measured(lengths, dt, a.steps - a.warm, float(out.loss.detach())), "warmup_s": round(t0 - t_start, 1)}


def measured(lengths: list[int], dt: float, steps: int, loss: float) -> dict:
    import torch

    gpu = torch.cuda.is_available()  # `--device cpu` checks the workers on a machine without one
    return {"tokens_per_s": round(sum(lengths) / dt), "step_ms": round(1000 * dt / steps, 1),
            "peak_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2) if gpu else 0.0,
            "reserved_gib": round(torch.cuda.max_memory_reserved() / 2**30, 2) if gpu else 0.0,
            "mfu": round(model_flops(lengths) / dt / PEAK_BF16, 3), "loss": round(loss, 3)}


def worker_hf(a) -> dict:
    model = peft_model(load_model(a.model))
    return run_padded(model, a, list(batches(a.steps, a.bs)))


def run_padded_timed(model, a, t_loaded: float) -> dict:
    """run_padded, with the load and warm-up seconds of this process."""
    out = run_padded(model, a, list(batches(a.steps, a.bs)))
    out.update(load_s=round(t_loaded - T0, 1))
    return out


def worker_unsloth(a, gc: bool, four_bit: bool = False) -> dict:
    """Unsloth in the plain loop: with its offloaded gradient checkpointing (its least memory) or without
    (its fastest; the issue measured 26-32k tokens/s at 11.5 GiB). `four_bit`: QLoRA, the base quantized to NF4
    by bitsandbytes while loading (Unsloth's load_in_4bit)."""
    import torch
    import unsloth  # before transformers: it patches it
    from unsloth import FastLanguageModel

    apply_cap(a, four_bit)
    model, _ = FastLanguageModel.from_pretrained(a.model, max_seq_length=1024, dtype=torch.bfloat16,
                                                 load_in_4bit=four_bit)
    model = FastLanguageModel.get_peft_model(model, r=16, target_modules=MODULES, lora_alpha=16, lora_dropout=0,
                                             bias="none", use_gradient_checkpointing="unsloth" if gc else False,
                                             random_state=3407)
    out = run_padded_timed(model, a, time.perf_counter())
    out["version"] = unsloth.__version__
    return out


def worker_unsloth_packed(a) -> dict:
    """Unsloth's padding-free mode, which it runs through TRL's SFTTrainer (its documented path): each batch of
    16 sequences flattened into one row with position ids restarting per sequence; no gradient checkpointing."""
    import torch
    import unsloth
    from datasets import Dataset
    from transformers import TrainerCallback
    from trl import SFTConfig, SFTTrainer
    from unsloth import FastLanguageModel

    model, tok = FastLanguageModel.from_pretrained(a.model, max_seq_length=1024, dtype=torch.bfloat16,
                                                   load_in_4bit=False)
    model = FastLanguageModel.get_peft_model(model, r=16, target_modules=MODULES, lora_alpha=16, lora_dropout=0,
                                             bias="none", use_gradient_checkpointing=False, random_state=3407)
    docs = documents(list(batches(a.steps, a.bs)))
    lengths = [len(ids) for ids, _ in docs]
    marks = {}

    class Clock(TrainerCallback):
        def on_train_begin(self, args, state, control, **kw):
            marks["begin"] = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            if state.global_step == a.warm:
                torch.cuda.synchronize()
                marks["warm"] = time.perf_counter()

    cfg = SFTConfig(output_dir=os.path.join(tempfile.gettempdir(), "unsloth_packed"), per_device_train_batch_size=a.bs,
                    max_steps=a.steps, learning_rate=2e-4, logging_steps=10, bf16=True, report_to=[],
                    save_strategy="no", padding_free=True, max_length=1024, dataset_num_proc=1, seed=3407,
                    optim="adamw_torch_fused", weight_decay=0.0, warmup_steps=0,
                    gradient_accumulation_steps=1)  # Unsloth's patched trainer made it 2 when left out
    trainer = SFTTrainer(model=model, processing_class=tok, train_dataset=Dataset.from_dict(
        {"input_ids": [ids for ids, _ in docs]}), args=cfg, callbacks=[Clock()])
    t_loaded = time.perf_counter()
    torch.cuda.reset_peak_memory_stats()
    result = trainer.train()
    torch.cuda.synchronize()
    dt = time.perf_counter() - marks["warm"]
    # The trainer shuffles: the timed steps hold (steps - warm) / steps of the sequences, on average.
    share = (a.steps - a.warm) / a.steps
    tokens = sum(lengths) * share
    return {"tokens_per_s": round(tokens / dt), "step_ms": round(1000 * dt / (a.steps - a.warm), 1),
            "peak_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2),
            "reserved_gib": round(torch.cuda.max_memory_reserved() / 2**30, 2),
            "mfu": round(model_flops(lengths) * share / dt / PEAK_BF16, 3), "loss": round(result.training_loss, 3),
            "load_s": round(t_loaded - T0, 1), "warmup_s": round(marks["warm"] - t_loaded, 1),
            "version": unsloth.__version__}


def doc_lengths(buffer) -> list[int]:
    """The documents of a packed buffer (its padding tail is none)."""
    lengths = (buffer.cu_seqlens[1:] - buffer.cu_seqlens[:-1]).tolist()
    return lengths[:-1] if buffer.num_tokens < buffer.input_ids.shape[0] else lengths


def worker_fast(a, low_memory: bool, mode: str = "normal") -> dict:
    """tunesmith's path on the same sequences through FastEngine, the engine `tunesmith train` runs: packed
    into buffers of 4,096 tokens (8,192 with low_memory), one buffer per optimizer step, as the CLI's loop
    calls it (`engine.step(i)`, nothing read back between steps). `mode`: "ungrouped" runs each LoRA projection
    on its own (the step before issue 31); "blk64" runs flex attention over 64-token blocks; "qlora" loads the
    base 4-bit as `tunesmith train` does for train.method: qlora (bitsandbytes NF4, double quantization) under the
    QLoRA memory cap; "qlora_c256" the same with 256-token loss chunks (not 1,024); "qlora2k" with 2,048-token
    buffers (not 4,096) and 256-token loss chunks (the QLoRA memory levers, issue 31)."""
    import functools
    from types import SimpleNamespace

    import torch

    from tunesmith.config import Config
    from tunesmith.train import fast
    from tunesmith.train.engines import FastEngine

    qlora = mode.startswith("qlora")
    apply_cap(a, qlora)
    if mode == "qlora2k":  # half the saved layer inputs
        fast.FOUR_BIT_SEQ_LEN = 2048
    if mode in ("qlora_c256", "qlora2k"):  # a quarter of the loss chunk's logits, held while every input is saved
        prepare = fast.prepare_fast_model

        def prepare_small_chunks(*args, **kwargs):
            model = prepare(*args, **kwargs)
            model.ce_chunk = 256
            return model
        fast.prepare_fast_model = prepare_small_chunks
    if mode == "ungrouped":
        fast.prepare_fast_model = functools.partial(fast.prepare_fast_model, grouped=False)
    if mode == "blk64":
        fast.prepare_fast_model = functools.partial(fast.prepare_fast_model, attention_block=64)
    docs = documents(list(batches(a.docs_batches, a.bs)))
    config = Config.model_validate({"model": {"base": a.model}, "train": {
        "low_memory": low_memory, "learning_rate": 2e-4, "weight_decay": 0.0, "loss_on": "all",
        "method": "qlora" if qlora else "lora"}})
    data = SimpleNamespace(train=[{"input_ids": ids, "labels": labels} for ids, labels in docs], eval=[])
    torch.manual_seed(3407)
    if qlora:
        from tunesmith.models import load_model as load_base

        model = load_base(a.model, four_bit=True)
    else:
        model = load_model(a.model, device=a.device)
    engine = FastEngine(model, data, config, a.device, pad_id=0)
    t_loaded = time.perf_counter()
    steps = engine.steps_per_epoch
    warm = min(a.warm, steps // 4)
    sync = torch.cuda.synchronize if a.device == "cuda" else lambda: None
    if a.device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    for i in range(warm):
        engine.step(i)
    sync()
    t0 = time.perf_counter()
    lengths = []
    for i in range(warm, steps):
        loss, *_ = engine.step(i)
        lengths += [n for index in engine._global_buffers(i) for n in doc_lengths(engine.buffers[index])]
    sync()
    dt = time.perf_counter() - t0
    out = measured(lengths, dt, steps - warm, float(loss))
    out.update(seq_len=engine.seq_len, load_s=round(t_loaded - T0, 1), warmup_s=round(t0 - t_loaded, 1),
               graphed=getattr(engine._step, "graphed", False), steps=steps - warm, groups=len(engine.fast.groups),
               four_bit=engine.fast.four_bit, checkpointed=engine.fast.low_memory,
               fill=round(sum(b.num_tokens for b in engine.buffers) / (len(engine.buffers) * engine.seq_len), 3))
    if a.profile:
        out["profile"] = profile(lambda: engine.step(0), 5, 1000 * dt / (steps - warm))
        out["gemm_floor"] = gemm_floor(engine.seq_len, sum(lengths) / (steps - warm), model_flops(lengths) / (steps - warm))
    return out


def worker_cli(a) -> dict:
    """`tunesmith train` itself, as a user runs it, on the sequences `fast` trains (the same token ids, the
    same lengths), normal mode, one epoch; its step time from the arrival times of its log lines (every 10
    steps; the loop reads the loss back there, so the GPU has caught up at each line)."""
    import random_tokens

    from tunesmith.train.fast import DEFAULT_SEQ_LEN, pack

    docs = documents(list(batches(a.docs_batches, a.bs)))
    steps = len(pack(docs, DEFAULT_SEQ_LEN))  # one epoch: one buffer a step, as `fast` runs it
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        base = random_tokens.with_word_tokenizer(a.model, work / "base")
        lengths = random_tokens.write_records(work / "train.jsonl", [ids for ids, _ in docs])
        config = {"name": "cli", "runs_dir": str(work / "runs"), "model": {"base": str(base)},
                  "data": {"train_file": str(work / "train.jsonl"), "eval_fraction": 0.0},
                  "train": {"max_steps": steps, "learning_rate": 2e-4, "loss_on": "all", "device": a.device,
                            "fast": True,
                            "log_steps": 10, "save_steps": 10**6, "eval_steps": 10**6}}
        (work / "config.yaml").write_text(json.dumps(config))
        code, wall, lines = random_tokens.timed_lines(
            [sys.executable, "-m", "tunesmith.cli", "train", "--config", str(work / "config.yaml")],
            timeout=a.timeout - 10)
    print("\n".join(f"{t:8.2f} {line}" for t, line in lines), file=sys.stderr)
    logs = random_tokens.log_times(lines)[: steps // 10]  # the full 10-step windows
    first = max(1, -(-a.warm // 10))  # the first log line at or after the warm-up steps
    if code or len(logs) <= first:
        raise RuntimeError(f"tunesmith train: exit {code}, {len(logs)} log lines")
    timed = 10 * (len(logs) - 1 - first)
    dt = logs[-1] - logs[first]
    share = timed / steps  # every step trains one buffer of the epoch: the timed ones hold this share
    return {"tokens_per_s": round(sum(lengths) * share / dt), "step_ms": round(1000 * dt / timed, 1),
            "mfu": round(model_flops(lengths) * share / dt / PEAK_BF16, 3), "steps": timed,
            "first_log_s": round(logs[0], 1), "wall_s": round(wall, 1)}


KERNEL_KINDS = [  # (what, pattern of kernel names), first match wins
    ("GEMM (cuBLAS)", r"gemm|nvjet|cutlass|xmma|cublas|splitKreduce"),
    ("flex attention (Triton)", r"flex|triton_tem"),
    ("optimizer, clip, master copy", r"multi_tensor|adam|foreach|norm_kernel|_amp_"),
    ("fused elementwise / norms / loss (Triton)", r"^triton_"),
    ("copies and fills", r"[Mm]emcpy|[Mm]emset|copy|fill|CatArray"),
    ("other", r"."),
]
SYNC_CALLS = ("cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaEventSynchronize", "aten::_local_scalar_dense")


def profile(fn, steps: int, step_ms: float) -> dict:
    """Where a step's GPU time goes: `steps` calls of `fn` under torch.profiler (CUDA graphs replayed: CUPTI
    sees their kernels), each kernel's time per step and its share of the measured step; kernels grouped by
    kind; host reads (synchronizations) per step. Printed to stderr (the worker log) and returned."""
    import re

    import torch
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity

    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            fn()
        torch.cuda.synchronize()
    kernels: dict[str, list[float]] = {}
    syncs = -1  # the synchronize after the steps
    for e in prof.events():
        if e.device_type == DeviceType.CUDA:
            entry = kernels.setdefault(e.name, [0, 0.0])
            entry[0] += 1
            entry[1] += e.time_range.elapsed_us() / 1000
        elif e.name in SYNC_CALLS:
            syncs += 1
    rows = sorted(((name, n / steps, ms / steps) for name, (n, ms) in kernels.items()), key=lambda r: -r[2])
    kinds: dict[str, float] = {}
    for name, _, ms in rows:
        kind = next(k for k, pattern in KERNEL_KINDS if re.search(pattern, name))
        kinds[kind] = kinds.get(kind, 0.0) + ms
    busy = sum(ms for _, _, ms in rows)
    out = {"step_ms": round(step_ms, 2), "gpu_busy_ms": round(busy, 2), "host_syncs_per_step": syncs / steps,
           "kinds": {k: round(v, 2) for k, v in sorted(kinds.items(), key=lambda kv: -kv[1])},
           "top": [(name[:90], round(n, 1), round(ms, 3)) for name, n, ms in rows[:25]],
           "kernels_per_step": round(sum(n for _, n, _ in rows))}
    lines = [(f"profile: {steps} steps, step {step_ms:.1f} ms measured, GPU busy {busy:.1f} ms "
              f"({100 * busy / step_ms:.0f}%), host synchronizations per step {syncs / steps:g}")]
    lines += [f"{ms:8.3f} ms {100 * ms / step_ms:5.1f}%  {kind}" for kind, ms in out["kinds"].items()]
    lines += [f"{ms:8.3f} ms {100 * ms / step_ms:5.1f}% x{n:<5g} {name}" for name, n, ms in out["top"]]
    print("\n".join(lines), file=sys.stderr)
    return out


def gemm_floor(seq_len: int, tokens_per_step: float, flops_per_step: float) -> dict:
    """The frozen matmuls of one step at this buffer size, each timed alone (cuBLAS, bf16, random data): forward
    and input-gradient of the 7 projections x 28 layers, and the lm_head in the loss's 2,048-token chunks. Their
    sum is a floor under the step no kernel fusion elsewhere can go below, and the MFU that floor would give."""
    import torch
    from triton.testing import do_bench

    c = C
    d, f, q, kv = c["hidden_size"], c["intermediate_size"], c["num_attention_heads"] * c["head_dim"], \
        c["num_key_value_heads"] * c["head_dim"]
    shapes = [(d, q), (d, kv), (d, kv), (q, d), (d, f), (d, f), (f, d)]  # (in, out) per projection
    layer_ms = 0.0
    rows = []
    for k, n in shapes:
        for m_in, m_out in ((k, n), (n, k)):  # forward x W^T, then gradient g W
            x = torch.randn(seq_len, m_in, device="cuda", dtype=torch.bfloat16)
            w = torch.randn(m_out, m_in, device="cuda", dtype=torch.bfloat16)
            ms = do_bench(lambda x=x, w=w: x @ w.T, warmup=25, rep=100, return_mode="median")
            layer_ms += ms
            rows.append((seq_len, m_in, m_out, round(ms * 1000, 1), round(2 * seq_len * m_in * m_out / ms / 1e9)))
    chunk = 2048
    h = torch.randn(chunk, d, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(c["vocab_size"], d, device="cuda", dtype=torch.bfloat16)
    g = torch.randn(chunk, c["vocab_size"], device="cuda", dtype=torch.bfloat16)
    head_ms = (do_bench(lambda: h @ w.T, warmup=25, rep=100, return_mode="median")
               + do_bench(lambda: g @ w, warmup=25, rep=100, return_mode="median")) * seq_len / chunk
    floor = layer_ms * c["num_hidden_layers"] + head_ms
    out = {"frozen_gemm_ms": round(floor, 2), "lm_head_ms": round(head_ms, 2),
           "mfu_if_only_these": round(flops_per_step / (floor / 1000) / PEAK_BF16, 3),
           "shapes_us_tflops": rows}
    print(f"GEMM floor: {floor:.2f} ms a step ({head_ms:.2f} lm_head), MFU at that floor "
          f"{100 * out['mfu_if_only_these']:.1f}%; (M, K, N, us, TFLOP/s): {rows}", file=sys.stderr)
    return out


def worker_scale(a) -> dict:
    """One rank of the scaling run (started by torch.distributed.run; alone when WORLD_SIZE is unset)."""
    import faulthandler

    import torch

    from tunesmith.config import LoraConfig
    from tunesmith.train import distributed
    from tunesmith.train.fast import make_optimizer, make_train_step, pack, prepare_fast_model

    faulthandler.dump_traceback_later(max(30, a.timeout - 20), exit=True)  # a hang shows where, in the log
    world = distributed.init("cuda")
    if a.global_buffers % world.size:
        raise SystemExit(f"--global-buffers {a.global_buffers} does not split over {world.size} GPUs")
    packed = pack(documents(list(batches(a.docs_batches, a.bs))), a.seq_len)
    torch.manual_seed(3407)
    fast = prepare_fast_model(load_model(a.model), LoraConfig())
    opt = make_optimizer(fast, lr=2e-4)
    step = make_train_step(fast, opt, all_reduce=distributed.all_reduce_sum if world.size > 1 else None)
    steps = len(packed) // a.global_buffers
    warm = min(a.warm, steps // 4)
    torch.cuda.reset_peak_memory_stats()
    curve, tokens, t0 = [], 0, time.perf_counter()
    for i in range(steps):
        if i == warm:
            torch.cuda.synchronize()
            t0, tokens = time.perf_counter(), 0
        group = packed[i * a.global_buffers:(i + 1) * a.global_buffers]  # the same global batch on 1 or 2 GPUs
        loss = step(world.shard(group), normalizer=max(1, sum(b.num_targets for b in group)))
        tokens += sum(b.num_tokens for b in group)
        curve.append(loss)
    torch.cuda.synchronize()
    dt = time.perf_counter() - t0
    curve = [world.sum(float(x)) for x in curve]  # each rank's loss is its share of the global mean
    out = {"gpus": world.size, "tokens_per_s": round(tokens / dt), "step_ms": round(1000 * dt / (steps - warm), 1),
           "peak_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2), "steps": steps, "warm": warm,
           "global_tokens_per_step": round(sum(b.num_tokens for b in packed[:steps * a.global_buffers]) / steps),
           "graphed": getattr(step, "graphed", False), "curve": [round(x, 4) for x in curve]}
    distributed.teardown()
    return out if world.main else {}


def run_scaling(a, gpus: int) -> dict:
    """The scaling worker on `gpus` GPUs of this host, under torch.distributed.run as `tunesmith train --gpus`."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={gpus}",
           os.path.abspath(__file__), "--worker", "scale", "--model", a.model, "--warm", str(a.warm),
           "--seq-len", str(a.seq_len), "--docs-batches", str(a.docs_batches),
           "--global-buffers", str(a.global_buffers), "--timeout", str(a.timeout)]
    # stderr straight to the log file, so that a run killed at the timeout still leaves its output there
    with open(a.log or os.devnull, "a") as err:
        err.write(f"==== scaling, {gpus} GPU(s)\n")
        err.flush()
        try:
            proc = subprocess.run(cmd, check=False, stdout=subprocess.PIPE, stderr=err, text=True,
                                  timeout=a.timeout, env={**os.environ, "PYTHONUNBUFFERED": "1"})
        except subprocess.TimeoutExpired:
            return {"error": f"timed out after {a.timeout} s"}
        err.write(proc.stdout)
    lines = [x for x in proc.stdout.splitlines() if x.startswith("{") and x != "{}"]
    if proc.returncode or not lines:
        return {"error": f"exit {proc.returncode}; see {a.log}"}
    return json.loads(lines[-1])


def scaling_table(one: dict, two: dict) -> str:
    rows = ["| GPUs | useful tokens/s | step ms | peak GiB per GPU | CUDA graphs |", "|---|---|---|---|---|"]
    for r in (one, two):
        if "tokens_per_s" in r:
            rows.append(f"| {r['gpus']} | {r['tokens_per_s']:,} | {r['step_ms']} | {r['peak_gib']} | {r['graphed']} |")
        else:
            rows.append(f"| ? | ERROR {r.get('error')} | | | |")
    if "tokens_per_s" in one and "tokens_per_s" in two:
        speedup = two["tokens_per_s"] / one["tokens_per_s"]
        gap = max(abs(x - y) / y for x, y in zip(two["curve"], one["curve"], strict=True))
        rows.append(f"\nspeed-up {speedup:.2f}x, efficiency {100 * speedup / 2:.0f}% (target: >= 1.8x); "
                    f"{one['steps']} steps of ~{one['global_tokens_per_step']:,} tokens, loss curves "
                    f"{one['curve'][0]} -> {one['curve'][-1]} (1 GPU), max rel diff {gap:.2e} (bf16 rounding)")
    return "\n".join(rows)


def worker_equiv(a) -> dict:
    """Fast path vs transformers + peft on the same batch (loss, LoRA gradients), then a short run."""
    import torch
    from peft import set_peft_model_state_dict

    from tunesmith.config import LoraConfig
    from tunesmith.train.fast import make_optimizer, make_train_step, pack, prepare_fast_model

    torch.manual_seed(3407)
    fast = prepare_fast_model(load_model(a.model), LoraConfig())
    ref = peft_model(load_model(a.model))
    g = torch.Generator().manual_seed(1)
    state = {k: v if "lora_A" in k else torch.randn(v.shape, generator=g) * 0.02
             for k, v in fast.adapter_state_dict().items()}  # nonzero B, so A gets gradients too
    fast.load_adapter_state_dict(state)
    set_peft_model_state_dict(ref, state)
    train = list(batches(4, seed=7))

    def ref_loss(b):
        ids, mask, labels, _ = b
        return ref(input_ids=ids.cuda(), attention_mask=mask.cuda(), labels=labels.cuda()).loss

    one = pack(documents(train[:1]), 8192)
    assert len(one) == 1
    loss_f = fast(one[0].to("cuda"))
    loss_f.backward()
    fast.grads_to_master()
    loss_r = ref_loss(train[0])
    loss_r.backward()
    loss_f, loss_r = loss_f.detach(), loss_r.detach()  # free the graphs: the CUDA-graph step needs that
    grads_f = fast.adapter_state_dict(grads=True)
    grads_r = {k.replace(".default", ""): p.grad.float().cpu() for k, p in ref.named_parameters() if p.requires_grad}
    cos = [float(torch.nn.functional.cosine_similarity(grads_f[k].double().flatten(),
                                                       grads_r[k].double().flatten(), dim=0)) for k in grads_f]
    flat_f = torch.cat([grads_f[k].double().flatten() for k in grads_f])
    flat_r = torch.cat([grads_r[k].double().flatten() for k in grads_f])
    result = {"loss_fast": round(float(loss_f), 5), "loss_ref": round(float(loss_r), 5),
              "loss_rel_diff": float(abs(loss_f - loss_r) / loss_r),
              "grad_cos_all": float(torch.nn.functional.cosine_similarity(flat_f, flat_r, dim=0)),
              "grad_cos_min": min(cos), "grad_norm_ratio": float(flat_f.norm() / flat_r.norm())}
    # Short run: same start, same 4 batches cycled, lr 1e-3 so the loss moves (it memorizes them).
    fast.grads_to_master()
    ref.zero_grad(set_to_none=True)
    opt_f = make_optimizer(fast, lr=1e-3)
    step = make_train_step(fast, opt_f)
    opt_r = torch.optim.AdamW([p for p in ref.parameters() if p.requires_grad], lr=1e-3, weight_decay=0.0,
                            fused=True)
    packed = [pack(documents([b]), 8192)[0] for b in train]
    curve_f, curve_r = [], []
    for i in range(a.curve_steps):
        curve_f.append(float(step(packed[i % 4])))
        loss = ref_loss(train[i % 4])
        loss.backward()
        opt_r.step()
        opt_r.zero_grad(set_to_none=True)
        curve_r.append(float(loss))
    result["graphed"] = getattr(step, "graphed", False)
    result.update(curve_fast=[round(x, 3) for x in curve_f], curve_ref=[round(x, 3) for x in curve_r],
                  curve_max_rel_diff=max(abs(f - r) / r for f, r in zip(curve_f, curve_r, strict=True)))
    result["ok"] = (result["loss_rel_diff"] < 1e-2 and result["grad_cos_min"] > 0.99
                    and result["curve_max_rel_diff"] < 2e-2 and result["graphed"])
    return result


def apply_cap(a, qlora: bool) -> None:
    """Cap this process's GPU memory (QLoRA stacks): what does not fit raises out-of-memory, as on a small card."""
    import torch

    if qlora and a.qlora_cap_gib and torch.cuda.is_available():
        total = torch.cuda.get_device_properties(0).total_memory
        torch.cuda.set_per_process_memory_fraction(min(1.0, a.qlora_cap_gib * 2**30 / total))


def worker_checks(a) -> dict:
    """On the GPU, at the architecture of --model: (1) the fast path's NF4 dequantizer against bitsandbytes'
    kernel on bitsandbytes' own storage, bit for bit, eager and compiled; (2) tunesmith's NF4 quantizer against
    bitsandbytes' (informative: the CPU tests use tunesmith's); (3) the fast path on the bitsandbytes 4-bit base
    against transformers + peft on the same base (QLoRA as the transformers loop trains it): loss and LoRA
    gradients, bf16; (4) the adapter the 4-bit fast path trains, merged as `tunesmith export` merges QLoRA
    (bitsandbytes base + adapter against the dequantized base with the adapter merged, logits on prompts)."""
    import tempfile as tf

    import bitsandbytes.functional as bnbf
    import torch
    from peft import PeftModel, set_peft_model_state_dict

    from tunesmith.config import LoraConfig
    from tunesmith.export import merge
    from tunesmith.models import load_model as load_base
    from tunesmith.train.fast import make_optimizer, make_train_step, pack, prepare_fast_model, save_adapter
    from tunesmith.train.fast.nf4 import NF4_CODE, NF4Linear, dequantize, quantize

    out: dict = {}
    g = torch.Generator(device="cuda").manual_seed(0)
    exact, compiled_exact, code_agree = [], [], []
    deq = torch.compile(lambda w: dequantize(w, torch.bfloat16), dynamic=False)
    for shape in ((4096, 4096), (1024, 4096), (12288, 4096), (4096, 12288), (3072, 1024)):
        w = (torch.randn(shape, device="cuda", generator=g) * 0.02).to(torch.bfloat16)
        packed, qstate = bnbf.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=True)
        ref = bnbf.dequantize_4bit(packed, qstate)
        linear = torch.nn.Module()
        linear.weight = torch.nn.Parameter(packed, requires_grad=False)
        linear.weight.quant_state = qstate
        linear.bias = None
        mine = NF4Linear.from_bnb(linear).nf4
        exact.append(float((dequantize(mine, torch.bfloat16) != ref).float().mean()))
        if not compiled_exact:  # compiled once (one shape): the kernel Inductor makes of the same ops
            compiled_exact.append(float((deq(mine) != ref).float().mean()))
        single = quantize(w)  # tunesmith's quantizer: codes against bitsandbytes' (single quantization)
        packed1, _ = bnbf.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=False)
        code_agree.append(float((single.packed == packed1.reshape(-1)).float().mean()))
    out["nf4_dequant_mismatch_eager"] = max(exact)
    out["nf4_dequant_mismatch_compiled"] = max(compiled_exact)
    out["nf4_quantizer_byte_agreement_min"] = min(code_agree)
    out["nf4_code_matches_bnb"] = bool(torch.equal(qstate.code.float().cpu(), torch.tensor(NF4_CODE)))
    print("nf4:", out, file=sys.stderr, flush=True)

    # (3) fast path vs transformers + peft, both on the bitsandbytes 4-bit base.
    torch.manual_seed(3407)
    fast = prepare_fast_model(load_base(a.model, four_bit=True), LoraConfig())
    ref = peft_model(load_base(a.model, four_bit=True))
    gen = torch.Generator().manual_seed(1)
    state = {k: v if "lora_A" in k else torch.randn(v.shape, generator=gen) * 0.02
             for k, v in fast.adapter_state_dict().items()}
    fast.load_adapter_state_dict(state)
    set_peft_model_state_dict(ref, state)
    batch = next(iter(batches(1, a.bs, seed=7)))
    one = pack(documents([batch]), fast_buffer(fast, batch))[0]
    loss_f = fast(one.to("cuda"))
    loss_f.backward()
    fast.grads_to_master()
    ids, mask, labels, _ = batch
    with torch.autocast("cuda", dtype=torch.bfloat16):
        loss_r = ref(input_ids=ids.cuda(), attention_mask=mask.cuda(), labels=labels.cuda()).loss
    loss_r.backward()
    grads_f = fast.adapter_state_dict(grads=True)
    grads_r = {k.replace(".default", ""): p.grad.float().cpu() for k, p in ref.named_parameters() if p.requires_grad}
    cos = [float(torch.nn.functional.cosine_similarity(grads_f[k].double().flatten(), grads_r[k].double().flatten(),
                                                       dim=0)) for k in grads_f]
    lf, lr_ = float(loss_f), float(loss_r)
    out.update(qlora_loss_fast=round(lf, 5), qlora_loss_ref=round(lr_, 5), qlora_loss_rel_diff=abs(lf - lr_) / lr_,
               qlora_grad_cos_min=min(cos), qlora_checkpointed=fast.low_memory, qlora_groups=len(fast.groups))
    print("qlora equivalence:", out, file=sys.stderr, flush=True)
    del ref, loss_r, loss_f  # free the autograd graphs: the CUDA-graph step needs that
    fast.grads_to_master()
    # (4) train a few steps (the CUDA-graph step), save the adapter, merge as export merges QLoRA.
    step = make_train_step(fast, make_optimizer(fast, lr=1e-3), max_grad_norm=1.0)
    curve = [float(step(one)) for _ in range(8)]
    out["qlora_curve"] = [round(x, 3) for x in curve]
    out["qlora_graphed"] = getattr(step, "graphed", False)
    with tf.TemporaryDirectory() as tmp:
        adapter = save_adapter(fast.adapter_state_dict(), LoraConfig(), os.path.join(tmp, "adapter"))
        prompts = [ids[i, :40].tolist() for i in range(3)]
        del fast, step
        torch.cuda.empty_cache()
        qlora = PeftModel.from_pretrained(load_base(a.model, four_bit=True), adapter).eval()
        expected = merge.logits(qlora, prompts)  # the model that was trained: bitsandbytes' base + the adapter
        del qlora
        torch.cuda.empty_cache()
        merged = PeftModel.from_pretrained(merge.dequantized(load_base(a.model, four_bit=True)), adapter)
        merged = merged.merge_and_unload()
        check = merge.check_logits(expected, merge.logits(merged, prompts), float("inf"))
    out.update(merge_relative=check.relative, merge_tolerance=merge.TOLERANCE_4BIT)
    out["ok"] = (out["nf4_dequant_mismatch_eager"] == 0 and out["qlora_loss_rel_diff"] < 1e-2
                 and out["qlora_grad_cos_min"] > 0.99 and check.relative <= merge.TOLERANCE_4BIT)
    return out


def fast_buffer(fast, batch) -> int:
    """A buffer that holds the whole batch (for equivalence checks)."""
    return 256 * -(-int(batch[1].sum()) // 256)


# Driver -----------------------------------------------------------------------------------------------
UNSLOTH_SITE = os.environ.get("UNSLOTH_SITE")
"""A folder holding Unsloth and its dependencies (../shared/bench/unsloth_site.sh unpacked), if not installed."""
BNB_SITE = os.environ.get("BNB_SITE")
"""A folder holding bitsandbytes alone (gpu_setup.sh links it from UNSLOTH_SITE) for tunesmith's QLoRA processes."""


def unsloth_available() -> bool:
    if UNSLOTH_SITE:
        return os.path.isdir(os.path.join(UNSLOTH_SITE, "unsloth"))
    return importlib.util.find_spec("unsloth") is not None


def versions() -> dict:
    import peft
    import torch
    import transformers
    import triton
    from triton.testing import do_bench

    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    matmul_ms = do_bench(lambda a=a, b=b: a @ b, warmup=50, rep=200, return_mode="median")  # the card's ceiling, today
    del a, b
    torch.cuda.empty_cache()
    return {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "cuda": torch.version.cuda,
            "transformers": transformers.__version__, "peft": peft.__version__, "triton": triton.__version__,
            "matmul_8192_tflops": round(2 * 8192**3 / matmul_ms / 1e9)}


def warm_machine(seconds: float) -> dict:
    """Warm a fresh machine before the first timed run: touch 24 GiB of host memory (a fresh VM's memory is
    slow on first touch), then time a host-bound loop (small eager GPU ops, as eager stacks launch them) in
    5-second windows. Returns the touch time and the loop's rate per window: a rate still rising at the end
    says the machine was not yet warm."""
    import numpy as np
    import torch

    t0 = time.perf_counter()
    for _ in range(6):
        block = np.ones(4 * 2**30 // 8)  # 4 GiB, every page written
        del block
    touched = time.perf_counter() - t0
    x = torch.randn(256, 256, device="cuda")
    rates, end = [], time.perf_counter() + seconds
    while time.perf_counter() < end:
        n, window = 0, time.perf_counter() + 5
        while time.perf_counter() < window:
            for _ in range(100):
                x = torch.tanh(x @ x) * 0.5
            n += 100
        torch.cuda.synchronize()
        rates.append(round(n / 5))
    return {"host_touch_24gib_s": round(touched, 1), "host_bound_ops_per_s": rates}


def run_worker(stack: str, a, profile_it: bool = False) -> dict:
    """Run one stack in a fresh process."""
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", stack, "--model", a.model, "--device", a.device,
           "--arch", a.arch, "--bs", str(a.bs), "--qlora-cap-gib", str(a.qlora_cap_gib),
           "--steps", str(a.steps), "--warm", str(a.warm), "--seq-len", str(a.seq_len),
           "--docs-batches", str(a.docs_batches), "--curve-steps", str(a.curve_steps), "--timeout", str(a.timeout)]
    cmd += ["--profile", stack] if profile_it else []
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    extra = []
    if stack.startswith("unsloth") and UNSLOTH_SITE:  # Unsloth's packages only where it runs: they shadow others
        extra = [UNSLOTH_SITE]
    elif ("qlora" in stack or stack == "checks") and BNB_SITE:
        extra = [BNB_SITE]
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [*extra, env.get("PYTHONPATH")]))
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=a.timeout, env=env,
                              cwd=a.workdir)
    except subprocess.TimeoutExpired as exc:
        if a.log:
            with open(a.log, "a") as f:
                f.write(f"==== {stack} (timed out)\n{exc.stdout or ''}{exc.stderr or ''}")
        return {"error": f"timed out after {a.timeout} s"}
    if a.log:
        with open(a.log, "a") as f:
            f.write(f"==== {stack}\n{proc.stdout}{proc.stderr}")
    lines = [x for x in proc.stdout.splitlines() if x.startswith("{")]
    if proc.returncode or not lines:
        tail = [x for x in proc.stderr.strip().splitlines() if x.strip()][-3:]
        return {"error": " | ".join(tail)[-400:] or f"exit {proc.returncode}"}
    out = json.loads(lines[-1])
    out["wall_s"] = round(time.perf_counter() - t0)
    return out


def median(values: list[float]) -> float:
    v = sorted(values)
    n = len(v)
    return v[n // 2] if n % 2 else (v[n // 2 - 1] + v[n // 2]) / 2


def summary(samples: dict[str, list[dict]]) -> dict[str, dict]:
    """Per stack: median and range of tokens/s, median MFU and step, largest peak memory, the samples."""
    out = {}
    for stack, runs in samples.items():
        ok = [r for r in runs if "tokens_per_s" in r]
        if not ok:
            continue
        speeds = [r["tokens_per_s"] for r in ok]
        out[stack] = {"n": len(ok), "median": median(speeds), "min": min(speeds), "max": max(speeds),
                      "mfu": median([r["mfu"] for r in ok]), "step_ms": median([r["step_ms"] for r in ok]),
                      "peak_gib": max((r.get("peak_gib", 0.0) for r in ok), default=0.0), "samples": speeds}
    return out


PAIRS = [  # (ours, theirs, what the issue asks)
    ("fast", "unsloth", "normal vs Unsloth's fastest (no checkpointing)"),
    ("fast", "unsloth_packed", "normal vs Unsloth padding-free"),
    ("fast_low", "unsloth_gc", "low_memory vs Unsloth with its checkpointing"),
    ("fast", "unsloth_gc", "normal vs Unsloth with its checkpointing"),
    ("fast_qlora", "unsloth_qlora", "QLoRA vs Unsloth QLoRA (its checkpointing)"),
    ("fast_qlora", "unsloth_qlora_nogc", "QLoRA vs Unsloth QLoRA without checkpointing"),
    ("fast_qlora_c256", "unsloth_qlora", "QLoRA, 256-token loss chunks, vs Unsloth QLoRA"),
    ("fast_qlora2k", "unsloth_qlora", "QLoRA on 2,048-token buffers vs Unsloth QLoRA"),
    ("fast", "fast_ungrouped", "grouped LoRA projections vs one by one"),
    ("fast", "hf", "normal vs transformers + peft"),
]


def table(stats: dict[str, dict]) -> str:
    rows = ["| stack | runs | useful tokens/s, median (range) | MFU (median) | step ms | peak GiB |",
            "|---|---|---|---|---|---|"]
    for stack, st in stats.items():
        rows.append(f"| {STACKS[stack]} | {st['n']} | **{st['median']:,.0f}** ({st['min']:,}-{st['max']:,}) | "
                    f"{100 * st['mfu']:.1f}% | {st['step_ms']} | {st['peak_gib']} |")
    rows.append("")
    for ours, theirs, what in PAIRS:
        if ours in stats and theirs in stats:
            a, b = stats[ours], stats[theirs]
            rows.append(f"- {what}: **{a['median'] / b['median']:.2f}x** (ratio of medians; every pair of samples "
                        f"{a['min'] / b['max']:.2f}-{a['max'] / b['min']:.2f}x), peak {a['peak_gib']} vs "
                        f"{b['peak_gib']} GiB")
    return "\n".join(rows)


def profile_table(p: dict) -> str:
    busy = 100 * p["gpu_busy_ms"] / p["step_ms"]
    rows = [(f"GPU busy {p['gpu_busy_ms']} of {p['step_ms']} ms a step ({busy:.0f}%), {p['kernels_per_step']} "
             f"kernels a step, host synchronizations per step: {p['host_syncs_per_step']:g}"),
            "", "| kernels | ms a step | share of the step |", "|---|---|---|"]
    rows += [f"| {kind} | {ms} | {100 * ms / p['step_ms']:.1f}% |" for kind, ms in p["kinds"].items()]
    rows += ["", "| kernel | calls a step | ms a step | share |", "|---|---|---|---|"]
    rows += [f"| `{name}` | {n:g} | {ms} | {100 * ms / p['step_ms']:.1f}% |" for name, n, ms in p["top"][:15]]
    return "\n".join(rows)


def main() -> None:
    global C
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--stacks", default="fast,unsloth,fast_low,unsloth_gc",
                    help="stacks of every round; STACK:N runs in the first N rounds only")
    ap.add_argument("--before", default="", help="stacks run once, before the rounds (checks, equiv, cli)")
    ap.add_argument("--rounds", type=int, default=3, help="runs of each stack, interleaved")
    ap.add_argument("--warm-machine", type=float, default=45, help="seconds of warming before the first run")
    ap.add_argument("--arch", choices=sorted(ARCHS), default="0.6b")
    ap.add_argument("--bs", type=int, help="sequences per padded batch (default: 16 at 0.6b, 8 at 8B)")
    ap.add_argument("--qlora-cap-gib", type=float, default=14.5,
                    help="QLoRA stacks' GPU memory cap (a 16 GB card's usable memory); 0: none")
    ap.add_argument("--scaling", action="store_true", help="the fast path on 1 then 2 GPUs, same global batch")
    ap.add_argument("--global-buffers", type=int, default=4, help="--scaling: packed buffers per optimizer step")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--model", help="the random-weight checkpoint (default: /tmp/<arch>-random)")
    ap.add_argument("--workdir", default=os.path.join(tempfile.gettempdir(), "bench-work"),
                    help="the workers' current directory (Unsloth keeps its compiled cache there)")
    ap.add_argument("--device", default="cuda", help=argparse.SUPPRESS)  # cpu: check fast/cli without a GPU
    ap.add_argument("--steps", type=int, help="padded batches per padded stack")
    ap.add_argument("--warm", type=int)
    ap.add_argument("--seq-len", type=int, default=4096, help="--scaling: buffer tokens (FastEngine picks its own)")
    ap.add_argument("--docs-batches", type=int, help="batches packed for the fast path")
    ap.add_argument("--curve-steps", type=int, default=20)
    ap.add_argument("--timeout", type=int, default=300)
    ap.add_argument("--budget-s", type=float, default=0,
                    help="start no run after this many seconds of the command (0: no limit); the table still prints")
    ap.add_argument("--profile", default="",
                    help="stacks (fast, fast_qlora) whose last run also profiles its step and the frozen-GEMM floor")
    ap.add_argument("--record", help="append the results as markdown to this file")
    ap.add_argument("--log", help="append each worker's full output to this file")
    ap.add_argument("--json", help="write all results as JSON here (after every run)")
    a = ap.parse_args()
    C = ARCHS[a.arch][0]
    for key, value in ARCHS[a.arch][2].items():
        if getattr(a, key) is None:
            setattr(a, key, value)
    a.model = a.model or os.path.join(tempfile.gettempdir(), f"{a.arch}-random")
    os.makedirs(a.workdir, exist_ok=True)
    if a.worker:
        profiling = a.profile == a.worker
        a.profile = profiling
        worker = {"hf": worker_hf, "equiv": worker_equiv, "scale": worker_scale, "cli": worker_cli,
                  "checks": worker_checks,
                  "unsloth": lambda a: worker_unsloth(a, False), "unsloth_gc": lambda a: worker_unsloth(a, True),
                  "unsloth_qlora": lambda a: worker_unsloth(a, True, four_bit=True),
                  "unsloth_qlora_nogc": lambda a: worker_unsloth(a, False, four_bit=True),
                  "unsloth_packed": worker_unsloth_packed,
                  "fast": lambda a: worker_fast(a, False), "fast_low": lambda a: worker_fast(a, True),
                  "fast_ungrouped": lambda a: worker_fast(a, False, "ungrouped"),
                  "fast_blk64": lambda a: worker_fast(a, False, "blk64"),
                  "fast_qlora": lambda a: worker_fast(a, False, "qlora"),
                  "fast_qlora_c256": lambda a: worker_fast(a, False, "qlora_c256"),
                  "fast_qlora2k": lambda a: worker_fast(a, False, "qlora2k")}[a.worker]
        print(json.dumps(worker(a)), flush=True)
        return
    started = time.perf_counter()
    made_s = make_model_dir(a.model, a.arch)
    info = (versions() if a.device == "cuda" else {"gpu": "none (cpu)", "torch": "", "transformers": "", "peft": "",
                                                  "matmul_8192_tflops": 0}) | {"arch": a.arch, "model_dir_s": made_s}
    print(json.dumps(info), flush=True)
    if a.scaling:
        one, two = run_scaling(a, 1), run_scaling(a, 2)
        text = scaling_table(one, two)
        if a.json:
            with open(a.json, "w") as f:
                json.dump({"versions": info, "args": vars(a), "results": {"1": one, "2": two}}, f, indent=1)
        if a.record:
            with open(a.record, "a") as f:
                f.write(f"\n### {time.strftime('%Y-%m-%d')} scaling, 2 x {info['gpu']}\n{json.dumps(info)}\n\n"
                        f"`python bench/train_gpu.py {' '.join(sys.argv[1:])}`\n\n{text}\n")
        print(text)
        return
    results: dict = {"versions": info, "args": vars(a), "once": {}, "samples": {}}

    def save() -> None:
        if a.json:
            with open(a.json, "w") as f:
                json.dump(results, f, indent=1)

    for stack in filter(None, a.before.split(",")):
        results["once"][stack] = run_worker(stack, a)
        print(stack, json.dumps(results["once"][stack]), flush=True)
        save()
    if a.warm_machine and a.device == "cuda":
        results["warm"] = warm_machine(a.warm_machine)
        print("warm", json.dumps(results["warm"]), flush=True)
    wanted = [s.split(":") for s in a.stacks.split(",") if s]
    stacks = [w[0] for w in wanted]
    rounds_of = {w[0]: int(w[1]) if len(w) > 1 else a.rounds for w in wanted}
    failed: set[str] = set()
    for r in range(a.rounds):
        order = stacks[r % len(stacks):] + stacks[:r % len(stacks)]
        for stack in order:
            if stack in failed or r >= rounds_of[stack]:
                continue
            if a.budget_s and time.perf_counter() - started > a.budget_s:
                print(f"budget: {a.budget_s:.0f} s spent, {stack} round {r} not run", flush=True)
                results.setdefault("not_run", []).append(f"{stack} round {r}")
                continue
            if stack.startswith("unsloth") and not unsloth_available():
                failed.add(stack)
                continue
            at = round(time.perf_counter() - started)
            out = run_worker(stack, a, profile_it=stack in a.profile.split(",") and r == a.rounds - 1)
            out.update(round=r, started_s=at)
            results["samples"].setdefault(stack, []).append(out)
            brief = {k: out.get(k) for k in ("tokens_per_s", "mfu", "peak_gib", "step_ms", "load_s", "warmup_s",
                                             "wall_s", "error")}
            print(f"round {r} {stack} at {at}s", json.dumps(brief), flush=True)
            if "error" in out:
                failed.add(stack)  # a stack that fails once is not run again: its error is in the log
            save()
    stats = summary(results["samples"])
    results["stats"] = stats
    save()
    text = table(stats)
    for stack, runs in results["samples"].items():
        for run in runs:
            if "profile" in run:
                text += f"\n\nWhere the step goes ({STACKS[stack]}, torch.profiler):\n\n{profile_table(run['profile'])}"
                if "gemm_floor" in run:
                    floor = run["gemm_floor"]
                    text += (f"\n\nThe frozen matmuls alone (cuBLAS, each timed apart): {floor['frozen_gemm_ms']} ms a "
                             f"step ({floor['lm_head_ms']} of it the lm_head): {100 * floor['mfu_if_only_these']:.1f}% "
                             "MFU if the step were nothing else.")
            if "error" in run:
                text += f"\n{stack}: ERROR {run['error']}"
    if results.get("not_run"):
        text += f"\n\nnot run (time budget): {', '.join(results['not_run'])}"
    for stack, once in results["once"].items():
        text += f"\n\n{stack}: {json.dumps({k: v for k, v in once.items() if k not in ('curve_fast', 'curve_ref')})}"
    if a.record:
        with open(a.record, "a") as f:
            f.write(f"\n### {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())} {info['gpu']}, {a.arch}\n"
                    f"{json.dumps(info)}\n\n`python bench/train_gpu.py {' '.join(sys.argv[1:])}`\n\n{text}\n")
    print(f"\n{info['gpu']} {a.arch} torch {info['torch']} transformers {info['transformers']} peft {info['peft']} "
          f"matmul {info['matmul_8192_tflops']} TFLOP/s")
    print(text)


if __name__ == "__main__":
    main()
