"""The address example: the generator's rules, the committed files, what held out means, the scorer, and the
example trained and scored end to end on a tiny model with the README's config block."""

from __future__ import annotations

import json
import random
import re
from pathlib import Path

import pytest

from examples.address import generate as address
from tests.conftest import ROOT, run_cli
from tunesmith.config import load_config
from tunesmith.data import LoadReport, load_examples

HERE = Path(address.__file__).resolve().parent
CONFIG = HERE / "config.yaml"
RIGHT = {"name": "欧阳子涵", "phone": "13812345678", "province": "浙江省", "city": "杭州市", "district": "西湖区",
         "street": "文化北路", "detail": "188号锦绣花园3栋2单元501室"}
REFERENCE = address.answer(RIGHT)


def read(name: str) -> list[dict]:
    return [json.loads(line) for line in (HERE / name).read_text(encoding="utf-8").splitlines()]


def fields(record: dict) -> dict[str, str]:
    return json.loads(record["output"])


def test_committed_files_are_what_the_seeded_generator_writes():
    train, test, valid = address.generate()
    assert address.generate() == (train, test, valid)  # no state outside the seed
    assert (len(train), len(test), len(valid)) == (2000, 200, 100)
    assert read("train.jsonl") == train
    assert read("test.jsonl") == test
    assert read("valid.jsonl") == valid
    assert address.generate(seed=1)[0] != train


def test_answers_are_compact_json_in_field_order_and_follow_from_the_message():
    records = read("train.jsonl") + read("test.jsonl") + read("valid.jsonl")
    for record in records:
        answer = fields(record)
        assert list(answer) == list(address.FIELDS)
        assert record["output"] == json.dumps(answer, ensure_ascii=False, separators=(",", ":"))
        province = address.CITIES[answer["city"]]
        assert answer["province"] == province.name  # completed from the city, however it was written
        assert answer["district"] in province.cities[answer["city"]]
        assert re.fullmatch(r"1\d{10}", answer["phone"])
        message = record["input"]
        digits = re.sub(r"\D", "", message)
        assert answer["phone"] in digits, message  # spaces, dashes, +86 only wrap the number
        address_text = answer["district"] + answer["street"] + answer["detail"]
        for part in (answer["name"], answer["district"], answer["street"], answer["detail"]):
            assert part in message, (part, message)
        assert address_text in message.replace(" ", ""), message  # in this order, maybe spaced
        city = answer["city"]
        assert city.removesuffix("市") in message or (province.abbr and province.abbr in message), message
    assert len({r["input"] for r in records}) == len(records)  # no input twice, within or across the files


def test_the_ways_province_and_city_are_written():
    rng = random.Random(0)
    shanghai = {**RIGHT, "province": "上海市", "city": "上海市", "district": "浦东新区"}
    hangzhou = RIGHT
    written = {tuple(address.write_region(shanghai, rng, [])) for _ in range(200)}
    assert written == {("上海市",), ("上海",), ("沪",), ("上海", "上海市")}
    written = {tuple(address.write_region(hangzhou, rng, [])) for _ in range(400)}
    assert {("浙江", "杭州"), ("浙江省", "杭州市"), ("浙", "杭州市"), ("杭州",), ("杭州市",)} <= written
    assert all(len(parts) in (1, 2) and parts[-1] in ("杭州", "杭州市") for parts in written)
    lhasa = {**RIGHT, "province": "西藏自治区", "city": "拉萨市", "district": "城关区"}
    assert all(parts[0] != "藏" for parts in (address.write_region(lhasa, rng, []) for _ in range(200)))


def test_held_out_records_are_new_in_everything_that_decides_the_answer():
    train, test, valid = read("train.jsonl"), read("test.jsonl"), read("valid.jsonl")
    held_out = test + valid
    assert not {r["input"] for r in train} & {r["input"] for r in held_out}
    for key in ("name", "phone", "street", "detail"):
        taught = {fields(r)[key] for r in train}
        assert not taught & {fields(r)[key] for r in held_out}, key
    for key in ("name", "phone", "detail"):
        values = [fields(r)[key] for r in held_out]
        assert len(set(values)) == len(values), key  # and no two held-out records share them
    # Some place combinations are new too: a city's last district (of four or more) is never taught.
    taught_places = {(fields(r)["city"], fields(r)["district"]) for r in train}
    assert not taught_places & address.HELD_OUT_DISTRICTS
    new = [r for r in held_out if (fields(r)["city"], fields(r)["district"]) in address.HELD_OUT_DISTRICTS]
    assert [r for r in held_out if "new_district" in r["tags"]] == new
    assert 30 <= len(new) <= 75
    # ...but every city and every province, so the province can be completed from what training taught.
    assert {fields(r)["city"] for r in train} == set(address.CITIES)
    assert {fields(r)["province"] for r in train} == {p.name for p in address.PROVINCES}


def test_held_out_records_are_written_every_way_training_writes():
    tags = {tag for r in read("test.jsonl") for tag in r["tags"]}
    assert {"phone:plain", "phone:spaces", "phone:dashes", "phone:+86_space", "phone:+86", "phone:+86_dashes",
            "phone:(+86)_spaces", "phone:86-"} <= tags
    assert {"province:full", "province:short", "province:abbr", "province:none", "city:full", "city:short",
            "municipality", "sentence", "fields:labelled", "fields:bare", "address:spaced"} <= tags


