"""`runs/<name>/report.html`: one self-contained page showing whether the fine-tune worked.

Loss curves (matplotlib, embedded as PNG), the training metrics, the eval summary for base / fine-tuned /
each quantization (per-field, per-label and per-rule detail; held-out examples that repeat training scored
apart), the wrong answers with what differs from the expected one, examples where base and fine-tuned differ,
export sizes, fidelity and the Modelfile's choice, stage timings.
Nothing is fetched when the page opens: it works offline and can be mailed as one file.
"""

from __future__ import annotations

import base64
import difflib
import html
import io
import json
from pathlib import Path
from typing import Any

from tunesmith.atomic import write_text
from tunesmith.evaluate.compare import SEEN, UNSEEN, model_label, scores_of
from tunesmith.run import Run, read_json
from tunesmith.scorers import json_object

_STYLE = """
body { font-family: system-ui, sans-serif; margin: 2rem auto; max-width: 1100px; color: #222; }
h1 { margin-bottom: 0.2rem; } h2 { margin-top: 2rem; border-bottom: 1px solid #ddd; }
table { border-collapse: collapse; margin: 0.5rem 0; } td, th { border: 1px solid #ccc; padding: 4px 8px; }
th { background: #f3f3f3; } td.num { text-align: right; font-variant-numeric: tabular-nums; }
.muted { color: #777; } .bad { color: #b00; } .good { color: #070; }
del { background: #fdd; text-decoration: line-through; } ins { background: #dfd; text-decoration: none; }
img.plot { max-width: 100%; border: 1px solid #eee; }
"""


def loss_plot_png(metrics: list[dict[str, Any]]) -> bytes | None:
    import matplotlib

    matplotlib.use("Agg")  # no display here, and none needed
    import matplotlib.pyplot as plt

    train = [(m["step"], m["loss"]) for m in metrics if "loss" in m]
    evals = [(m["step"], m["eval_loss"]) for m in metrics if "eval_loss" in m]
    if not train and not evals:
        return None
    figure, axes = plt.subplots(figsize=(8, 3.6), dpi=100)
    if train:
        axes.plot(*zip(*train), label="train loss", color="#1f77b4")
    if evals:
        axes.plot(*zip(*evals), "o-", label="eval loss", color="#d62728")
    axes.set_xlabel("step")
    axes.set_ylabel("loss")
    axes.grid(alpha=0.3)
    handles, labels = axes.get_legend_handles_labels()
    exact = [(m["step"], m["eval_exact_match"]) for m in metrics if m.get("eval_exact_match") is not None]
    if exact:  # answers right during training (train.eval_accuracy), on its own axis
        accuracy = axes.twinx()
        accuracy.plot(*zip(*exact), "s-", label="exact match (eval set)", color="#2ca02c")
        accuracy.set_ylim(0, 1)
        accuracy.set_ylabel("exact match")
        more_handles, more_labels = accuracy.get_legend_handles_labels()
        handles, labels = handles + more_handles, labels + more_labels
    axes.legend(handles, labels)
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    plt.close(figure)
    return buffer.getvalue()


class Markup(str):
    """HTML made here (a difference with <del> and <ins>), put in a table cell as it is."""


def _table(headers: list[str], rows: list[list[Any]], table_id: str) -> str:
    head = "".join(f"<th>{html.escape(str(h))}</th>" for h in headers)
    body = []
    for row in rows:
        cells = []
        for value in row:
            if isinstance(value, Markup):
                cells.append(f"<td>{value}</td>")
            elif isinstance(value, float):
                cells.append(f'<td class="num">{value:.3f}</td>')
            elif isinstance(value, int):
                cells.append(f'<td class="num">{value}</td>')
            elif value is None:  # a score that applies to none of the answers
                cells.append('<td class="num">–</td>')
            else:
                cells.append(f"<td>{html.escape(str(value))}</td>")
        body.append(f"<tr>{''.join(cells)}</tr>")
    return f'<table id="{table_id}"><thead><tr>{head}</tr></thead><tbody>{"".join(body)}</tbody></table>'


