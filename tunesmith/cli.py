"""The `tunesmith` command: parse, call a component, print. No logic of its own lives here.

Every user error is a `TunesmithError`; `main` turns it into one line on stderr and exit code 2.
`--debug` (anywhere on the command line) shows the traceback as well.
"""

from __future__ import annotations

import logging
import os
import sys
import traceback
import warnings
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from typer._click.exceptions import ClickException, NoArgsIsHelpError  # typer vendors Click

from tunesmith.config import Config, load_config
from tunesmith.errors import ConfigError, TunesmithError
from tunesmith.run import MODELFILE, Run

app = typer.Typer(
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    help="Turn a file of examples into a fine-tuned model served behind an Ollama-compatible API.",
)
data_app = typer.Typer(no_args_is_help=True, help="Check and look at training data.")
app.add_typer(data_app, name="data")

console = Console()
err = Console(stderr=True)

ConfigOpt = Annotated[Path | None, typer.Option("--config", "-c", help="The YAML config file.")]
SetOpt = Annotated[
    list[str] | None,
    typer.Option("--set", help="Override one config value: key.path=value (repeatable)."),
]
RunOpt = Annotated[Path | None, typer.Option("--run", help="A run folder, runs/<name>.")]


def _config(config: Path | None, sets: list[str] | None) -> Config:
    return load_config(config, sets or [])


def _run(run_dir: Path | None, config: Path | None, sets: list[str] | None) -> Run:
    """The run a command works on: --run, else the config's run folder."""
    return Run(run_dir or _config(config, sets).run_dir)


def _live(run: Run, config: Path | None, sets: list[str] | None) -> Config | None:
    """The live config a command on a trained run takes its own section from (tunesmith/run.py): the --config
    file (with --set), or run.json's config edited by --set; None when the command line gives neither."""
    if config is not None:
        return _config(config, sets)
    return load_config(None, sets, base=run.read_record()["config"]) if sets else None


def _host(config: Path | None, sets: list[str] | None) -> str | None:
    """Where the client commands talk (serve/address.py decides: TUNESMITH_HOST, else the config's serve section
    when --config or --set is given, else the default)."""
    from tunesmith.serve.address import client_host

    return client_host(_config(config, sets).serve if config is not None or sets else None)


@app.callback()
def _root(debug: Annotated[bool, typer.Option("--debug", help="Show tracebacks and debug logs.")] = False) -> None:
    logging.basicConfig(level=logging.DEBUG if debug else logging.INFO, format="%(message)s")
    logging.getLogger("httpx").setLevel(logging.DEBUG if debug else logging.WARNING)  # one line per request otherwise
    if not debug:
        # Deprecation chatter from the libraries says nothing the user can act on.
        warnings.filterwarnings("ignore", category=FutureWarning)
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        warnings.filterwarnings("ignore", message=".*gradient checkpointing.*")
        os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")


@app.command()
def doctor(config: ConfigOpt = None, set_: SetOpt = None) -> None:
    """Check Python, torch, the GPU, llama.cpp and the caches (the article's "is the GPU available?" step)."""
    from tunesmith.doctor import print_report, run_checks

    _config(config, set_)  # a broken config is a problem worth reporting too
    problems = print_report(run_checks(), console)
    raise typer.Exit(1 if problems else 0)


@data_app.command("inspect")
def data_inspect(
    file: Annotated[Path, typer.Argument(help="A JSON, JSONL, CSV or Parquet file, or a datasets folder.")],
    config: ConfigOpt = None,
    set_: SetOpt = None,
) -> None:
    """Validate a data file and show its shape, counts, token lengths and one rendered example."""
    from tunesmith.data.inspect import inspect_file

    inspect_file(file, _config(config, set_), console)


