"""GPU training speed: tunesmith's fast path vs transformers + peft vs Unsloth, one run, one card.

The workload of issue 8 (and ../shared/bench/anchor_sft.py): the Qwen3-0.6B architecture with random
weights, LoRA r=16 alpha=16 on the seven projections, bf16, AdamW, lr 2e-4, batches of 16 sequences with
lengths uniform in 64-512 and random tokens, every token trained. Reports useful (non-pad) tokens/s after
warm-up, peak GPU memory, MFU (model FLOPs of the useful tokens over 989 TFLOP/s dense bf16) and the
equivalence of the fast path with transformers + peft. Each stack runs in its own process.

    python bench/train_gpu.py                      # every stack; Unsloth if importable
    python bench/train_gpu.py --stacks fast,hf --record bench/RESULTS.md
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

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

QWEN3_06B = {
    "attention_bias": False, "attention_dropout": 0.0, "bos_token_id": 151643, "eos_token_id": 151645,
    "head_dim": 128, "hidden_act": "silu", "hidden_size": 1024, "initializer_range": 0.02,
    "intermediate_size": 3072, "max_position_embeddings": 40960, "max_window_layers": 28,
    "num_attention_heads": 16, "num_hidden_layers": 28, "num_key_value_heads": 8, "rms_norm_eps": 1e-06,
    "rope_theta": 1000000, "sliding_window": None, "tie_word_embeddings": True, "use_cache": False,
    "use_sliding_window": False, "vocab_size": 151936,
}
MODULES = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
PEAK_BF16 = 989e12  # H100/H200 SXM dense bf16, datasheet
STACKS = {
    "fast": "tunesmith fast path",
    "fast_low": "tunesmith fast path, low_memory",
    "hf": "transformers + peft, SDPA, padded per batch",
    "unsloth": "Unsloth (FastLanguageModel + its gradient checkpointing), plain loop",
}


# Workload -------------------------------------------------------------------------------------------
def make_model_dir(path: str) -> None:
    import torch
    from transformers import AutoModelForCausalLM, Qwen3Config

    if os.path.exists(os.path.join(path, "config.json")):
        return
    torch.manual_seed(0)
    cfg = Qwen3Config(**QWEN3_06B)
    cfg.architectures = ["Qwen3ForCausalLM"]
    AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16).save_pretrained(path)


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
    c = QWEN3_06B
    d, f, layers, heads, hd, kv = (c["hidden_size"], c["intermediate_size"], c["num_hidden_layers"],
                                   c["num_attention_heads"], c["head_dim"], c["num_key_value_heads"])
    frozen = layers * (d * heads * hd + 2 * d * kv * hd + heads * hd * d + 3 * d * f) + c["vocab_size"] * d
    r = 16
    lora = layers * r * ((d + heads * hd) * 2 + (d + kv * hd) * 2 + (d + f) * 3)
    tokens = sum(lengths)
    attention = sum(3 * 2 * n * n * heads * hd * layers for n in lengths)
    return tokens * (4 * frozen + 6 * lora) + attention


# Workers ----------------------------------------------------------------------------------------------
def load_model(path: str, attn: str = "sdpa"):
    import torch
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16, attn_implementation=attn).cuda()


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
    lengths, t0 = [], None
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
    return measured(lengths, dt, a.steps - a.warm, float(out.loss.detach()))


def measured(lengths: list[int], dt: float, steps: int, loss: float) -> dict:
    import torch

    return {"tokens_per_s": round(sum(lengths) / dt), "step_ms": round(1000 * dt / steps, 1),
            "peak_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2),
            "reserved_gib": round(torch.cuda.max_memory_reserved() / 2**30, 2),
            "mfu": round(model_flops(lengths) / dt / PEAK_BF16, 3), "loss": round(loss, 3)}


def worker_hf(a) -> dict:
    model = peft_model(load_model(a.model))
    return run_padded(model, a, list(batches(a.steps)))


def worker_unsloth(a) -> dict:
    import torch
    import unsloth  # before transformers: it patches it
    from unsloth import FastLanguageModel

    model, _ = FastLanguageModel.from_pretrained(a.model, max_seq_length=1024, dtype=torch.bfloat16,
                                                 load_in_4bit=False)
    model = FastLanguageModel.get_peft_model(model, r=16, target_modules=MODULES, lora_alpha=16, lora_dropout=0,
                                             bias="none", use_gradient_checkpointing="unsloth",
                                             random_state=3407)
    out = run_padded(model, a, list(batches(a.steps)))
    out["version"] = unsloth.__version__
    return out


def worker_fast(a, low_memory: bool) -> dict:
    """tunesmith's path on the same sequences, packed into buffers of seq_len tokens."""
    import torch

    from tunesmith.config import LoraConfig
    from tunesmith.train.fast import make_optimizer, make_train_step, pack, prepare_fast_model

    seq_len = a.low_seq_len if low_memory else a.seq_len
    docs = documents(list(batches(a.docs_batches)))
    packed = pack(docs, seq_len)
    torch.manual_seed(3407)
    fast = prepare_fast_model(load_model(a.model), LoraConfig(), low_memory=low_memory)
    opt = make_optimizer(fast, lr=2e-4)
    step = make_train_step(fast, opt)
    torch.cuda.reset_peak_memory_stats()
    t_start = time.perf_counter()
    warm = min(a.warm, len(packed) // 4)
    for batch in packed[:warm]:
        loss = step(batch)
    torch.cuda.synchronize()
    t0, warm_s = time.perf_counter(), time.perf_counter() - t_start
    lengths = []
    for batch in packed[warm:]:
        loss = step(batch)
        docs_here = (batch.cu_seqlens[1:] - batch.cu_seqlens[:-1]).tolist()
        lengths += docs_here[:-1] if batch.num_tokens < seq_len else docs_here  # the padding tail is no document
    torch.cuda.synchronize()
    dt = time.perf_counter() - t0
    out = measured(lengths, dt, len(packed) - warm, float(loss))
    if a.profile:
        profile(lambda: step(packed[warm]), 3)
    out.update(seq_len=seq_len, warmup_s=round(warm_s, 1), graphed=getattr(step, "graphed", False),
               fill=round(sum(b.num_tokens for b in packed) / (len(packed) * seq_len), 3))
    return out


def profile(fn, steps: int) -> None:
    """Print where the GPU time of `steps` calls goes (to stderr, i.e. the worker log)."""
    import torch
    from torch.profiler import ProfilerActivity

    with torch.profiler.profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            fn()
        torch.cuda.synchronize()
    table = prof.key_averages().table(sort_by="self_cuda_time_total", row_limit=30, max_name_column_width=70)
    print(table, file=sys.stderr)


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
    packed = pack(documents(list(batches(a.docs_batches))), a.seq_len)
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


# Driver -----------------------------------------------------------------------------------------------
UNSLOTH_SITE = os.environ.get("UNSLOTH_SITE")
"""A folder holding Unsloth and its dependencies (../shared/bench/unsloth_site.sh unpacked), if not installed."""


def unsloth_available() -> bool:
    if UNSLOTH_SITE:
        return os.path.isdir(os.path.join(UNSLOTH_SITE, "unsloth"))
    return importlib.util.find_spec("unsloth") is not None


def versions() -> dict:
    import peft
    import torch
    import transformers
    import triton

    return {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "cuda": torch.version.cuda,
            "transformers": transformers.__version__, "peft": peft.__version__, "triton": triton.__version__}


def run_worker(stack: str, a) -> dict:
    """Run one stack in a fresh process; `fast:4096` runs the fast path with buffers of 4096 tokens."""
    name, _, seq_len = stack.partition(":")
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", name, "--model", a.model,
           "--steps", str(a.steps), "--warm", str(a.warm), "--seq-len", seq_len or str(a.seq_len),
           "--low-seq-len", seq_len or str(a.low_seq_len), "--docs-batches", str(a.docs_batches),
           "--curve-steps", str(a.curve_steps)] + (["--profile"] if a.profile else [])
    env = dict(os.environ)
    if name == "unsloth" and UNSLOTH_SITE:  # Unsloth's packages only where it runs: they shadow others
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [UNSLOTH_SITE, env.get("PYTHONPATH")]))
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=a.timeout, env=env)
    except subprocess.TimeoutExpired:
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


