"""The goDrive example: the rule table, the committed dataset, the held-out test file and the scorer."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from examples.godrive import generate as godrive
from tunesmith.config import load_config
from tunesmith.data import LoadReport, load_examples

HERE = Path(godrive.__file__).resolve().parent
ISSUE_LINE = ("<特征>场地类型:科目二; 当前项目:非项目区域; 车辆类型:手动挡; 挡位:1挡; 手刹:放下; 发动机:打火; "
              "安全带:系上; 车门:关闭; 离合:未踩; 刹车:未踩; 油门:未踩; 速度:适中; 时间特征:夜晚</特征>")
CALM = godrive.parse_features(ISSUE_LINE) | {"时间特征": "白天"}  # no rule fires


def read(name: str) -> list[dict]:
    return [json.loads(line) for line in (HERE / name).read_text(encoding="utf-8").splitlines()]


def test_the_issue_example_and_a_calm_state():
    assert godrive.expected(ISSUE_LINE) == "请开启近光灯。"
    assert godrive.expected(CALM) == godrive.ALL_GOOD


@pytest.mark.parametrize("change, rule", [
    ({"安全带": "未系"}, "seatbelt"),
    ({"车门": "未关"}, "door"),
    ({"手刹": "拉起"}, "handbrake"),
    ({"发动机": "熄火", "速度": "静止", "挡位": "空挡"}, "engine"),
    ({"速度": "静止", "挡位": "3挡"}, "gear_start"),
    ({"挡位": "空挡"}, "neutral_coast"),
    ({"车辆类型": "自动挡", "挡位": "N挡", "离合": "无"}, "neutral_coast"),
    ({"离合": "踩下"}, "clutch_ride"),
    ({"场地类型": "科目三", "当前项目": "掉头"}, "item:掉头"),
    ({"当前项目": "坡道定点停车与起步"}, "item:坡道定点停车与起步"),
    ({"速度": "过快"}, "speeding"),
    ({"时间特征": "夜晚"}, "night"),
    ({"时间特征": "傍晚"}, "dusk"),
])
def test_each_rule_alone_gives_its_one_wording(change, rule):
    wording = {r.id: r.wording for r in godrive.RULES}[rule]
    assert godrive.fired_rules(CALM | change) == [rule]
    assert godrive.expected(CALM | change) == wording


def test_rules_combine_in_priority_order_and_at_most_three():
    state = CALM | {"时间特征": "夜晚", "安全带": "未系", "当前项目": "倒车入库", "速度": "过快"}
    assert godrive.expected(state) == "请系好安全带。倒车入库看后视镜。请减速慢行。"
    assert godrive.fired_rules(state) == ["seatbelt", "item:倒车入库", "speeding", "night"]
    assert godrive.split_instructions(godrive.expected(state)) == ["请系好安全带。", "倒车入库看后视镜。", "请减速慢行。"]


def test_bad_feature_lines_are_refused():
    with pytest.raises(ValueError, match="not a goDrive feature line"):
        godrive.expected("场地类型:科目二")
    with pytest.raises(ValueError, match="lacks 时间特征"):
        godrive.expected(ISSUE_LINE.replace("; 时间特征:夜晚", ""))


def test_committed_files_are_what_the_generator_writes():
    train, test, valid = godrive.generate()
    assert read("train.jsonl") == train
    assert read("test.jsonl") == test
    assert read("valid.jsonl") == valid


def test_dataset_sizes_answers_and_held_out_combinations():
    train, test = read("train.jsonl"), read("test.jsonl")
    assert (len(train), len(test)) == (7799 + 7799, 300)
    inputs = {r["input"] for r in train}
    assert len(inputs) == len(train)
    assert not inputs & {r["input"] for r in test}  # no test state occurs in training
    assert all(r["output"] == godrive.expected(r["input"]) for r in train + test)
    seen = {rule for r in train for rule in godrive.fired_rules(r["input"])[:3]}
    assert seen == {r.id for r in godrive.RULES}  # every rule is taught


def test_held_out_states_share_no_answer_relevant_features_with_training():
    train, test, valid = read("train.jsonl"), read("test.jsonl"), read("valid.jsonl")
    taught = {godrive.relevant_key(r["input"]) for r in train}
    held_out = [godrive.relevant_key(r["input"]) for r in test + valid]
    assert not taught & set(held_out)
    assert len(set(held_out)) == len(held_out)  # and no two test states share them either
    # The key is every feature but the distractors: changing a distractor keeps it, anything else changes it.
    assert godrive.relevant_key(CALM | {"刹车": "踩下", "油门": "踩下"}) == godrive.relevant_key(CALM)
    for feature in set(godrive.FEATURES) - set(godrive.DISTRACTORS):
        other = next(v for r in train for v in [godrive.parse_features(r["input"])[feature]] if v != CALM[feature])
        assert godrive.relevant_key(CALM | {feature: other}) != godrive.relevant_key(CALM), feature


def test_the_teaching_half_shows_the_faults_and_the_cut_more_often():
    train = read("train.jsonl")
    halves = train[:godrive.TRAIN_SIZE], train[godrive.TRAIN_SIZE:]

    def share(records, test):
        return sum(map(test, records)) / len(records)

    def gives(rule):
        return lambda r: rule in godrive.fired_rules(r["input"])[:godrive.MAX_INSTRUCTIONS]

    many = share(halves[1], lambda r: len(godrive.fired_rules(r["input"])) > 3)
    assert many > 3 * share(halves[0], lambda r: len(godrive.fired_rules(r["input"])) > 3) and many > 0.4
    for rule in ("gear_start", "neutral_coast", "clutch_ride", "handbrake", "seatbelt", "door", "engine"):
        assert share(halves[1], gives(rule)) > 1.4 * share(halves[0], gives(rule)), rule
    assert share(halves[0], lambda r: r["output"] == godrive.ALL_GOOD) > 0.02  # the realistic half keeps calm states


def test_the_example_config_loads_the_dataset(tmp_path):
    cfg = load_config(HERE / "config.yaml")
    assert cfg.name == "goDrive" and cfg.model.base == "builtin:gemma3-270m"
    report = LoadReport(cfg.data.train_file)
    examples = load_examples(cfg.data.train_file, cfg.data, report)
    assert (len(examples), report.shape, report.system_prompt_added) == (15598, "input_output", 15598)
    assert [m["role"] for m in examples[0].messages] == ["system", "user", "assistant"]
    test_report = LoadReport(cfg.data.test_file)
    assert len(load_examples(cfg.data.test_file, cfg.data, test_report)) == 300
    assert test_report.ignored_fields == {"rules": 300}


def test_score_exact_match_and_per_rule_recall_and_precision():
    from tunesmith.scorers import load_scorer

    # load_config pins `examples.godrive.generate:score` to the file beside the config
    spec = load_config(HERE / "config.yaml").eval.scorer
    assert spec == f"{HERE / 'generate.py'}:score"
    score = load_scorer(spec)
    reference = "请系好安全带。倒车入库看后视镜。请减速慢行。"
    perfect = score(reference, reference)
    rules = [r.id for r in godrive.RULES] + ["all_good"]
    rule_keys = {f"{kind}:{rule}" for rule in rules for kind in ("recall", "precision")}
    assert set(perfect) == {"exact_match", "rule_precision", "rule_recall", "rule_f1"} | rule_keys
    assert {key: value for key, value in perfect.items() if value is not None} == {
        "exact_match": 1.0, "rule_precision": 1.0, "rule_recall": 1.0, "rule_f1": 1.0,
        **{f"{kind}:{rule}": 1.0 for rule in ("seatbelt", "item:倒车入库", "speeding")
           for kind in ("recall", "precision")}}
    partial = score("请系好安全带。请开启近光灯。", reference)
    assert set(partial) == set(perfect)  # the same keys for every answer, so an evaluator can average them
    assert partial["exact_match"] == 0.0
    assert (partial["recall:seatbelt"], partial["precision:seatbelt"]) == (1.0, 1.0)
    assert (partial["recall:speeding"], partial["precision:speeding"]) == (0.0, None)  # left out: a miss
    assert (partial["recall:night"], partial["precision:night"]) == (None, 0.0)  # added: a false instruction
    # Neither mentions the door: that says nothing about the door rule (it counted as right before).
    assert (partial["recall:door"], partial["precision:door"]) == (None, None)
    assert (partial["rule_precision"], partial["rule_recall"]) == (0.5, 1 / 3)
    empty = score("", reference)
    assert all(empty[f"recall:{rule}"] == 0.0 for rule in ("seatbelt", "item:倒车入库", "speeding"))
    assert all(empty[f"precision:{rule}"] is None for rule in rules)
    assert score("请开启近光灯。", ISSUE_LINE)["exact_match"] == 1.0  # a feature line as the reference
    assert score("请开启近光灯。\n", {"input": ISSUE_LINE, "output": "请开启近光灯。"})["exact_match"] == 1.0
    assert score("胡说八道", reference)["rule_f1"] == 0.0


def test_exact_match_is_given_apart_where_four_or_more_rules_fire():
    """With the question, goDrive's scorer splits exact match by how many rules fire; eval passes the prompt to a
    scorer that takes one (and still calls a two-argument scorer the plain way)."""
    from tunesmith.scorers import mean_scores, score_answers

    many = godrive.format_features(CALM | {"安全带": "未系", "车门": "未关", "发动机": "熄火", "时间特征": "夜晚"})
    few = ISSUE_LINE
    assert len(godrive.fired_rules(many)) >= 4 and len(godrive.fired_rules(few)) == 1
    right, wrong = godrive.expected(many), "请开启近光灯。"
    assert godrive.score(right, right)["exact_match"] == 1.0 and "exact_match:4+ rules" not in godrive.score(right, right)
    on_many = godrive.score(right, right, prompt=many)
    assert (on_many["exact_match:4+ rules"], on_many["exact_match:1-3 rules"]) == (1.0, None)
    on_few = godrive.score(wrong, godrive.expected(few), prompt=few)
    assert (on_few["exact_match:4+ rules"], on_few["exact_match:1-3 rules"]) == (None, 1.0)

    answers, references = [right, wrong, "请开启近光灯。"], [right, right, godrive.expected(few)]
    means = mean_scores(score_answers(answers, references, "text", godrive.score, prompts=[many, many, few]))
    assert (means["exact_match:4+ rules"], means["exact_match:1-3 rules"]) == (0.5, 1.0)
    plain = score_answers(answers, references, "text", lambda answer, reference: {"length": len(answer)},
                          prompts=[many, many, few])
    assert [scores["length"] for scores in plain] == [len(answer) for answer in answers]