def test_score_exact_match_and_per_field_accuracy():
    from tunesmith.scorers import load_scorer

    spec = load_config(CONFIG, ["eval.scorer=examples.address.generate:score"]).eval.scorer
    score = load_scorer(spec)
    keys = {"exact_match", "field_accuracy"} | {f"field:{key}" for key in address.FIELDS}
    right = score(REFERENCE, REFERENCE)
    assert right == {key: 1.0 for key in keys}
    reordered = json.dumps(dict(reversed(list(RIGHT.items()))), ensure_ascii=False, indent=1)
    assert score(reordered, REFERENCE)["exact_match"] == 1.0  # key order and spacing are not the answer

    wrong_city = score(address.answer({**RIGHT, "city": "杭州"}), REFERENCE)
    assert set(wrong_city) == keys  # the same keys for every answer, so an evaluator can average them
    assert wrong_city["exact_match"] == 0.0 and wrong_city["field:city"] == 0.0
    assert wrong_city["field_accuracy"] == pytest.approx(6 / 7)
    assert all(wrong_city[f"field:{key}"] == 1.0 for key in address.FIELDS if key != "city")
    unnormalised = score(address.answer({**RIGHT, "phone": "+86 138 1234 5678"}), {"input": "…", "output": REFERENCE})
    assert (unnormalised["field:phone"], unnormalised["field:name"]) == (0.0, 1.0)
    extra = score(json.dumps({**RIGHT, "zip": "310000"}, ensure_ascii=False), REFERENCE)
    assert (extra["exact_match"], extra["field_accuracy"]) == (0.0, 1.0)
    missing = score(json.dumps({k: v for k, v in RIGHT.items() if k != "detail"}, ensure_ascii=False), REFERENCE)
    assert (missing["field:detail"], missing["field:street"]) == (0.0, 1.0)

    for invalid in (REFERENCE[:-1], REFERENCE + " 谢谢", "", "[" + REFERENCE + "]", '"浙江省"'):
        assert score(invalid, REFERENCE) == {key: 0.0 for key in keys}, invalid


def test_the_config_is_the_readme_block_with_file_names_and_system_prompt_changed():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    block = re.search(r"## Your own data and model\n\n```yaml\n(.*?)```", readme, re.DOTALL).group(1).splitlines()
    ours = CONFIG.read_text(encoding="utf-8").splitlines()
    assert len(ours) == len(block)
    changed = [(theirs, mine) for theirs, mine in zip(block, ours) if theirs != mine]
    assert [mine.split(":")[0].strip() for _, mine in changed] == [
        "# examples/address/config.yaml", "name", "system_prompt"]
    cfg = load_config(CONFIG)
    assert (cfg.name, cfg.model.base, cfg.eval.expect) == ("address", "builtin:gemma3-270m", "json")
    assert cfg.data.test_file == str(HERE / "test.jsonl")
    report = LoadReport(cfg.data.train_file)
    examples = load_examples(cfg.data.train_file, cfg.data, report)
    assert (len(examples), report.shape, report.system_prompt_added) == (2000, "input_output", 2000)
    assert [m["role"] for m in examples[0].messages] == ["system", "user", "assistant"]


@pytest.mark.parametrize("name", ["train.jsonl", "test.jsonl"])
def test_data_inspect_accepts_the_files(name):
    done = run_cli("data", "inspect", str(HERE / name), "--config", str(CONFIG))
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    assert "no problems found" in done.stdout or "fields not used for training" in done.stdout
    assert re.search(rf"records\s+{len(read(name))}\b", done.stdout), done.stdout


def test_the_example_trains_and_is_scored_per_field_on_a_tiny_model(tmp_path, tiny_qwen3):
    sets = [f"model.base={tiny_qwen3}", f"runs_dir={tmp_path / 'runs'}", "train.max_steps=3", "train.batch_size=2",
            "train.eval_steps=3", "train.save_steps=3", "train.eval_accuracy=2", "eval.max_new_tokens=8",
            "eval.scorer=examples.address.generate:score"]
    args = [arg for value in sets for arg in ("--set", value)]
    trained = run_cli("train", "--config", str(CONFIG), *args)
    assert trained.returncode == 0, trained.stdout[-2000:] + trained.stderr[-2000:]
    run = tmp_path / "runs" / "address"
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert any("eval_field_accuracy" in record for record in metrics)  # the task's score, during training too

    scored = run_cli("eval", "--config", str(CONFIG), *args, "--models", "base,finetuned", "--limit", "3")
    assert scored.returncode == 0, scored.stdout[-2000:] + scored.stderr[-2000:]
    assert "field:city" in scored.stdout
    rows = [json.loads(line) for line in (run / "eval.jsonl").read_text(encoding="utf-8").splitlines()]
    test = read("test.jsonl")[:3]
    assert [(row["model"], row["reference"]) for row in rows] == [
        (model, record["output"]) for model in ("base", "finetuned") for record in test]
    for row in rows:  # a random model's 8 tokens, scored on every field as the example's scorer scores them
        task = address.score(row["answer"], row["reference"])
        assert "json_valid" in row["scores"] and set(task) <= set(row["scores"])
        assert {key: row["scores"][key] for key in task if key != "exact_match"} == \
            {key: value for key, value in task.items() if key != "exact_match"}


def test_data_inspect_shows_tokens_per_example_under_each_builtin(builtin_checkpoint, gemma_checkpoint):
    """Chinese text: Gemma 3's tokenizer writes it in far fewer tokens than SmolLM2's (README: which built-in for
    which language)."""
    import re

    done = run_cli("data", "inspect", str(HERE / "train.jsonl"), "--config", str(HERE / "config.yaml"))
    assert done.returncode == 0, done.stderr
    rows = dict(re.findall(r"builtin:(\S+)[^│┃]*[│┃]\s+(\d+)\s+[│┃]", done.stdout))
    assert set(rows) == {"smollm2-135m", "gemma3-270m"}, done.stdout
    assert int(rows["gemma3-270m"]) < 0.7 * int(rows["smollm2-135m"])
