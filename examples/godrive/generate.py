"""goDrive, the reference article's task: a car's sensor features in, a driving coach's instruction out.

Run `python examples/godrive/generate.py` to rewrite train.jsonl (15,598 examples), test.jsonl (300 held-out
examples) and valid.jsonl (100 more, held out the same way, for watching training) next to this file; the output is
the same on every run (seeded). The evaluator imports
`expected(features) -> str` and `score(prediction, reference) -> dict` (`eval.scorer: examples.godrive.generate:score`).

What "held out" means here: a test state's answer-relevant features, every feature but the distractors 刹车 and
油门 (`relevant_key`), never occur together in any training state, and no two test states share them. So no test
answer can be recalled from a training neighbour that differs only in a distractor: the model has to apply the
rules to a combination it has not seen. Test states come from the same sampler as training (later draws of the
same seeded stream), keeping only such unseen combinations; they are therefore rarer states than the average
training one (more rules fire: 2.5 instructions an answer against 2.1 in training; 22% of test states fire more
than three rules, 10% of training states).

Input, one line:
  <特征>场地类型:科目二; 当前项目:非项目区域; 车辆类型:手动挡; 挡位:1挡; 手刹:放下; 发动机:打火; 安全带:系上;
  车门:关闭; 离合:未踩; 刹车:未踩; 油门:未踩; 速度:适中; 时间特征:夜晚</特征>
Output: the instructions of the rules below that fire, in this priority order, at most three, joined
without spaces (each ends with "。"); when none fires, "状态良好，继续保持。". One wording per rule, so
answers can be scored by exact match and per rule.

| priority | rule          | fires when                                        | instruction          |
|----------|---------------|---------------------------------------------------|----------------------|
| 1 safety | seatbelt      | 安全带:未系                                        | 请系好安全带。        |
| 2 safety | door          | 车门:未关                                          | 请关好车门。          |
| 3 safety | handbrake     | 手刹:拉起 and 速度 is not 静止                      | 请松开手刹。          |
| 4 safety | engine        | 发动机:熄火                                        | 请点火启动。          |
| 5 gear   | gear_start    | 手动挡, 速度:静止, 挡位 is 2挡..5挡                 | 起步请挂一挡。        |
| 6 gear   | neutral_coast | 速度 is 适中 or 过快, 挡位 is 空挡 or N挡             | 行驶中不要空挡滑行。  |
| 7 clutch | clutch_ride   | 手动挡, 速度 is 适中 or 过快, 离合:踩下              | 行驶中请松开离合。    |
| 8 item   | item:<项目>    | 当前项目 is not 非项目区域 (one wording per item)   | see ITEM_WORDING     |
| 9 speed  | speeding      | 速度:过快                                          | 请减速慢行。          |
| 10 time  | night         | 时间特征:夜晚                                      | 请开启近光灯。        |
| 10 time  | dusk          | 时间特征:傍晚                                      | 请打开示廓灯。        |
The other features (刹车, 油门, 缓慢 speed, the exact forward gear) make the state realistic and are
distractors: the model has to learn which features matter.

Training is two halves. The first, 7,799 states drawn as a driving school sees them (REALISTIC), fixes which
states are held out. The second, 7,799 more, is drawn with the faults two to three times as often (TEACHING), so
that a short run sees the rules that read two or three features at once, and the cut to three, often enough to
learn them. In the same 14 CPU minutes (bench/RESULTS.md, Session 12) the half-and-half set gave 61% of the test
states and 52% of the validation states against 53% and 49% for the realistic set alone, and 43-47% against
30-31% where four or more rules fire.

In the realistic half (share of answers giving each instruction): night 27%, dusk 20%, speeding 17%, seatbelt
15%, door 13%, engine 12%, handbrake 11%, each item 7-8%, clutch_ride 8%, gear_start 8%, neutral_coast 6%,
状态良好 3%; 10% of states fire more than three rules, so the cut to three matters. In the teaching half:
seatbelt 48%, door 43%, handbrake 25%, engine 24%, gear_start 19%, clutch_ride 12%, neutral_coast 10%, 状态良好
0.1%; 46% of states fire more than three rules. Answers are 12-56 tokens with the SmolLM2 tokenizer (median 33, `<|im_end|>` included).
"""