def build_report(run: Run) -> Path:
    record = read_json(run.record) or {}
    metrics = run.metrics_records()
    rows = run.eval_rows()
    fidelity = read_json(run.fidelity)
    timings = read_json(run.timings) or {}
    name = (record.get("config") or {}).get("name", run.dir.name)
    parts = [f"<h1>tunesmith run: {html.escape(name)}</h1>"]
    config = record.get("config") or {}
    final = record.get("final") or {}
    parts.append(f'<p class="muted">base {html.escape(str(config.get("model", {}).get("base", "?")))} · '
                 f'device {html.escape(str(record.get("device", "?")))} · started {record.get("started_at", "?")} · '
                 f'ended {record.get("ended_at", "?")}</p>')

    parts.append("<h2>Loss</h2>")
    png = loss_plot_png(metrics)
    if png:
        data = base64.b64encode(png).decode()
        parts.append(f'<img class="plot" id="loss-plot" alt="loss curves" src="data:image/png;base64,{data}">')
    else:
        parts.append('<p class="muted">no metrics.jsonl yet</p>')

    parts.append("<h2>Training</h2>")
    summary = [["steps", final.get("steps")], ["train loss", final.get("train_loss")],
               ["eval loss", final.get("eval_loss")], ["train seconds", final.get("train_seconds")],
               ["trained tokens", final.get("trained_tokens")],
               ["trained tokens/s", final.get("trained_tokens_per_second")],
               ["examples (train / eval)", f'{record.get("examples", {}).get("train")} / {record.get("examples", {}).get("eval")}'],
               ["LoRA", f'r={config.get("lora", {}).get("r")} alpha={config.get("lora", {}).get("alpha")}'],
               ["learning rate", config.get("train", {}).get("learning_rate")]]
    parts.append(_table(["metric", "value"], [[k, "–" if v is None else v] for k, v in summary], "metrics-table"))

    parts.append(_during_training(metrics))

    parts.append("<h2>Evaluation</h2>")
    parts.append(_eval_section(rows, fidelity))

    parts.append("<h2>Export</h2>")
    parts.append(_export_section(run, fidelity))

    parts.append("<h2>Timings</h2>")
    if timings:
        parts.append(_table(["stage", "seconds"], [[k, float(v)] for k, v in timings.items()], "timings-table"))
    else:
        parts.append('<p class="muted">no stage timings (run through `tunesmith pipeline`)</p>')

    page = (f"<!doctype html><html><head><meta charset='utf-8'><title>tunesmith: {html.escape(name)}</title>"
            f"<style>{_STYLE}</style></head><body>{''.join(parts)}</body></html>")
    target = run.report
    write_text(target, page)
    return target


SHOWN_EVAL_STEPS = 8
"""Eval steps shown in the during-training table: the last ones, where the run ended up."""


def _during_training(metrics: list[dict[str, Any]]) -> str:
    """The validation scores at each eval step, per rule, field or label (`eval_recall:gear_start`, ...): which
    behaviour the model had not learned yet, and when it did. Empty without the accuracy probe's detail."""
    evals = [record for record in metrics if "eval_loss" in record][-SHOWN_EVAL_STEPS:]
    keys = list(dict.fromkeys(key for record in evals for key in record if key.startswith("eval_") and ":" in key))
    if not keys:
        return ""
    headline = [key for key in ("eval_exact_match",) if any(key in record for record in evals)]
    rows = [[key.removeprefix("eval_"), *[record.get(key) for record in evals]] for key in headline + keys]
    return ("<h3>Validation during training, per rule, field or label</h3>"
            "<p>Greedy answers to the first train.eval_accuracy validation examples at each eval step; a rule's "
            "recall counts the answers whose reference gives it, its precision the answers that give it.</p>"
            + _table(["score", *[f"step {record['step']}" for record in evals]], rows, "training-detail-table"))


