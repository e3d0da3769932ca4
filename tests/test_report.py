"""The report renders in a real headless Chromium: plot loaded, tables filled, screenshot taken."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from tunesmith.evaluate.report import build_report
from tunesmith.export import fidelity

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


def _fake_run(run: Path) -> None:
    """A run folder with the files a real run writes (their formats are pinned by the train/eval tests)."""
    run.mkdir(parents=True)
    (run / "run.json").write_text(json.dumps({
        "config": {"name": "demo", "model": {"base": "builtin:smollm2-135m"}, "lora": {"r": 16, "alpha": 16},
                   "train": {"learning_rate": 0.002}},
        "device": "cpu", "started_at": "2026-11-28T01:00:00+00:00", "ended_at": "2026-11-28T01:15:00+00:00",
        "examples": {"train": 100, "eval": 10},
        "final": {"steps": 20, "train_loss": 0.4, "eval_loss": 0.5, "train_seconds": 60.0},
    }))
    lines = [{"step": s, "loss": 3.0 / s} for s in range(1, 21)] + [{"step": 10, "eval_loss": 0.6}, {"step": 20, "eval_loss": 0.5}]
    (run / "metrics.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    rows = []
    for model, answer in [("base", "no idea"), ("finetuned", "请系好安全带。")]:
        for i in range(3):
            rows.append({"index": i, "model": model, "prompt": f"<特征>{i}</特征>", "reference": "请系好安全带。",
                         "answer": answer, "scores": {"exact_match": float(model == "finetuned"), "rule:seatbelt": 1.0}})
    (run / "eval.jsonl").write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    (run / "gguf").mkdir()
    (run / "gguf" / "demo.q8_0.gguf").write_bytes(b"GGUF" + bytes(1000))
    # the shape export writes (export/fidelity.report), so a change there shows here
    result = fidelity.QuantFidelity("q8_0", str(run / "gguf" / "demo.q8_0.gguf"), 32, 0.97, 1.0, 0.012, True, 3.2)
    (run / "fidelity.json").write_text(json.dumps(fidelity.report([result], 2.5, 32, 0.8)))
    (run / "timings.json").write_text(json.dumps({"train": 60.0, "eval": 20.0}))


@pytest.mark.skipif(CHROMIUM is None, reason="Debian's chromium is not installed (make installs it)")
def test_report_renders_in_headless_chromium(tmp_path):
    from playwright.sync_api import sync_playwright

    run = tmp_path / "runs" / "demo"
    _fake_run(run)
    page_path = build_report(run)
    assert page_path == run / "report.html"
    assert "http://" not in page_path.read_text() and "https://" not in page_path.read_text()  # nothing fetched

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=[
            "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
            "--no-first-run", "--disable-sync"])
        page = browser.new_page(viewport={"width": 1200, "height": 900})
        page.goto(page_path.as_uri())
        width = page.eval_on_selector("#loss-plot", "img => img.complete ? img.naturalWidth : 0")
        assert width > 300  # the PNG decoded
        eval_rows = page.eval_on_selector_all("#eval-table tbody tr", "rows => rows.map(r => r.innerText)")
        assert len(eval_rows) == 2 and eval_rows[0].startswith("base") and "1.000" in eval_rows[1]
        assert page.eval_on_selector_all("#metrics-table tbody tr", "rows => rows.length") >= 5
        assert page.eval_on_selector_all("#differ-table tbody tr", "rows => rows.length") == 3
        assert "demo.q8_0.gguf" in page.inner_text("#export-table")
        assert "0.970" in page.inner_text("#fidelity-table")
        assert "train" in page.inner_text("#timings-table")
        page.screenshot(path=str(tmp_path / "report.png"), full_page=True)
        browser.close()
    assert (tmp_path / "report.png").stat().st_size > 10_000


def test_report_of_a_run_without_eval_or_export_says_so(tmp_path):
    run = tmp_path / "r"
    run.mkdir()
    (run / "run.json").write_text(json.dumps({"config": {"name": "r"}}))
    text = build_report(run).read_text()
    assert "not evaluated yet" in text and "not exported yet" in text and "no metrics.jsonl yet" in text