from __future__ import annotations

import json
import random
import re
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tunesmith.atomic import write_text

FEATURES = ["场地类型", "当前项目", "车辆类型", "挡位", "手刹", "发动机", "安全带", "车门", "离合", "刹车", "油门",
            "速度", "时间特征"]
ITEMS = {
    "科目二": ["倒车入库", "侧方停车", "坡道定点停车与起步", "直角转弯", "曲线行驶"],
    "科目三": ["直线行驶", "变更车道", "通过路口", "靠边停车", "掉头"],
}
ITEM_WORDING = {
    "倒车入库": "倒车入库看后视镜。",
    "侧方停车": "侧方停车注意车距。",
    "坡道定点停车与起步": "坡道起步防止溜车。",
    "直角转弯": "直角转弯打满方向。",
    "曲线行驶": "曲线行驶慢打方向。",
    "直线行驶": "直线行驶握稳方向。",
    "变更车道": "变更车道先打转向灯。",
    "通过路口": "通过路口减速观察。",
    "靠边停车": "靠边停车打右转向灯。",
    "掉头": "掉头前打左转向灯。",
}
DISTRACTORS = ("刹车", "油门")
"""Features no rule reads: they make a state realistic, and the model has to learn to ignore them."""
NO_ITEM = "非项目区域"
ALL_GOOD = "状态良好，继续保持。"
MAX_INSTRUCTIONS = 3
MOVING_FAST = ("适中", "过快")
TRAIN_SIZE = 7799
TEACHING_SIZE = 7799
TEST_SIZE = 300
VALID_SIZE = 100
SEED = 7799
HERE = Path(__file__).resolve().parent

Features = dict[str, str]


@dataclass(frozen=True)
class Rule:
    id: str
    wording: str
    fires: Callable[[Features], bool]


RULES: list[Rule] = [
    Rule("seatbelt", "请系好安全带。", lambda f: f["安全带"] == "未系"),
    Rule("door", "请关好车门。", lambda f: f["车门"] == "未关"),
    Rule("handbrake", "请松开手刹。", lambda f: f["手刹"] == "拉起" and f["速度"] != "静止"),
    Rule("engine", "请点火启动。", lambda f: f["发动机"] == "熄火"),
    Rule("gear_start", "起步请挂一挡。",
         lambda f: f["车辆类型"] == "手动挡" and f["速度"] == "静止" and f["挡位"] in ("2挡", "3挡", "4挡", "5挡")),
    Rule("neutral_coast", "行驶中不要空挡滑行。", lambda f: f["速度"] in MOVING_FAST and f["挡位"] in ("空挡", "N挡")),
    Rule("clutch_ride", "行驶中请松开离合。",
         lambda f: f["车辆类型"] == "手动挡" and f["速度"] in MOVING_FAST and f["离合"] == "踩下"),
    *[Rule(f"item:{item}", wording, lambda f, item=item: f["当前项目"] == item) for item, wording in ITEM_WORDING.items()],
    Rule("speeding", "请减速慢行。", lambda f: f["速度"] == "过快"),
    Rule("night", "请开启近光灯。", lambda f: f["时间特征"] == "夜晚"),
    Rule("dusk", "请打开示廓灯。", lambda f: f["时间特征"] == "傍晚"),
]
WORDING_TO_RULE = {rule.wording: rule.id for rule in RULES} | {ALL_GOOD: "all_good"}
_LINE = re.compile(r"^\s*<特征>(.*)</特征>\s*$", re.DOTALL)


