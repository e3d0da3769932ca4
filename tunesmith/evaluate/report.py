"""`runs/<name>/report.html`: one self-contained page showing whether the fine-tune worked.

Loss curves (matplotlib, embedded as PNG), the training metrics, the eval summary for base / fine-tuned /
each quantization, examples where base and fine-tuned differ, export sizes and fidelity, stage timings.
Nothing is fetched when the page opens: it works offline and can be mailed as one file.
"""

from __future__ import annotations

import base64
import html
import io
import json
from pathlib import Path
from typing import Any

from tunesmith.atomic import write_text
from tunesmith.evaluate.run import model_label
from tunesmith.evaluate.scorers import mean_scores
from tunesmith.run import Run

_STYLE = """
body { font-family: system-ui, sans-serif; margin: 2rem auto; max-width: 1100px; color: #222; }
h1 { margin-bottom: 0.2rem; } h2 { margin-top: 2rem; border-bottom: 1px solid #ddd; }
table { border-collapse: collapse; margin: 0.5rem 0; } td, th { border: 1px solid #ccc; padding: 4px 8px; }
th { background: #f3f3f3; } td.num { text-align: right; font-variant-numeric: tabular-nums; }
.muted { color: #777; } .bad { color: #b00; } .good { color: #070; }
img.plot { max-width: 100%; border: 1px solid #eee; }
"""


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def _read_json(path: Path) -> Any:
    return json.loads(path.read_text(encoding="utf-8")) if path.exists() else None


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


def _table(headers: list[str], rows: list[list[Any]], table_id: str) -> str:
    head = "".join(f"<th>{html.escape(str(h))}</th>" for h in headers)
    body = []
    for row in rows:
        cells = []
        for value in row:
            if isinstance(value, float):
                cells.append(f'<td class="num">{value:.3f}</td>')
            elif isinstance(value, int):
                cells.append(f'<td class="num">{value}</td>')
            elif value is None:  # a score that applies to none of the answers
                cells.append('<td class="num">–</td>')
            else:
                cells.append(f"<td>{html.escape(str(value))}</td>")
        body.append(f"<tr>{''.join(cells)}</tr>")
    return f'<table id="{table_id}"><thead><tr>{head}</tr></thead><tbody>{"".join(body)}</tbody></table>'


def build_report(run_dir: Path) -> Path:
    folder = Run(run_dir)
    run = _read_json(folder.record) or {}
    metrics = _read_jsonl(folder.metrics)
    rows = _read_jsonl(folder.eval_answers)
    fidelity = _read_json(folder.fidelity)
    timings = _read_json(folder.timings) or {}
    name = (run.get("config") or {}).get("name", run_dir.name)
    parts = [f"<h1>tunesmith run: {html.escape(name)}</h1>"]
    config = run.get("config") or {}
    final = run.get("final") or {}
    parts.append(f'<p class="muted">base {html.escape(str(config.get("model", {}).get("base", "?")))} · '
                 f'device {html.escape(str(run.get("device", "?")))} · started {run.get("started_at", "?")} · '
                 f'ended {run.get("ended_at", "?")}</p>')

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
               ["examples (train / eval)", f'{run.get("examples", {}).get("train")} / {run.get("examples", {}).get("eval")}'],
               ["LoRA", f'r={config.get("lora", {}).get("r")} alpha={config.get("lora", {}).get("alpha")}'],
               ["learning rate", config.get("train", {}).get("learning_rate")]]
    parts.append(_table(["metric", "value"], [[k, "–" if v is None else v] for k, v in summary], "metrics-table"))

    parts.append("<h2>Evaluation</h2>")
    parts.append(_eval_section(rows))

    parts.append("<h2>Export</h2>")
    parts.append(_export_section(folder, fidelity))

    parts.append("<h2>Timings</h2>")
    if timings:
        parts.append(_table(["stage", "seconds"], [[k, float(v)] for k, v in timings.items()], "timings-table"))
    else:
        parts.append('<p class="muted">no stage timings (run through `tunesmith pipeline`)</p>')

    page = (f"<!doctype html><html><head><meta charset='utf-8'><title>tunesmith: {html.escape(name)}</title>"
            f"<style>{_STYLE}</style></head><body>{''.join(parts)}</body></html>")
    target = folder.report
    write_text(target, page)
    return target


def _eval_section(rows: list[dict[str, Any]]) -> str:
    if not rows:
        return '<p class="muted">not evaluated yet (`tunesmith eval`)</p>'
    by_model: dict[str, list[dict[str, Any]]] = {}
    for row in rows:
        by_model.setdefault(row["model"], []).append(row)
    # The headline scores first, then the task scorer's per-rule ones.
    keys = list(dict.fromkeys(key for model_rows in by_model.values() for key in model_rows[0]["scores"]))
    headline = [key for key in keys if ":" not in key]
    table_rows = []
    for model, model_rows in by_model.items():
        means = mean_scores([r["scores"] for r in model_rows])
        table_rows.append([model_label(model), len(model_rows), *[means.get(key) for key in headline]])
    out = [_table(["model", "n", *headline], table_rows, "eval-table")]
    detail = [key for key in keys if ":" in key]  # a task scorer's per-rule scores, e.g. recall:seatbelt
    if detail:
        model_means = {model: mean_scores([r["scores"] for r in model_rows]) for model, model_rows in by_model.items()}
        out.append("<h3>Per-rule scores (mean over the answers each applies to)</h3>")
        out.append(_table(["score", *[model_label(model) for model in by_model]],
                          [[key, *[model_means[model].get(key) for model in by_model]] for key in detail],
                          "rule-table"))
    base = {r["index"]: r for r in by_model.get("base", [])}
    tuned = {r["index"]: r for r in by_model.get("finetuned", [])}
    differ = [(base[i], tuned[i]) for i in sorted(base.keys() & tuned.keys()) if base[i]["answer"] != tuned[i]["answer"]]
    if differ:
        out.append(f"<h3>Where base and fine-tuned differ ({len(differ)} of {len(tuned)}; first 10)</h3>")
        sample = [[b["prompt"], b["reference"], b["answer"], t["answer"],
                   "✓" if t["scores"].get("exact_match") else "✗"] for b, t in differ[:10]]
        out.append(_table(["prompt", "reference", "base", "fine-tuned", "exact"], sample, "differ-table"))
    return "".join(out)


def _export_section(run: Run, fidelity: Any) -> str:
    files = sorted(run.gguf.glob("*.gguf"))
    if not files:
        return '<p class="muted">not exported yet (`tunesmith export`)</p>'
    rows = [[path.name, f"{path.stat().st_size / 2**20:.1f} MiB"] for path in files]
    out = [_table(["file", "size"], rows, "export-table")]
    if isinstance(fidelity, dict) and fidelity.get("quantizations"):  # export/fidelity.report's shape
        keys = ["exact", "first_token", "loglik_gap", "passed", "seconds"]
        fid_rows = [[r.get("quant", "?"), *[r.get(k) for k in keys]] for r in fidelity["quantizations"]]
        out.append(_table(["quantization", "exact agreement", "first token", "log-lik gap (nats/token)", "passed",
                           "seconds"], fid_rows, "fidelity-table"))
        out.append(f"<p>{fidelity.get('prompts')} held-out prompts, greedy, against the merged model; pass: exact "
                   f"agreement ≥ {fidelity.get('min_agreement')}.</p>")
    elif fidelity is not None:
        out.append(f"<pre>{html.escape(json.dumps(fidelity, indent=2, ensure_ascii=False)[:4000])}</pre>")
    return "".join(out)
