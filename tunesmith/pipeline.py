"""`tunesmith pipeline`: the reference article's nine steps in order, from one config.

data check → train → evaluate (base vs fine-tuned) → export (GGUF, each scored on the held-out set: fidelity
check and the Modelfile's choice) → evaluate the GGUFs (scoring the answers export gave) → create the model in
the store → start the server → a few requests through the Ollama API.

A stage whose outputs are complete is skipped on re-run (every output is written atomically, so
"exists" means "complete"); `--force STAGE` redoes one. Training always resumes from its newest
checkpoint, so a pipeline killed mid-training continues where it stopped.
"""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from rich.console import Console

from tunesmith.atomic import write_json
from tunesmith.config import Config, ServeConfig
from tunesmith.errors import TunesmithError
from tunesmith.run import OUTPUTS, Run, held_out_file


@dataclass
class Context:
    config: Config
    console: Console
    serve: bool = True
    deploy: str | None = None
    timings: dict[str, float] = field(default_factory=dict)
    _stage_configs: dict[str, Config] = field(default_factory=dict)

    @property
    def run(self) -> Run:
        return Run.of(self.config)

    def stage_config(self, stage: str) -> Config:
        """The config a stage after training runs with (run.py's rule: run.json's, with the stage's own section
        from this pipeline's config), worked out once per stage, so a difference is said once."""
        if stage not in self._stage_configs:
            self._stage_configs[stage] = self.run.config_for(stage, self.config)
        return self._stage_configs[stage]


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
    from tunesmith.evaluate.compare import evaluate, print_summary

    results = evaluate(ctx.stage_config("eval"), ctx.run, None, ["base", "finetuned"], ctx.console)
    print_summary(results, ctx.console)


def _export(ctx: Context) -> None:
    from tunesmith.export import export_run

    export_run(ctx.run, None, ctx.console, live=ctx.config)


def _eval_gguf(ctx: Context) -> None:
    from tunesmith.evaluate.compare import evaluate, print_summary, scored_gguf_models

    results = evaluate(ctx.stage_config("eval"), ctx.run, None, scored_gguf_models(ctx.run), ctx.console,
                       keep_existing=True)
    print_summary(results, ctx.console)


def _gguf_evaluated(ctx: Context) -> bool:
    from tunesmith.evaluate.compare import evaluated_models, scored_gguf_models

    ggufs = scored_gguf_models(ctx.run)
    return bool(ggufs) and set(ggufs) <= evaluated_models(ctx.run)


def _create(ctx: Context) -> None:
    from tunesmith.local_server import server_at
    from tunesmith.serve import client

    host = ctx.deploy or _host(ctx.config)
    serve = _server_settings(ctx)
    with contextlib.nullcontext() if ctx.deploy else server_at(host, serve):
        client.create_from_modelfile(host, ctx.config.name, ctx.run.modelfile, api_key=_key(ctx, serve))
    ctx.console.print(f"  created {ctx.config.name} on {host}")


SAMPLES = 5
"""Held-out prompts the serve stage sends: one answer right or wrong says little about a model that gets half of
them exactly right (goDrive after 14 minutes on CPU); five show what to expect."""


def _serve(ctx: Context) -> None:
    from tunesmith.local_server import server_at

    host = ctx.deploy or _host(ctx.config)
    serve, evaluation = _server_settings(ctx), ctx.stage_config("eval")
    with contextlib.nullcontext() if ctx.deploy else server_at(host, serve) as server:
        asked, samples = [], _sample_prompts(evaluation)
        for prompt, reference in samples:
            reply = _ask(host, ctx.config.name, prompt, evaluation.eval.max_new_tokens, _key(ctx, serve))
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