def parse_features(text: str) -> Features:
    """`<特征>键:值; 键:值; ...</特征>` → {键: 值}; ValueError names what is wrong."""
    match = _LINE.match(text)
    if not match:
        raise ValueError(f"not a goDrive feature line (expected <特征>...</特征>): {text[:60]!r}")
    features: Features = {}
    for part in match.group(1).split(";"):
        if not part.strip():
            continue
        key, sep, value = part.partition(":")
        if not sep:
            raise ValueError(f"feature {part.strip()!r} has no ':'")
        features[key.strip()] = value.strip()
    missing = [key for key in FEATURES if key not in features]
    if missing:
        raise ValueError(f"feature line lacks {', '.join(missing)}")
    return features


def format_features(features: Features) -> str:
    return "<特征>" + "; ".join(f"{key}:{features[key]}" for key in FEATURES) + "</特征>"


def fired_rules(features: Features | str) -> list[str]:
    """Ids of every rule that fires, in priority order (before the cut to three)."""
    f = parse_features(features) if isinstance(features, str) else features
    return [rule.id for rule in RULES if rule.fires(f)]


def expected(features: Features | str) -> str:
    """The coach's instruction for a feature state: the answer the fine-tuned model should give."""
    f = parse_features(features) if isinstance(features, str) else features
    wordings = [rule.wording for rule in RULES if rule.fires(f)][:MAX_INSTRUCTIONS]
    return "".join(wordings) or ALL_GOOD


def split_instructions(text: str) -> list[str]:
    """'请系好安全带。请开启近光灯。' → ['请系好安全带。', '请开启近光灯。'] (ALL_GOOD stays whole)."""
    text = text.strip()
    if text.startswith(ALL_GOOD):
        return [ALL_GOOD] + split_instructions(text[len(ALL_GOOD):])
    return [piece + "。" for piece in text.split("。")[:-1] if piece.strip()] + (
        [text.rsplit("。", 1)[-1]] if text and not text.endswith("。") else [])


def score(prediction: str, reference: str | dict[str, Any], prompt: str | None = None) -> dict[str, float | None]:
    """Exact match plus per-rule scores for one answer.

    `reference` is the expected answer, a feature line (its `expected` answer is used), or a record with
    "output" (or "input"). Returned keys, the same for every answer: exact_match (0/1); rule_precision,
    rule_recall, rule_f1 over the instructions; and for every rule (and all_good) "recall:<id>" and
    "precision:<id>". A rule counts only where it matters: its recall is 1/0 where the reference gives it
    (None elsewhere), its precision 1/0 where the answer gives it (None elsewhere). Averaged over a test file
    with the Nones left out, they are the rule's recall and precision; an answer that leaves a rule out where
    the reference does too says nothing about that rule.

    With `prompt` (the feature line asked about), exact match is also given apart where four or more rules fire
    ("exact_match:4+ rules": the cut to three decides which three) and where one to three do ("exact_match:1-3
    rules"), each None on the other states.
    """
    if isinstance(reference, dict):
        reference = reference.get("output") or expected(reference["input"])
    elif reference.lstrip().startswith("<特征>"):
        reference = expected(reference)
    predicted = [WORDING_TO_RULE.get(s.strip(), "unknown") for s in split_instructions(prediction)]
    wanted = [WORDING_TO_RULE.get(s, "unknown") for s in split_instructions(reference)]
    hits = len(set(predicted) & set(wanted) - {"unknown"})
    precision = hits / len(predicted) if predicted else 0.0
    recall = hits / len(wanted) if wanted else 0.0
    result: dict[str, float | None] = {
        "exact_match": float(prediction.strip() == reference.strip()),
        "rule_precision": precision,
        "rule_recall": recall,
        "rule_f1": 2 * precision * recall / (precision + recall) if precision + recall else 0.0,
    }
    for rule_id in WORDING_TO_RULE.values():
        result[f"recall:{rule_id}"] = float(rule_id in predicted) if rule_id in wanted else None
        result[f"precision:{rule_id}"] = float(rule_id in wanted) if rule_id in predicted else None
    if prompt is not None and prompt.lstrip().startswith("<特征>"):
        fired = len(fired_rules(prompt.strip()))
        result["exact_match:4+ rules"] = result["exact_match"] if fired >= 4 else None
        result["exact_match:1-3 rules"] = result["exact_match"] if 1 <= fired <= 3 else None
    return result


