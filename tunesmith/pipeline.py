"""`tunesmith pipeline`: the reference article's nine steps in order, from one config.

data check → train → evaluate (base vs fine-tuned) → export (GGUF + fidelity check) → evaluate the
GGUFs → create the model in the store → start the server → one request through the Ollama API.

A stage whose outputs are complete is skipped on re-run (every output is written atomically, so
"exists" means "complete"); `--force STAGE` redoes one. Training always resumes from its newest
checkpoint, so a pipeline killed mid-training continues where it stopped.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from rich.console import Console

from tunesmith.atomic import write_json
from tunesmith.config import Config
from tunesmith.errors import TunesmithError


@dataclass
class Context:
    config: Config
    console: Console
    serve: bool = True
    deploy: str | None = None
    timings: dict[str, float] = field(default_factory=dict)

    @property
    def run_dir(self) -> Path:
        return self.config.run_dir


class StageFailed(TunesmithError):
    """A stage failed: the message names it; earlier outputs are left as they are."""


def _data(ctx: Context) -> None:
    from tunesmith.data import prepare, summary_lines
    from tunesmith.models import load_tokenizer, resolve_base

    tokenizer = load_tokenizer(resolve_base(ctx.config.model.base, ctx.config.model.revision))
    prepared = prepare(ctx.config, tokenizer)
    for line in summary_lines(prepared.stats):
        ctx.console.print(f"  {line}", highlight=False)


def _train(ctx: Context) -> None:
    from tunesmith.train.loop import train

    result = train(ctx.config, ctx.console, resume=True)
    ctx.console.print(f"  saved: {result.output_dir} ({result.steps} steps, {result.seconds:.0f} s)")


def _eval(ctx: Context) -> None:
    from tunesmith.evaluate.run import evaluate, print_summary

    results = evaluate(ctx.config, ctx.run_dir, None, ["base", "finetuned"], ctx.console)
    print_summary(results, ctx.console)


def _export(ctx: Context) -> None:
    from tunesmith.export import export_run

    export_run(ctx.run_dir, None, ctx.console)


def _eval_gguf(ctx: Context) -> None:
    from tunesmith.evaluate.run import evaluate, gguf_models, print_summary

    results = evaluate(ctx.config, ctx.run_dir, None, gguf_models(ctx.run_dir), ctx.console, keep_existing=True)
    print_summary(results, ctx.console)


def _gguf_evaluated(ctx: Context) -> bool:
    from tunesmith.evaluate.run import evaluated_models, gguf_models

    ggufs = gguf_models(ctx.run_dir)
    return bool(ggufs) and set(ggufs) <= evaluated_models(ctx.run_dir)


def _trained(ctx: Context) -> bool:
    from tunesmith import inference

    return inference.trained(ctx.run_dir, ctx.config)


def _create(ctx: Context) -> None:
    from tunesmith.serve import client

    host = ctx.deploy or _host(ctx.config)
    with contextlib.nullcontext() if ctx.deploy else client.server_at(host):
        client.create_from_modelfile(host, ctx.config.name, ctx.run_dir / "Modelfile")
    ctx.console.print(f"  created {ctx.config.name} on {host}")


SAMPLES = 5
"""Held-out prompts the serve stage sends: one answer right or wrong says little about a model that gets half of
them exactly right (goDrive after 14 minutes on CPU); five show what to expect."""


def _serve(ctx: Context) -> None:
    from tunesmith.serve import client

    host = ctx.deploy or _host(ctx.config)
    with contextlib.nullcontext() if ctx.deploy else client.server_at(host) as server:
        asked, samples = [], _sample_prompts(ctx)
        for prompt, reference in samples:
            reply = _ask(host, ctx.config.name, prompt, ctx.config.eval.max_new_tokens)
            right = reference is not None and reply.strip() == reference.strip()
            asked.append((prompt, right))
            ctx.console.print(f"  prompt: {prompt}", highlight=False)
            if reference is None:
                ctx.console.print(f"  answer: {reply}", highlight=False)
            else:  # held out: say plainly whether the served model got it right
                ctx.console.print(f"  answer: {reply}  " + ("✓ exact match" if right else f"✗ expected: {reference}"),
                                  highlight=False)
        shown = next((prompt for prompt, right in asked if right), asked[0][0])
        if samples[0][1] is not None:  # held out: the references say how many it got right
            ctx.console.print(f"  {sum(right for _, right in asked)} of {len(asked)} held-out prompts answered "
                              "exactly as expected")
        body = json.dumps({"model": ctx.config.name, "prompt": shown, "stream": False}, ensure_ascii=False)
        ctx.console.print(f"\ntry it:\n  curl {host}/api/generate -d '{body}'", highlight=False, soft_wrap=True)
        if server is None and not ctx.deploy:
            ctx.console.print(f"\nthe server already running at {host} serves {ctx.config.name}")
        elif server is not None and ctx.serve:
            ctx.console.print(f"\nserving on {host} (Ctrl-C to stop)")
            try:
                server.wait()
            except KeyboardInterrupt:
                pass


def _ask(host: str, model: str, prompt: str, num_predict: int) -> str:
    """The article's request: POST /api/generate with stream false, its answer bounded as the eval stage bounds
    them (`eval.max_new_tokens`): "right" means the same here as in the eval table, and a model that never ends its
    turn cannot print pages of text (the curl line shown afterwards carries no bound, as the article's)."""
    import httpx

    response = httpx.post(f"{host}/api/generate", json={"model": model, "prompt": prompt, "stream": False,
                                                          "options": {"num_predict": num_predict}}, timeout=300)
    if response.status_code != 200:
        raise TunesmithError(f"{host}/api/generate answered {response.status_code}: {response.text[:200]}")
    return response.json()["response"]


def _host(config: Config) -> str:
    return f"http://{config.serve.host}:{config.serve.port}"


def _sample_prompts(ctx: Context) -> list[tuple[str, str | None]]:
    """The first SAMPLES held-out prompts with their reference answers; training prompts (reference None) when
    there is no held-out file."""
    from tunesmith.evaluate.run import load_cases

    held_out = ctx.config.eval.file or ctx.config.data.test_file
    cases = load_cases(held_out or ctx.config.data.train_file, ctx.config, SAMPLES)
    return [(case.messages[-1]["content"], case.reference if held_out else None) for case in cases]


def _exist(*names: str) -> Callable[[Context], bool]:
    return lambda ctx: all((ctx.run_dir / name).exists() for name in names)


def _never(ctx: Context) -> bool:
    return False


# name, function, "is it complete?" (outputs are written atomically, so existing means complete)
STAGES: list[tuple[str, Callable[[Context], None], Callable[[Context], bool]]] = [
    ("data", _data, _never),  # seconds, and it re-validates the data file, which may have changed
    ("train", _train, _trained),  # adapter/ (LoRA, QLoRA) or model/ (full fine-tuning)
    ("eval", _eval, _exist("eval.jsonl")),
    ("export", _export, _exist("Modelfile", "fidelity.json")),
    ("eval-gguf", _eval_gguf, _gguf_evaluated),
    ("create", _create, _never),
    ("serve", _serve, _never),
]
# What --force STAGE removes before redoing it.
_OUTPUTS = {"train": ["adapter", "model", "checkpoints", "metrics.jsonl", "tb"], "eval": ["eval.jsonl"],
            "export": ["merged", "gguf", "Modelfile", "fidelity.json"]}


def run_pipeline(config: Config, console: Console, force: set[str] | None = None, serve: bool = True,
                 deploy: str | None = None) -> dict[str, float]:
    force = force or set()
    unknown = force - {name for name, _, _ in STAGES}
    if unknown:
        raise TunesmithError(f"--force: unknown stage {', '.join(sorted(unknown))}",
                             f"stages: {', '.join(name for name, _, _ in STAGES)}")
    ctx = Context(config, console, serve=serve, deploy=deploy)
    console.print(f"[bold]tunesmith pipeline[/] {config.name}: base {config.model.base}, run folder {ctx.run_dir}")
    for name, stage, complete in STAGES:
        if name not in force and complete(ctx):
            console.print(f"[dim]✓ {name}: complete, skipped (--force {name} to redo)[/]")
            continue
        if name in force:
            for output in _OUTPUTS.get(name, []):
                path = ctx.run_dir / output
                shutil.rmtree(path) if path.is_dir() else path.unlink(missing_ok=True)
        console.print(f"[bold cyan]▶ {name}[/]")
        started = time.perf_counter()
        try:
            stage(ctx)
        except TunesmithError as error:
            raise StageFailed(f"stage {name} failed: {error.message}", error.hint) from error
        ctx.timings[name] = round(time.perf_counter() - started, 1)
        console.print(f"[green]✓ {name}[/] ({ctx.timings[name]:.0f} s)")
        _record_timings(ctx)
        if name in ("eval", "eval-gguf", "export"):
            from tunesmith.evaluate.report import build_report

            console.print(f"  report: {build_report(ctx.run_dir)}")
    return ctx.timings


def _record_timings(ctx: Context) -> None:
    path = ctx.run_dir / "timings.json"
    previous = json.loads(path.read_text()) if path.exists() else {}
    write_json(path, {**previous, **ctx.timings})