def _eval_section(rows: list[dict[str, Any]], fidelity: Any) -> str:
    if not rows:
        return '<p class="muted">not evaluated yet (`tunesmith eval`)</p>'
    by_model: dict[str, list[dict[str, Any]]] = {}
    for row in rows:
        by_model.setdefault(row["model"], []).append(row)
    results = scores_of(rows)
    # The headline scores first, then the detail ones (kind:name).
    keys = list(dict.fromkeys(key for model_rows in by_model.values() for key in model_rows[0]["scores"]))
    headline = [key for key in keys if ":" not in key]
    table_rows = [[model_label(result.model), result.n, *[result.means.get(key) for key in headline]]
                  for result in results]
    out = [_table(["model", "n", *headline], table_rows, "eval-table")]
    apart = [result for result in results if result.apart]
    if apart:
        seen = apart[-1].apart[SEEN][0]
        out.append(f"<h3>Held-out examples that repeat a training example ({seen}), and the rest</h3>"
                   "<p>A repeat is a held-out input equal to a training input (whitespace normalised), or at least "
                   "eval.near_duplicate_similarity similar (rapidfuzz fuzz.ratio) to one whose answer is the same: "
                   "answering it right can be recall.</p>")
        out.append(_table(["model", f"exact match: {SEEN}", "n", f"exact match: {UNSEEN}", "n"],
                          [[model_label(result.model), result.apart[SEEN][1].get("exact_match"), result.apart[SEEN][0],
                            result.apart[UNSEEN][1].get("exact_match"), result.apart[UNSEEN][0]] for result in apart],
                          "repeats-table"))
    model_means = {result.model: result.means for result in results}
    per_rule = "Per-label and per-rule precision and recall (mean over the answers each applies to)"
    for title, kind, table_id in (("Per-field accuracy (JSON answers)", "field", "field-table"),
                                  (per_rule, None, "rule-table")):
        detail = [key for key in keys if ":" in key and (key.startswith("field:") == (kind == "field"))]
        if detail:
            out.append(f"<h3>{title}</h3>")
            out.append(_table(["score", *[model_label(model) for model in by_model]],
                              [[key, *[model_means[model].get(key) for model in by_model]] for key in detail],
                              table_id))
    out.append(_wrong_answers(by_model, fidelity))
    base = {r["index"]: r for r in by_model.get("base", [])}
    tuned = {r["index"]: r for r in by_model.get("finetuned", [])}
    differ = [(base[i], tuned[i]) for i in sorted(base.keys() & tuned.keys()) if base[i]["answer"] != tuned[i]["answer"]]
    if differ:
        out.append(f"<h3>Where base and fine-tuned differ ({len(differ)} of {len(base.keys() & tuned.keys())}; "
                   "first 10)</h3>")
        sample = [[b["prompt"], b["reference"], b["answer"], t["answer"],
                   "✓" if t["scores"].get("exact_match") else "✗"] for b, t in differ[:10]]
        out.append(_table(["prompt", "reference", "base", "fine-tuned", "exact"], sample, "differ-table"))
    return "".join(out)


WRONG_SHOWN = 20


def _wrong_answers(by_model: dict[str, list[dict[str, Any]]], fidelity: Any) -> str:
    """The fine-tuned model's wrong answers and the served GGUF's (the Modelfile's), each with what differs from
    the expected answer."""
    served = (fidelity.get("modelfile") or {}).get("quant") if isinstance(fidelity, dict) else None
    models = ["finetuned"] + [model for model in by_model if served and model.endswith(f".{served}.gguf")]
    out = []
    for model in models:
        wrong = [row for row in by_model.get(model, []) if not row["scores"].get("exact_match")]
        if not wrong:
            continue
        out.append(f"<h3>Wrong answers of {html.escape(model_label(model))} ({len(wrong)} of {len(by_model[model])}; "
                   f"first {min(len(wrong), WRONG_SHOWN)})</h3>")
        out.append(_table(["prompt", "expected", "answer", "difference"],
                          [[row["prompt"], row["reference"], row["answer"], difference(row["answer"], row["reference"])]
                           for row in wrong[:WRONG_SHOWN]], f"wrong-{'finetuned' if model == 'finetuned' else 'served'}"))
    return "".join(out)