def _pick(rng: random.Random, weights: dict[str, float]) -> str:
    return rng.choices(list(weights), weights=list(weights.values()))[0]


REALISTIC: dict[str, Any] = {
    "engine": {"打火": 0.92, "熄火": 0.08}, "speed": {"静止": 0.2, "缓慢": 0.3, "适中": 0.3, "过快": 0.2},
    "moving_manual_gear": {"空挡": 0.12, "1挡": 0.2, "2挡": 0.25, "3挡": 0.2, "4挡": 0.1, "5挡": 0.05, "倒挡": 0.08},
    "standing_manual_gear": {"空挡": 0.3, "1挡": 0.3, "2挡": 0.1, "3挡": 0.1, "4挡": 0.05, "5挡": 0.05, "倒挡": 0.1},
    "moving_auto_gear": {"D挡": 0.8, "N挡": 0.12, "R挡": 0.08},
    "moving_clutch": {"踩下": 0.2, "未踩": 0.8}, "moving_handbrake": {"拉起": 0.1, "放下": 0.9},
    "belt": {"系上": 0.9, "未系": 0.1}, "door": {"关闭": 0.92, "未关": 0.08},
    "time": {"白天": 0.5, "傍晚": 0.2, "夜晚": 0.3},
}
"""How often each state occurs in a driving school: the held-out (test and validation) states and the first half
of training are drawn from these."""
TEACHING: dict[str, Any] = {
    "engine": {"打火": 0.8, "熄火": 0.2}, "speed": {"静止": 0.3, "缓慢": 0.2, "适中": 0.3, "过快": 0.2},
    "moving_manual_gear": {"空挡": 0.25, "1挡": 0.15, "2挡": 0.2, "3挡": 0.15, "4挡": 0.1, "5挡": 0.05, "倒挡": 0.1},
    "standing_manual_gear": {"空挡": 0.2, "1挡": 0.2, "2挡": 0.15, "3挡": 0.15, "4挡": 0.1, "5挡": 0.1, "倒挡": 0.1},
    "moving_auto_gear": {"D挡": 0.65, "N挡": 0.25, "R挡": 0.1},
    "moving_clutch": {"踩下": 0.4, "未踩": 0.6}, "moving_handbrake": {"拉起": 0.3, "放下": 0.7},
    "belt": {"系上": 0.7, "未系": 0.3}, "door": {"关闭": 0.75, "未关": 0.25},
    "time": {"白天": 0.4, "傍晚": 0.3, "夜晚": 0.3},
}
"""The teaching half of training: the faults behind the rules two to three times as often as on the road, so the
conjunctive rules (gear_start, neutral_coast, clutch_ride) and the cut to three are seen often enough to be learned
in a short run. A training set drawn only from these taught the conjunctions in 360 steps but lost 状态良好 (its
recall fell to 0: it then almost never occurs): hence half and half."""