def _ask(host: str, model: str, prompt: str, num_predict: int, api_key: str | None) -> str:
    """The article's request: POST /api/generate with stream false, its answer bounded as the eval stage bounds
    them (`eval.max_new_tokens`): "right" means the same here as in the eval table, and a model that never ends its
    turn cannot print pages of text (the curl line shown afterwards carries no bound, as the article's)."""
    import httpx

    from tunesmith.serve.address import client_api_key

    key = client_api_key(api_key)
    response = httpx.post(f"{host}/api/generate", json={"model": model, "prompt": prompt, "stream": False,
                                                          "options": {"num_predict": num_predict}}, timeout=300,
                          headers={"Authorization": f"Bearer {key}"} if key else None)
    if response.status_code != 200:
        raise TunesmithError(f"{host}/api/generate answered {response.status_code}: {response.text[:200]}")
    return response.json()["response"]


def _host(config: Config) -> str:
    """Where the pipeline reaches the server it starts: serve.host:serve.port as a client reaches it (a server
    bound to 0.0.0.0 answers on loopback), resolved as every command resolves it (serve/address.py)."""
    from tunesmith.serve.address import host_url, server_settings

    settings = server_settings(config.serve)
    return host_url(f"{settings.host}:{settings.port}")


def _server_settings(ctx: Context) -> ServeConfig:
    """The serve section the pipeline's server starts with, resolved as `tunesmith serve` resolves it."""
    from tunesmith.serve.address import server_settings

    return server_settings(ctx.stage_config("serve").serve)


def _key(ctx: Context, serve: ServeConfig) -> str | None:
    """The key the pipeline's own requests carry: the server it started has the serve section's; a server
    deployed to is reached as `tunesmith deploy` reaches it (the client reads TUNESMITH_API_KEY)."""
    return None if ctx.deploy else serve.api_key


def _sample_prompts(config: Config) -> list[tuple[str, str | None]]:
    """The first SAMPLES held-out prompts with their reference answers; training prompts (reference None) when
    there is no held-out file."""
    from tunesmith.inference.cases import load_cases

    held_out = held_out_file(config)
    cases = load_cases(held_out or config.data.train_file, config, SAMPLES)
    return [(case.messages[-1]["content"], case.reference if held_out else None) for case in cases]


def _done(stage: str) -> Callable[[Context], bool]:
    return lambda ctx: ctx.run.complete(stage, ctx.config)


def _never(ctx: Context) -> bool:
    return False


# name, function, "is it complete?" (outputs are written atomically, so existing means complete)
STAGES: list[tuple[str, Callable[[Context], None], Callable[[Context], bool]]] = [
    ("data", _data, _never),  # seconds; a split whose files and settings are unchanged is read back
    ("train", _train, _done("train")),  # adapter/ (LoRA, QLoRA) or model/ (full fine-tuning)
    ("eval", _eval, _done("eval")),
    ("export", _export, _done("export")),
    ("eval-gguf", _eval_gguf, _gguf_evaluated),
    ("create", _create, _never),
    ("serve", _serve, _never),
]


def run_pipeline(config: Config, console: Console, force: set[str] | None = None, serve: bool = True,
                 deploy: str | None = None) -> dict[str, float]:
    force = force or set()
    unknown = force - {name for name, _, _ in STAGES}
    if unknown:
        raise TunesmithError(f"--force: unknown stage {', '.join(sorted(unknown))}",
                             f"stages: {', '.join(name for name, _, _ in STAGES)}")
    ctx = Context(config, console, serve=serve, deploy=deploy)
    console.print(f"[bold]tunesmith pipeline[/] {config.name}: base {config.model.base}, run folder {ctx.run.dir}")
    for name, stage, complete in STAGES:
        if name not in force and complete(ctx):
            console.print(f"[dim]✓ {name}: complete, skipped (--force {name} to redo)[/]")
            continue
        if name in force and name in OUTPUTS:  # what --force STAGE removes before redoing it
            ctx.run.clear(name)
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

            console.print(f"  report: {build_report(ctx.run)}")
    return ctx.timings


def _record_timings(ctx: Context) -> None:
    path = ctx.run.timings
    previous = json.loads(path.read_text()) if path.exists() else {}
    write_json(path, {**previous, **ctx.timings})