@app.command()
def train(
    config: ConfigOpt = None,
    set_: SetOpt = None,
    resume: Annotated[bool, typer.Option("--resume", help="Continue from the newest intact checkpoint.")] = False,
    force: Annotated[bool, typer.Option("--force", help="Start over where this run already trained: deletes its "
                                                        "checkpoints, adapter and metrics.")] = False,
    gpus: Annotated[int | None, typer.Option(
        "--gpus", min=1, help="Data-parallel on N GPUs of this host, one process each (train.gpus); the global "
                              "batch is batch_size x grad_accum x N. With train.device: cpu, N CPU processes.")] = None,
) -> None:
    """Fine-tune the base model with LoRA on the training data."""
    from tunesmith.train import distributed
    from tunesmith.train.loop import train as run_training

    settings = _config(config, set_)
    processes = gpus or settings.train.gpus
    if processes > 1 and not distributed.launched():
        # One process per GPU under torchrun; each child runs this same command and finds WORLD_SIZE set.
        _check_gpus(processes, settings.train.device)
        raise typer.Exit(distributed.relaunch(processes, sys.argv[1:]))
    result = run_training(settings, console, resume=resume, force=force)
    if distributed.is_main_process():
        what = "model" if settings.train.method == "full" else "adapter"  # the words scripts and tests look for
        console.print(f"{what} saved to {result.output_dir} ({result.steps} steps, {result.seconds:.0f} s, "
                      f"train loss {result.train_loss}, eval loss {result.eval_loss})")


def _check_gpus(processes: int, device: str) -> None:
    import torch

    from tunesmith.errors import ModelError

    if device == "cpu":
        return
    found = torch.cuda.device_count()
    if found < processes:
        raise ModelError(f"--gpus {processes} asked for, but torch sees {found} CUDA GPU(s)",
                         f"use --gpus {max(found, 1)}, or train.device: cpu for {processes} CPU processes (tests)")


@app.command()
def generate(prompt: str, run: RunOpt = None, config: ConfigOpt = None, set_: SetOpt = None) -> None:
    """Answer one prompt with the fine-tuned model (base + adapter, or the fully fine-tuned model), streaming."""
    from tunesmith.inference import hf

    folder = _run(run, config, set_)
    settings = folder.recorded_config()
    model, tokenizer = hf.load_finetuned(folder, settings)
    for piece in hf.stream(model, tokenizer, hf.messages_for(prompt, settings), settings):
        console.out(piece, end="", highlight=False)
    console.out("")


@app.command("eval")
def eval_(
    run: RunOpt = None,
    file: Annotated[Path | None, typer.Option("--file", help="Held-out examples (default: eval.file).")] = None,
    models: Annotated[str, typer.Option(help="Comma-separated: base, finetuned, gguf (every exported GGUF).")] = (
        "base,finetuned,gguf"),
    limit: Annotated[int | None, typer.Option(help="Evaluate only the first N examples.")] = None,
    config: ConfigOpt = None,
    set_: SetOpt = None,
) -> None:
    """Score base vs fine-tuned vs each GGUF on held-out examples; writes runs/<name>/eval.jsonl."""
    from tunesmith.evaluate.compare import evaluate, gguf_models, print_summary

    folder = _run(run, config, set_)
    settings = folder.config_for("eval", _live(folder, config, set_))
    names: list[str] = []
    for name in models.split(","):
        if name == "gguf":
            names += gguf_models(folder)
        elif name.strip():
            names.append(name.strip())
    print_summary(evaluate(settings, folder, file, names, console, limit=limit), console)


@app.command()
def export(
    run: RunOpt = None,
    quant: Annotated[str | None, typer.Option(help="Comma-separated quantizations, e.g. q4_k_m,q8_0,f16.")] = None,
    strict: Annotated[bool, typer.Option("--strict", help="Exit 1 when a quantization fails the fidelity check.")]
    = False,
    config: ConfigOpt = None,
    set_: SetOpt = None,
) -> None:
    """Merge, convert to GGUF, quantize, write the Modelfile and check fidelity."""
    from tunesmith.export import export_run

    folder = _run(run, config, set_)
    export_run(folder, quant.split(",") if quant is not None else None, console, strict=strict,
               live=_live(folder, config, set_))