def sample_features(rng: random.Random, weights: dict[str, Any] = REALISTIC) -> Features:
    """One plausible car state: the engine off means standing still, reversing items favour reverse gear."""
    site = _pick(rng, {"科目二": 1, "科目三": 1})
    item = _pick(rng, {NO_ITEM: 0.25, **{name: 0.15 for name in ITEMS[site]}})
    manual = rng.random() < 0.6
    engine = _pick(rng, weights["engine"])
    speed = "静止" if engine == "熄火" else _pick(rng, weights["speed"])
    moving = speed != "静止"
    reversing = item in ("倒车入库", "侧方停车") and moving and rng.random() < 0.6
    if manual:
        if reversing:
            gear = "倒挡"
        else:
            gear = _pick(rng, weights["moving_manual_gear" if moving else "standing_manual_gear"])
        clutch = _pick(rng, weights["moving_clutch"] if moving else {"踩下": 0.5, "未踩": 0.5})
    else:
        if reversing:
            gear = "R挡"
        elif moving:
            gear = _pick(rng, weights["moving_auto_gear"])
        else:
            gear = _pick(rng, {"P挡": 0.5, "N挡": 0.2, "D挡": 0.25, "R挡": 0.05})
        clutch = "无"
    return {
        "场地类型": site,
        "当前项目": item,
        "车辆类型": "手动挡" if manual else "自动挡",
        "挡位": gear,
        "手刹": _pick(rng, weights["moving_handbrake"] if moving else {"拉起": 0.6, "放下": 0.4}),
        "发动机": engine,
        "安全带": _pick(rng, weights["belt"]),
        "车门": _pick(rng, weights["door"]),
        "离合": clutch,
        "刹车": _pick(rng, {"踩下": 0.2, "未踩": 0.8} if moving else {"踩下": 0.5, "未踩": 0.5}),
        "油门": "未踩" if engine == "熄火" else _pick(rng, {"踩下": 0.4, "未踩": 0.6} if moving else
                                                      {"踩下": 0.1, "未踩": 0.9}),
        "速度": speed,
        "时间特征": _pick(rng, weights["time"]),
    }


def relevant_key(features: Features | str) -> tuple[str, ...]:
    """The answer-relevant part of a state: every feature but the distractors. Held-out states never share it
    with a training state."""
    f = parse_features(features) if isinstance(features, str) else features
    return tuple(f[key] for key in FEATURES if key not in DISTRACTORS)


def generate(train_size: int = TRAIN_SIZE, test_size: int = TEST_SIZE, seed: int = SEED,
             valid_size: int = VALID_SIZE, teaching_size: int = TEACHING_SIZE,
             ) -> tuple[list[dict], list[dict], list[dict]]:
    """(train, test, valid): `train_size` distinct realistic feature states for training; then, from the same
    stream, `test_size` states and then `valid_size` more whose `relevant_key` occurs neither in training nor in
    any state drawn before them; then `teaching_size` more training states drawn with TEACHING weights from a
    stream of their own, none sharing a held-out state's `relevant_key`. The validation states are held out like
    the test states and disjoint from them: training watches its accuracy on them (data.eval_file) and the test set stays untouched until the end."""
    rng = random.Random(seed)
    seen: set[str] = set()
    lines: list[str] = []
    while len(lines) < train_size:
        line = format_features(sample_features(rng))
        if line not in seen:
            seen.add(line)
            lines.append(line)
    taken = {relevant_key(line) for line in lines}

    def held_out(size: int) -> list[str]:
        drawn: list[str] = []
        while len(drawn) < size:
            features = sample_features(rng)
            key = relevant_key(features)
            if key not in taken:
                taken.add(key)
                drawn.append(format_features(features))
        return drawn

    test_lines, valid_lines = held_out(test_size), held_out(valid_size)
    # The teaching half comes after the held-out states are fixed, from its own stream, and avoids their
    # answer-relevant features: the test and validation files stay what they were with a realistic training set.
    teaching_rng = random.Random(seed + 1)
    while len(lines) < train_size + teaching_size:
        features = sample_features(teaching_rng, TEACHING)
        line = format_features(features)
        if line not in seen and relevant_key(features) not in taken:
            seen.add(line)
            lines.append(line)
    train = [{"input": line, "output": expected(line)} for line in lines]
    test, valid = ([{"input": line, "output": expected(line), "rules": fired_rules(line)[:MAX_INSTRUCTIONS]}
                    for line in part] for part in (test_lines, valid_lines))
    return train, test, valid


def write_jsonl(path: Path, records: list[dict]) -> None:
    write_text(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))


def main(out: Path = HERE) -> None:
    train, test, valid = generate()
    for name, records in (("train", train), ("test", test), ("valid", valid)):
        write_jsonl(out / f"{name}.jsonl", records)
    print(f"wrote {len(train)} training, {len(test)} test and {len(valid)} validation examples to {out}")


if __name__ == "__main__":
    main(Path(sys.argv[1]) if len(sys.argv) > 1 else HERE)
