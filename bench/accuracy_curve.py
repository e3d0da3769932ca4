"""Accuracy against training minutes, from the metrics.jsonl of finished `tunesmith train` runs.

    python bench/accuracy_curve.py runs/g-gemma runs/g-smol ... [--plot bench/accuracy_curve.png]
    python bench/accuracy_curve.py runs/a runs/b --checkpoints examples/godrive/valid.jsonl --limit 100 \
        --config examples/godrive/config.yaml [--plot ...]

Each run logs `eval_exact_match` (greedy answers to train.eval_accuracy examples of its eval set, goDrive's
validation states) and `seconds` (since training began, eval passes included) at every eval step. This prints one
row per eval step and run, and with --plot draws one curve per run. The minutes are the run's own: time runs on a
quiet machine, or the curve measures the load too. A point before a run's last step was taken at a learning rate
that had not decayed yet: the end of each curve is what a run of that length gives, the middle is a lower bound.

With --checkpoints FILE the points come from the run's kept checkpoints instead (train with
`--set train.save_total_limit=null` to keep them all): each one's adapter weights answer the first --limit
examples of FILE after the run, so a curve costs the run none of its time budget (under a budget, eval passes
may take at most a tenth of it: goDrive's ~45-s pass leaves room for one). The minutes are then training seconds
alone (checkpoint's trainer_state.json), eval passes excluded.
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


def checkpoint_curve(run: Path, config_file: Path, cases_file: Path, limit: int) -> tuple[str, list[tuple]]:
    """(label, [(step, training minutes, exact match, exact match where 4+ rules fire or None)]) from a run's
    kept checkpoints, each answering the first `limit` examples of `cases_file`."""
    from safetensors.torch import load_file

    from tunesmith.config import load_config
    from tunesmith.inference import hf
    from tunesmith.inference.cases import load_cases
    from tunesmith.run import Run
    from tunesmith.scorers import load_scorer, mean_scores, score_answers
    from tunesmith.train import checkpoint

    config = load_config(config_file, [f"runs_dir={run.parent}", f"name={run.name}"])
    model, tokenizer = hf.load_finetuned(Run.of(config), config)
    cases = load_cases(cases_file, config, limit)
    references = [case.reference for case in cases]
    task = load_scorer(config.eval.scorer) if config.eval.scorer else None
    max_new = hf.answer_limit(tokenizer, references, config.eval.max_new_tokens)
    names = {name for name, _ in model.named_parameters()}
    points = []
    for kept in checkpoint.complete(run / "checkpoints"):
        trainable = load_file(kept / "trainable.safetensors")
        if missing := set(trainable) - names:
            raise SystemExit(f"{kept}: weights the model does not have, e.g. {min(missing)}")
        checkpoint.copy_into(model, trainable)
        answers = hf.generate_batch(model, tokenizer, [case.messages for case in cases], config, max_new)
        scores = mean_scores(score_answers(answers, references, config.eval.expect, task, prompts=[c.prompt for c in cases]))
        state = checkpoint.TrainState.from_json((kept / "trainer_state.json").read_text())
        points.append((state.step, state.train_seconds / 60, scores["exact_match"], scores.get("exact_match:4+ rules")))
        print(f"{run.name}: step {state.step} {state.train_seconds / 60:.1f} min {scores['exact_match']:.2f}", flush=True)
    return f"{run.name} (checkpoints, {len(cases)} of {cases_file.name})", points


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", type=Path)
    parser.add_argument("--plot", type=Path)
    parser.add_argument("--checkpoints", type=Path, help="score each kept checkpoint on this JSONL file")
    parser.add_argument("--limit", type=int, default=100)
    parser.add_argument("--config", type=Path, help="the runs' config file (with --checkpoints)")
    args = parser.parse_args()
    if args.checkpoints and not args.config:
        parser.error("--checkpoints needs --config")
    curves = [checkpoint_curve(run, args.config, args.checkpoints, args.limit) if args.checkpoints else curve(run)
              for run in args.runs]
    print(f"{'run':48} {'step':>5} {'minutes':>8} {'exact':>6} {'4+ rules':>8}")
    for label, points in curves:
        for step, minutes, exact, *rest in points:
            four = f"{rest[0]:8.2f}" if rest and rest[0] is not None else f"{'':8}"
            print(f"{label:48} {step:5d} {minutes:8.1f} {exact:6.2f} {four}")
    if args.plot:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        figure, axes = plt.subplots(figsize=(8, 4.5), dpi=100)
        for label, points in curves:
            if points:
                axes.plot([p[1] for p in points], [p[2] for p in points], "o-", label=label)
        axes.set_xlabel("training minutes" + ("" if args.checkpoints else " (eval passes included)"))
        axes.set_ylabel("exact match, goDrive validation states")
        axes.set_ylim(0, 1)
        axes.grid(alpha=0.3)
        axes.legend(fontsize=8)
        figure.tight_layout()
        figure.savefig(args.plot)
        print(f"wrote {args.plot}")


if __name__ == "__main__":
    main()
