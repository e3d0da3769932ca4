"""Accuracy against training minutes, from the metrics.jsonl of finished `tunesmith train` runs.

    python bench/accuracy_curve.py runs/g-gemma runs/g-smol ... [--plot bench/accuracy_curve.png]

Each run logs `eval_exact_match` (greedy answers to train.eval_accuracy examples of its eval set, goDrive's
validation states) and `seconds` (since training began, eval passes included) at every eval step. This prints one
row per eval step and run, and with --plot draws one curve per run. The minutes are the run's own: time runs on a
quiet machine, or the curve measures the load too. A point before a run's last step was taken at a learning rate
that had not decayed yet: the end of each curve is what a run of that length gives, the middle is a lower bound.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def curve(run: Path) -> tuple[str, list[tuple[int, float, float]]]:
    """(label, [(step, minutes, exact match)]) of a run."""
    record = json.loads((run / "run.json").read_text())
    config = record["config"]
    label = f"{run.name} ({config['model']['base'].removeprefix('builtin:')})"
    points = []
    for line in (run / "metrics.jsonl").read_text().splitlines():
        row = json.loads(line)
        if row.get("eval_exact_match") is not None and row.get("seconds") is not None:
            points.append((row["step"], row["seconds"] / 60, row["eval_exact_match"]))
    return label, points


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", type=Path)
    parser.add_argument("--plot", type=Path)
    args = parser.parse_args()
    curves = [curve(run) for run in args.runs]
    print(f"{'run':40} {'step':>5} {'minutes':>8} {'exact':>6}")
    for label, points in curves:
        for step, minutes, exact in points:
            print(f"{label:40} {step:5d} {minutes:8.1f} {exact:6.2f}")
    if args.plot:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        figure, axes = plt.subplots(figsize=(8, 4.5), dpi=100)
        for label, points in curves:
            if points:
                axes.plot([p[1] for p in points], [p[2] for p in points], "o-", label=label)
        axes.set_xlabel("training minutes (eval passes included)")
        axes.set_ylabel("exact match, goDrive validation states")
        axes.set_ylim(0, 1)
        axes.grid(alpha=0.3)
        axes.legend(fontsize=8)
        figure.tight_layout()
        figure.savefig(args.plot)
        print(f"wrote {args.plot}")


if __name__ == "__main__":
    main()
