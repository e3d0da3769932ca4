"""`tunesmith data inspect FILE`: what the data stage would see, printed without training anything.

Shows the reader and detected shape, the counts, the token-length table against train.max_seq_length,
every problem found (skipped records, duplicates, overlong examples, ignored fields, held-out examples that
repeat training ones: data/near_duplicates.py), and the first example rendered with the model's chat template,
the trained (assistant) part highlighted.
Loads only the tokenizer, never model weights. Invalid data raises DataError (exit code 2).
"""

from __future__ import annotations

from pathlib import Path

from rich.console import Console
from rich.panel import Panel
from rich.table import Table
from rich.text import Text

from tunesmith.config import Config
from tunesmith.data import near_duplicates
from tunesmith.data.render import IGNORE_INDEX, render, tokenize_many
from tunesmith.data.split import dedupe
from tunesmith.data.stats import length_stats
from tunesmith.data.validate import Example, LoadReport, load_examples
from tunesmith.run import held_out_file

SHOWN = 20  # problems listed per kind; the count is always complete


def inspect_file(path: str | Path, config: Config, console: Console) -> None:
    from tunesmith.models import load_tokenizer, resolve_base

    data, train = config.data, config.train
    report = LoadReport(str(path))
    examples = load_examples(path, data, report)
    unique, duplicates = dedupe(examples)

    console.print(f"[bold]{path}[/]")
    counts = Table.grid(padding=(0, 2))
    counts.add_row("reader", report.reader)
    counts.add_row("shape", f"{report.shape}" + ("" if data.format == "auto" else " (data.format)"))
    counts.add_row("records", str(report.records))
    counts.add_row("valid", str(report.loaded))
    counts.add_row("skipped", str(len(report.skipped)))
    counts.add_row("duplicates", f"{len(duplicates)}" + (" (removed by data.dedupe)" if data.dedupe else ""))
    counts.add_row("system prompt", f"data.system_prompt added to {report.system_prompt_added}" if data.system_prompt
                   else "from the records (or the template's default)")
    console.print(counts)

    tokenizer = load_tokenizer(resolve_base(config.model.base, config.model.revision))
    lengths, trained, overlong, think = [], [], [], 0
    for example, tokens in zip(unique, tokenize_many(tokenizer, unique, data, train)):
        lengths.append(len(tokens["input_ids"]))
        trained.append(sum(1 for label in tokens["labels"] if label != IGNORE_INDEX))
        if lengths[-1] > train.max_seq_length:
            overlong.append(f"{example.source}: {lengths[-1]} tokens")
        think += any("<think>" in m["content"] for m in example.messages if m["role"] == "assistant")

    table = Table(title=f"tokens per example ({config.model.base} chat template)")
    for column in ("", "count", "min", "median", "p95", "max", f"> {train.max_seq_length}"):
        table.add_column(column, justify="right")
    for name, values in (("whole example", lengths), ("trained (labels)", trained)):
        s = length_stats(values, train.max_seq_length)
        table.add_row(name, *(str(s[k]) for k in ("count", "min", "median", "p95", "max", "over_max")))
    console.print(table)
    console.print(builtin_lengths(unique, config))

    problems = [
        (f"skipped records (data.on_error: {data.on_error})", report.skipped),
        ("exact duplicates", duplicates),
        (f"longer than train.max_seq_length {train.max_seq_length} (data.overlength: {data.overlength})", overlong),
        ("fields not used for training", [f"{key!r} in {n} records" for key, n in report.ignored_fields.items()]),
    ]
    if think:
        problems.append((f"replies with <think> blocks (data.think: {data.think})",
                         [f"{think} examples; " + ("stripped from the targets" if data.think == "strip" else "kept")]))
    repeats = held_out_repeats(path, unique, config)
    if repeats is not None:
        title, lines = repeats
        console.print(title, highlight=False)
        if lines:
            problems.append(("held-out examples that repeat a training example (tunesmith eval scores them apart)",
                             lines))
    found = [(title, lines) for title, lines in problems if lines]
    if not found:
        console.print("[green]no problems found[/]")
    for title, lines in found:
        console.print(f"[yellow]{title}: {len(lines)}[/]")
        for line in lines[:SHOWN]:
            console.print(f"  {line}", highlight=False, markup=False)
        if len(lines) > SHOWN:
            console.print(f"  ... and {len(lines) - SHOWN} more")

    first = unique[0]
    rendered = render(tokenizer, first, data)
    text = Text(rendered.text)
    for start, end in rendered.spans:
        text.stylize("bold black on green", start, end)
    console.print(Panel(_shortened(text), title=f"first example: {first.source}", title_align="left"))
    # Spelled out as well, so the trained part is visible where colour is not (a pipe, a log file).
    for start, end in rendered.spans:
        console.print(Text.assemble(("trained: ", "bold"), (repr(_shortened(rendered.text[start:end])), "green")))


