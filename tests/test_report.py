"""The report renders in a real headless Chromium: plot loaded, tables filled, screenshot taken."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from tunesmith.evaluate.report import build_report, difference
from tunesmith.export import fidelity
from tunesmith.export.choice import Choice
from tunesmith.run import Run
from tunesmith.scorers import score_answers

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
    # A JSON task's answers, scored as evaluation scores them: one wrong field, one answer that is no JSON.
    references = [json.dumps({"name": "张三", "city": "杭州市"}, ensure_ascii=False),
                  json.dumps({"name": "李四", "city": "南京市"}, ensure_ascii=False), '{"name": "王五", "city": "北京市"}']
    answers = [references[0], references[1].replace("南京市", "苏州市"), "王五, 北京市"]
    gguf = str(run / "gguf" / "demo.q8_0.gguf")
    for i, (answer, scores) in enumerate(zip(answers, score_answers(answers, references, "json", None))):
        rows.append({"index": i, "model": gguf, "prompt": f"订单 {i}", "reference": references[i], "answer": answer,
                     "scores": scores, "repeats": {"kind": "duplicate", "similarity": 100.0, "training": "t"}
                     if i == 0 else None})
    (run / "eval.jsonl").write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    (run / "gguf").mkdir()
    (run / "gguf" / "demo.q8_0.gguf").write_bytes(b"GGUF" + bytes(1000))
    # the shape export writes (export/fidelity.report), so a change there shows here
    result = fidelity.QuantFidelity("q8_0", gguf, 32, 0.97, 1.0, 0.012, True, 3.2, 0.965, 0.01, 1004)
    (run / "fidelity.json").write_text(json.dumps(fidelity.report(
        [result], 2.5, 32, 0.8, max_exact_match_loss=0.02, merged_exact_match=0.975, examples=200,
        choice=Choice("q8_0", "the smallest within 1 point of the merged model's exact match 97.5%"),
        answers={"q8_0": ["x"] * 200}, digest="0" * 64)))
    (run / "timings.json").write_text(json.dumps({"train": 60.0, "eval": 20.0}))


@pytest.mark.skipif(CHROMIUM is None, reason="Debian's chromium is not installed (make installs it)")
def test_report_renders_in_headless_chromium(tmp_path):
    from playwright.sync_api import sync_playwright

    run = tmp_path / "runs" / "demo"
    _fake_run(run)
    page_path = build_report(Run(run))
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
        assert len(eval_rows) == 3 and eval_rows[0].startswith("base") and "1.000" in eval_rows[1]
        fields = page.eval_on_selector_all("#field-table tbody tr", "rows => rows.map(r => r.innerText)")
        assert [row.split("\t")[0] for row in fields] == ["field:name", "field:city"]
        assert fields[1].endswith("0.333")  # the GGUF got the city of one order in three
        repeats = page.inner_text("#repeats-table")
        assert "demo.q8_0.gguf" in repeats and "1.000" in repeats and "0.000" in repeats
        wrong = page.eval_on_selector_all("#wrong-served tbody tr", "rows => rows.map(r => r.innerText)")
        assert len(wrong) == 2 and "city: \"苏州市\" \"南京市\"" in wrong[0] and "not a JSON object" in wrong[1]
        assert "serves q8_0: the smallest within 1 point" in page.inner_text("#modelfile-choice")
        assert page.eval_on_selector_all("#metrics-table tbody tr", "rows => rows.length") >= 5
        assert page.eval_on_selector_all("#differ-table tbody tr", "rows => rows.length") == 3
        assert "demo.q8_0.gguf" in page.inner_text("#export-table")
        assert "0.970" in page.inner_text("#fidelity-table") and "0.965" in page.inner_text("#fidelity-table")
        assert "train" in page.inner_text("#timings-table")
        page.screenshot(path=str(tmp_path / "report.png"), full_page=True)
        browser.close()
    assert (tmp_path / "report.png").stat().st_size > 10_000


def test_report_of_a_run_without_eval_or_export_says_so(tmp_path):
    run = tmp_path / "r"
    run.mkdir()
    (run / "run.json").write_text(json.dumps({"config": {"name": "r"}}))
    text = build_report(Run(run)).read_text()
    assert "not evaluated yet" in text and "not exported yet" in text and "no metrics.jsonl yet" in text


def test_a_wrong_answer_shows_what_differs_from_the_expected_one():
    assert difference("请关好车门。请系好安全带。", "请系好安全带。") == "<del>请关好车门。</del>请系好安全带。"
    assert difference("Turn on the lights", "Turn off the lights") == "Turn o<del>n</del><ins>ff</ins> the lights"
    assert difference('{"a": 1, "b": "<x>", "c": 3}', '{"a": 1, "b": "y", "d": 4}') == (
        'b: <del>&quot;&lt;x&gt;&quot;</del> <ins>&quot;y&quot;</ins><br>'  # the expected fields first, then extra ones
        "d: <del>(missing)</del> <ins>4</ins><br>c: <del>3</del> <ins>(missing)</ins>")
    assert difference("not json", '{"a": 1}') == "not a JSON object"


def test_the_report_lists_wrong_answers_and_per_field_scores_without_a_browser(tmp_path):
    run = tmp_path / "runs" / "demo"
    _fake_run(run)
    text = build_report(Run(run)).read_text()
    assert 'id="field-table"' in text and 'id="repeats-table"' in text and 'id="wrong-served"' in text
    assert "Wrong answers of demo.q8_0.gguf (2 of 3; first 2)" in text
    assert "Wrong answers of finetuned" not in text  # every fine-tuned answer was right


def test_report_shows_validation_per_rule_at_each_eval_step(tmp_path):
    """The during-training table: each rule's recall and precision at each eval step, as the loop logs them."""
    import re

    run = tmp_path / "run"
    _fake_run(run)
    with (run / "metrics.jsonl").open("a") as metrics:
        for step, recall in ((10, 0.25), (20, 0.875)):
            metrics.write(json.dumps({"step": step, "eval_loss": 0.5, "eval_exact_match": recall / 2,
                                      "eval_recall:gear_start": recall, "eval_precision:gear_start": 1.0}) + "\n")
    page = build_report(Run(run)).read_text(encoding="utf-8")
    table = page[page.index('id="training-detail-table"'):]
    table = table[:table.index("</table>")]
    assert "<th>step 10</th>" in table and "<th>step 20</th>" in table
    row = re.search(r"<td>recall:gear_start</td>(.*?)</tr>", table).group(1)
    assert re.findall(r'class="num">([^<]+)<', row)[-2:] == ["0.250", "0.875"]