@app.command()
def serve(
    config: ConfigOpt = None,
    set_: SetOpt = None,
    api_key: Annotated[str | None, typer.Option(
        "--api-key", help="The key clients send (Authorization: Bearer KEY). It shows in the process list: "
                          "prefer TUNESMITH_API_KEY or --api-key-file. A non-loopback bind requires a key of at "
                          "least 16 characters without whitespace.")] = None,
    api_key_file: Annotated[Path | None, typer.Option(
        "--api-key-file", help="Read the API key from this file (its first line).")] = None,
    runs: Annotated[Path | None, typer.Option("--runs", help="The runs folder the web UI at /ui shows "
                                                             "(default: the config's runs_dir, `runs`).")] = None,
) -> None:
    """Serve the model store through Ollama's API (default 127.0.0.1:11434; TUNESMITH_HOST like OLLAMA_HOST),
    and the web UI at /ui. The API key comes from --api-key, --api-key-file, the config's serve.api_key or
    TUNESMITH_API_KEY, in that order. Browsers' cross-origin requests are refused unless their origin is a
    loopback one or is listed in TUNESMITH_ORIGINS (comma-separated, * wildcards), as with OLLAMA_ORIGINS."""
    from tunesmith.app import serve as run_server
    from tunesmith.serve.address import server_settings

    settings = server_settings(_config(config, set_).serve, api_key=api_key, api_key_file=api_key_file)
    if runs:
        settings = settings.model_copy(update={"runs_dir": str(runs)})
    console.print(f"tunesmith serving the model store on http://{settings.host}:{settings.port} "
                  f"(web UI: /ui, runs from {settings.runs_dir})")
    run_server(settings)


@app.command()
def create(
    name: str,
    file: Annotated[Path, typer.Option("--file", "-f", help="The Modelfile.")] = Path(MODELFILE),  # ollama's default
    config: ConfigOpt = None,
    set_: SetOpt = None,
) -> None:
    """Create a model in the store from a Modelfile (like `ollama create`)."""
    from tunesmith.local_server import server_at
    from tunesmith.serve import client

    host = _host(config, set_)
    with server_at(host):
        client.create_from_modelfile(host, name, file, progress=console.print)


@app.command("run")
def run_(
    name: str,
    prompt: Annotated[str | None, typer.Argument(help="Answer this one prompt and exit.")] = None,
    config: ConfigOpt = None,
    set_: SetOpt = None,
) -> None:
    """Chat with a model, or answer one prompt (like `ollama run`); starts a local server if none answers."""
    from tunesmith import interactive
    from tunesmith.local_server import server_at

    host = _host(config, set_)
    with server_at(host):
        interactive.run(host, name, prompt)


@app.command("list")
def list_(config: ConfigOpt = None, set_: SetOpt = None) -> None:
    """List the models in the store (like `ollama list`)."""
    from tunesmith.tables import list_table

    console.out(list_table(_host(config, set_)))


@app.command()
def show(
    name: str,
    modelfile: Annotated[bool, typer.Option("--modelfile", help="Print only the Modelfile.")] = False,
    config: ConfigOpt = None,
    set_: SetOpt = None,
) -> None:
    """Show a model's Modelfile, template and parameters (like `ollama show`)."""
    from tunesmith.tables import show_text

    console.out(show_text(_host(config, set_), name, modelfile_only=modelfile))


@app.command()
def ps(config: ConfigOpt = None, set_: SetOpt = None) -> None:
    """List the loaded models (like `ollama ps`)."""
    from tunesmith.tables import ps_table

    console.out(ps_table(_host(config, set_)))