BUILTIN_SAMPLE = 500
"""Examples tokenized under each built-in: enough for a median, quick for a large file."""


def builtin_lengths(examples: list[Example], config: Config) -> Table:
    """Median tokens per example (and trained tokens) under each built-in's tokenizer and template: per token
    the two built-ins cost about the same on a CPU, so the one that writes your language in fewer tokens trains
    on more examples a minute (goDrive's Chinese: Gemma 3 120 tokens, SmolLM2 255). Built-ins not yet built on
    this machine are named, not built (that takes a minute each)."""
    from statistics import median

    from tunesmith.models.builtin import BUILTINS, is_built, materialize

    table = Table(title="tokens per example under each built-in (median over the first "
                        f"{min(len(examples), BUILTIN_SAMPLE)} examples)")
    for column in ("model.base", "whole example", "trained"):
        table.add_column(column, justify="right")
    sample = examples[:BUILTIN_SAMPLE]
    for name in BUILTINS:
        label = f"builtin:{name}" + (" (this config)" if config.model.base == f"builtin:{name}" else "")
        if not is_built(name):
            table.add_row(label, "not built yet", f"--set model.base=builtin:{name} builds it once")
            continue
        from tunesmith.models import load_tokenizer

        tokens = tokenize_many(load_tokenizer(materialize(name)), sample, config.data, config.train)
        table.add_row(label, f"{median(len(t['input_ids']) for t in tokens):g}",
                      f"{median(sum(1 for label in t['labels'] if label != IGNORE_INDEX) for t in tokens):g}")
    return table


def held_out_repeats(path: str | Path, examples: list[Example], config: Config) -> tuple[str, list[str]] | None:
    """(a summary line, one line per repeat) of the held-out file (eval.file, else data.test_file) against the
    training data: `path`'s examples, or data.train_file's when `path` is the held-out file. None when the config
    names no held-out file, or `path` is it and there is no training file to compare with."""
    held_out = held_out_file(config)
    if not held_out:
        return None
    if Path(held_out).resolve() == Path(path).resolve():
        if not config.data.train_file or Path(config.data.train_file).resolve() == Path(path).resolve():
            return None
        test, training = examples, load_examples(config.data.train_file, config.data)
    else:
        test, training = load_examples(held_out, config.data), examples
    pairs = [(pair, str(e.source)) for e in training if (pair := near_duplicates.split_example(list(e.messages)))]
    tests = [(pair, e) for e in test if (pair := near_duplicates.split_example(list(e.messages)))]
    similarity = config.eval.near_duplicate_similarity
    found = near_duplicates.find_repeats([(*pair, source) for pair, source in pairs], [pair for pair, _ in tests],
                                         similarity)
    lines = [f"{example.source}: {repeat.kind} of {repeat.training_source}"
             + ("" if repeat.kind == near_duplicates.DUPLICATE else f" (similarity {repeat.similarity:g})")
             for (_, example), repeat in zip(tests, found) if repeat is not None]
    return near_duplicates.summary(found, similarity), lines


SHOWN_CHARS = 3000
"""Of a long example, the characters shown from each end: laying out a 16 MiB record took rich minutes."""
SHOWN_LINES = 20
"""And the lines shown from each end: 3,000 characters of short lines still filled a thousand terminal lines."""


def _shortened(text: Text | str) -> Text | str:
    plain = text if isinstance(text, str) else text.plain
    head = min(SHOWN_CHARS, _after_lines(plain, SHOWN_LINES))
    tail = max(len(plain) - SHOWN_CHARS, len(plain) - _after_lines(plain[::-1], SHOWN_LINES))
    if head >= tail:
        return text
    cut = plain[head:tail]
    lines = cut.count("\n")
    gap = f" … {len(cut):,} characters{f' ({lines:,} lines)' if lines else ''} not shown … "
    if isinstance(text, str):
        return text[:head] + gap + text[tail:]
    return Text.assemble(text[:head], (gap, "bold"), text[tail:])


def _after_lines(text: str, count: int) -> int:
    """Where the first `count` lines of `text` end (all of it when it has fewer)."""
    end = -1
    for _ in range(count):
        end = text.find("\n", end + 1)
        if end < 0:
            return len(text)
    return end