def table(results: dict, unsloth_speed: float | None) -> str:
    rows = ["| stack | useful tokens/s | vs Unsloth | step ms | peak GiB | MFU |", "|---|---|---|---|---|---|"]
    for stack, r in results.items():
        if stack == "equiv" or "tokens_per_s" not in r:
            continue
        name = STACKS[stack.partition(":")[0]] + (f" (packed {r['seq_len']})" if "seq_len" in r else "")
        ratio = f"{r['tokens_per_s'] / unsloth_speed:.2f}x" if unsloth_speed else "-"
        rows.append(f"| {name} | {r['tokens_per_s']:,} | {ratio} | {r['step_ms']} | {r['peak_gib']} | "
                    f"{100 * r['mfu']:.1f}% |")
    return "\n".join(rows)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--stacks", default="equiv,fast,fast_low,hf,unsloth")
    ap.add_argument("--scaling", action="store_true", help="the fast path on 1 then 2 GPUs, same global batch")
    ap.add_argument("--global-buffers", type=int, default=4, help="--scaling: packed buffers per optimizer step")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--model", default=os.path.join(tempfile.gettempdir(), "qwen3-0.6b-random"))
    ap.add_argument("--steps", type=int, default=30, help="padded batches per padded stack")
    ap.add_argument("--warm", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=4096, help="fast path buffer (tunesmith's DEFAULT_SEQ_LEN)")
    ap.add_argument("--low-seq-len", type=int, default=8192, help="low_memory buffer (LOW_MEMORY_SEQ_LEN)")
    ap.add_argument("--docs-batches", type=int, default=60, help="16-sequence batches packed for the fast path")
    ap.add_argument("--curve-steps", type=int, default=20)
    ap.add_argument("--timeout", type=int, default=300)
    ap.add_argument("--profile", action="store_true", help="profile 3 fast-path steps into the log")
    ap.add_argument("--record", help="append the results as markdown to this file")
    ap.add_argument("--log", help="append each worker's full output to this file")
    ap.add_argument("--json", help="write all results as JSON here")
    a = ap.parse_args()
    if a.worker:
        worker = {"hf": worker_hf, "unsloth": worker_unsloth, "equiv": worker_equiv, "scale": worker_scale,
                  "fast": lambda a: worker_fast(a, False), "fast_low": lambda a: worker_fast(a, True)}[a.worker]
        print(json.dumps(worker(a)), flush=True)
        return
    make_model_dir(a.model)
    info = versions()
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
    results = {}
    for stack in a.stacks.split(","):
        if stack == "unsloth" and not unsloth_available():
            results[stack] = {"error": "not importable"}
            continue
        results[stack] = run_worker(stack, a)
        print(stack, json.dumps(results[stack]), flush=True)
    unsloth_speed = results.get("unsloth", {}).get("tokens_per_s")
    text = table(results, unsloth_speed)
    eq = results.get("equiv", {})
    if "loss_rel_diff" in eq:
        text += (f"\n\nequivalence vs transformers+peft (bf16, one 16-sequence batch): loss rel diff "
                 f"{eq['loss_rel_diff']:.2e}, LoRA grad cosine min {eq['grad_cos_min']:.4f} (all "
                 f"{eq['grad_cos_all']:.4f}), {a.curve_steps}-step curve max rel diff "
                 f"{eq['curve_max_rel_diff']:.2e} (CUDA-graph step: {eq['graphed']}): "
                 f"{'PASS' if eq['ok'] else 'FAIL'}")
    elif eq:
        text += f"\n\nequivalence: {eq}"
    for stack, r in results.items():
        if "error" in r:
            text += f"\n{stack}: ERROR {r['error']}"
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"versions": info, "args": vars(a), "results": results}, f, indent=1)
    if a.record:
        with open(a.record, "a") as f:
            f.write(f"\n### {time.strftime('%Y-%m-%d')} {info['gpu']}\n{json.dumps(info)}\n\n"
                    f"`python bench/train_gpu.py {' '.join(sys.argv[1:])}`\n\n{text}\n")
    print(f"\n{info['gpu']}  torch {info['torch']}  transformers {info['transformers']}  peft {info['peft']}")
    print(text)


if __name__ == "__main__":
    main()