@app.command()
def cp(source: str, destination: str, config: ConfigOpt = None, set_: SetOpt = None) -> None:
    """Copy a model (like `ollama cp`)."""
    from tunesmith.serve import client

    client.copy(_host(config, set_), source, destination)
    console.print(f"copied '{source}' to '{destination}'")


@app.command()
def rm(name: str, config: ConfigOpt = None, set_: SetOpt = None) -> None:
    """Remove a model (like `ollama rm`)."""
    from tunesmith.serve import client

    client.delete(_host(config, set_), name)
    console.print(f"deleted '{name}'")


@app.command()
def deploy(
    run: RunOpt = None,
    to: Annotated[str, typer.Option("--to", help="URL of a server that speaks Ollama's API.")] = "http://127.0.0.1:11434",
    name: str | None = None,
    config: ConfigOpt = None,
    set_: SetOpt = None,
) -> None:
    """Upload the exported GGUF and create the model on an Ollama (or tunesmith) server."""
    from tunesmith.serve import client

    folder = _run(run, config, set_)
    modelfile = folder.modelfile
    if not modelfile.is_file():
        raise ConfigError(f"{folder.dir}: no Modelfile", "run `tunesmith export` first")
    model_name = name or folder.recorded_config().name
    client.create_from_modelfile(to, model_name, modelfile, progress=console.print)
    console.print(f"created {model_name} on {to}; try: curl {to}/api/generate -d "
                  f"'{{\"model\": \"{model_name}\", \"prompt\": \"...\", \"stream\": false}}'")


@app.command()
def pipeline(
    config: ConfigOpt = None,
    set_: SetOpt = None,
    force: Annotated[list[str] | None, typer.Option("--force", help="Redo this stage even if complete.")] = None,
    deploy: Annotated[str | None, typer.Option("--deploy", help="Create the model on this Ollama server instead.")] = None,
    no_serve: Annotated[bool, typer.Option("--no-serve", help="Stop after the test request.")] = False,
) -> None:
    """All of it: data check, train, evaluate, export, create, serve, one request."""
    from tunesmith.pipeline import run_pipeline

    run_pipeline(_config(config, set_), console, force=set(force or []), serve=not no_serve, deploy=deploy)


@app.command()
def report(run: RunOpt = None, config: ConfigOpt = None, set_: SetOpt = None) -> None:
    """Rebuild runs/<name>/report.html."""
    from tunesmith.evaluate.report import build_report

    folder = _run(run, config, set_)
    folder.read_record()  # not a run: one line that says so
    console.print(f"report: {build_report(folder)}")


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    if debug:  # accept --debug anywhere, not only before the command
        argv = ["--debug"] + [a for a in argv if a != "--debug"]
    try:
        # Without standalone mode Click returns typer.Exit's code instead of calling sys.exit.
        result = app(args=argv, prog_name="tunesmith", standalone_mode=False)
    except TunesmithError as exc:
        if debug:
            traceback.print_exc()
        err.print(f"[bold red]error:[/] {exc.message}", highlight=False, soft_wrap=True)
        if exc.hint:
            err.print(f"  hint: {exc.hint}", highlight=False, soft_wrap=True)
        return exc.exit_code
    except typer.Exit as exc:
        return exc.exit_code
    except NoArgsIsHelpError as exc:
        exc.show()
        return 0
    except ClickException as exc:  # usage errors: Click already words them well
        exc.show()
        return 2
    except typer.Abort:
        err.print("aborted")
        return 130
    except KeyboardInterrupt:
        err.print("interrupted")
        return 130
    except OSError as exc:  # a full disk where no component said which file: still one line, exit 2
        from tunesmith.atomic import is_disk_full

        if not is_disk_full(exc):
            raise
        if debug:
            traceback.print_exc()
        err.print(f"[bold red]error:[/] {exc.filename or 'a file'}: the disk is full ({exc.strerror})",
                  highlight=False, soft_wrap=True)
        return 2
    return result if isinstance(result, int) else 0


if __name__ == "__main__":
    sys.exit(main())