def difference(answer: str, expected: str) -> Markup:
    """What the answer gets wrong: for JSON objects the fields that differ (expected → answered), otherwise the
    characters to delete and to insert to make the expected answer (a character diff, which suits Chinese)."""
    wanted, got = json_object(expected), json_object(answer)
    if wanted is not None:
        if got is None:
            return Markup("not a JSON object")
        fields = [name for name in dict.fromkeys([*wanted, *got])
                  if (name in wanted) != (name in got) or wanted.get(name) != got.get(name)]
        return Markup("<br>".join(f"{html.escape(name)}: <del>{_json(got, name)}</del> <ins>{_json(wanted, name)}</ins>"
                                  for name in fields))
    parts = []
    for op, a1, a2, b1, b2 in difflib.SequenceMatcher(None, answer, expected, autojunk=False).get_opcodes():
        if op == "equal":
            parts.append(html.escape(answer[a1:a2]))
            continue
        if a2 > a1:
            parts.append(f"<del>{html.escape(answer[a1:a2])}</del>")
        if b2 > b1:
            parts.append(f"<ins>{html.escape(expected[b1:b2])}</ins>")
    return Markup("".join(parts))


def _json(value: dict[str, Any], name: str) -> str:
    return html.escape(json.dumps(value[name], ensure_ascii=False)) if name in value else "(missing)"


def _export_section(run: Run, fidelity: Any) -> str:
    files = sorted(run.gguf.glob("*.gguf"))
    if not files:
        return '<p class="muted">not exported yet (`tunesmith export`)</p>'
    rows = [[path.name, f"{path.stat().st_size / 2**20:.1f} MiB"] for path in files]
    out = [_table(["file", "size"], rows, "export-table")]
    if isinstance(fidelity, dict) and fidelity.get("quantizations"):  # export/fidelity.report's shape
        keys = ["exact_match", "exact_match_loss", "exact", "first_token", "loglik_gap", "passed", "seconds"]
        fid_rows = [[r.get("quant", "?"), *[r.get(k) for k in keys]] for r in fidelity["quantizations"]]
        out.append(_table(["quantization", "exact match", "loss vs merged", "exact agreement", "first token",
                           "log-lik gap (nats/token)", "passed", "seconds"], fid_rows, "fidelity-table"))
        merged = fidelity.get("merged_exact_match")
        out.append(f"<p>Exact match on {fidelity.get('examples', '?')} held-out examples (the merged model: "
                   f"{'?' if merged is None else f'{merged:.3f}'}); agreement with the merged model's greedy answers "
                   f"on the first {fidelity.get('prompts')}. Pass: exact agreement ≥ {fidelity.get('min_agreement')} "
                   f"and exact match at most {fidelity.get('max_exact_match_loss', '?')} below the merged model's.</p>")
        choice = fidelity.get("modelfile") or {}
        if choice.get("quant"):
            out.append(f'<p id="modelfile-choice">The Modelfile serves <b>{html.escape(choice["quant"])}</b>: '
                       f'{html.escape(choice.get("reason") or "")}.'
                       + (f' <span class="bad">{html.escape(choice["warning"])}</span>' if choice.get("warning") else "")
                       + "</p>")
    elif fidelity is not None:
        out.append(f"<pre>{html.escape(json.dumps(fidelity, indent=2, ensure_ascii=False)[:4000])}</pre>")
    return "".join(out)
