"""The generic scorers: edit similarity keeps its definition now that rapidfuzz computes it; per-field scores of
JSON answers and per-label precision and recall of classifications, on hand-made answers."""

from __future__ import annotations

import random

import pytest

from tunesmith.scorers import (
    edit_similarity,
    exact_match,
    field_scores,
    label_set,
    mean_scores,
    normalize,
    score_all,
    score_answers,
)


def _levenshtein(a: str, b: str) -> int:
    """The textbook dynamic programme (what scorers.py computed by hand before): the reference."""
    previous = list(range(len(b) + 1))
    for i, char_a in enumerate(a, 1):
        current = [i]
        for j, char_b in enumerate(b, 1):
            current.append(min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (char_a != char_b)))
        previous = current
    return previous[-1]


@pytest.mark.parametrize(("prediction", "reference", "expected"), [
    ("kitten", "sitting", 1 - 3 / 7),
    ("", "", 1.0),
    ("", "abc", 0.0),
    ("abc", "", 0.0),
    ("  same   words ", "same words", 1.0),  # whitespace is normalized first
    ("请关好车门。", "请关好车门。请系好安全带。", 6 / 13),  # characters, not bytes: Chinese counts per character
    ("ab", "ba", 0.0),  # no transpositions: two substitutions
])
def test_edit_similarity_known_values(prediction, reference, expected):
    assert edit_similarity(prediction, reference) == pytest.approx(expected)


def test_edit_similarity_is_one_minus_levenshtein_over_the_longer_length():
    rng = random.Random(0)
    alphabet = "ab c请关好车门。\n"
    for _ in range(500):
        a = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 30)))
        b = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 30)))
        na, nb = normalize(a), normalize(b)
        expected = 1.0 if not na and not nb else 1 - _levenshtein(na, nb) / max(len(na), len(nb))
        assert edit_similarity(a, b) == pytest.approx(expected, abs=1e-12), (a, b)
        assert exact_match(a, b) == float(na == nb)


ORDER = '{"name": "张三", "phone": "13812345678", "province": "浙江省", "city": "杭州市"}'


@pytest.mark.parametrize(("answer", "expected"), [
    (ORDER, {"name": 1.0, "phone": 1.0, "province": 1.0, "city": 1.0}),
    # key order and spacing do not count: values are compared as JSON
    ('{"city":"杭州市","province":"浙江省","phone":"13812345678","name":"张三"}',
     {"name": 1.0, "phone": 1.0, "province": 1.0, "city": 1.0}),
    ('{"name": "张三", "phone": "13812345678", "province": "江苏省", "city": "杭州市"}',
     {"name": 1.0, "phone": 1.0, "province": 0.0, "city": 1.0}),
    ('{"name": "张三", "phone": 13812345678, "city": "杭州市", "extra": 1}',  # a number is not the string; missing
     {"name": 1.0, "phone": 0.0, "province": 0.0, "city": 1.0}),
    ('{"name": "张三", "phone": "138', {"name": 0.0, "phone": 0.0, "province": 0.0, "city": 0.0}),  # not JSON
    ('["张三"]', {"name": 0.0, "phone": 0.0, "province": 0.0, "city": 0.0}),  # JSON, not an object
])
def test_per_field_scores_of_json_answers(answer, expected):
    assert field_scores(answer, ORDER) == {f"field:{name}": value for name, value in expected.items()}


def test_no_field_scores_where_the_reference_is_not_a_json_object():
    assert field_scores('{"a": 1}', "请系好安全带。") == {} and field_scores("[1]", "[1]") == {}


def test_field_accuracy_over_a_test_set_says_which_field_is_wrong():
    references = [ORDER, ORDER.replace("张三", "李四"), ORDER.replace("杭州市", "宁波市")]
    answers = [ORDER, ORDER.replace("张三", "李四").replace("浙江省", "江苏省"), ORDER.replace("浙江省", "江苏省")]
    means = mean_scores(score_answers(answers, references, "json", None))
    assert means["exact_match"] == pytest.approx(1 / 3) and means["json_valid"] == 1.0
    assert means["field:name"] == 1.0 and means["field:phone"] == 1.0
    assert means["field:province"] == pytest.approx(1 / 3)
    assert means["field:city"] == pytest.approx(2 / 3)  # the third answer kept 杭州市 where 宁波市 was expected


def test_per_label_precision_and_recall_of_a_classification():
    references = ["positive", "positive", "positive", "negative", "negative", "neutral"]
    answers = ["positive", "negative", "positive", "negative", " positive ", "positive"]
    assert label_set(references) == ["positive", "negative", "neutral"]
    means = mean_scores(score_answers(answers, references, "text", None))
    # positive: answered 4 times, right 2 -> precision 0.5; expected 3 times, found 2 -> recall 2/3
    assert means["precision:positive"] == pytest.approx(0.5) and means["recall:positive"] == pytest.approx(2 / 3)
    # negative: answered 2 times, right 1; expected 2 times, found 1
    assert means["precision:negative"] == pytest.approx(0.5) and means["recall:negative"] == pytest.approx(0.5)
    # neutral: never answered (no precision), expected once and missed
    assert means["precision:neutral"] is None and means["recall:neutral"] == 0.0


@pytest.mark.parametrize("references", [
    ["yes"] * 6,  # one label is no classification
    ["a", "b", "c", "d"],  # every answer different: too few examples per label
    [f"label {i % 25}" for i in range(100)],  # more than 20 labels
    ["a sentence that is far too long to be the name of a class", "short"] * 3,
    ['{"sentiment": "positive"}', '{"sentiment": "negative"}'] * 3,  # JSON objects get per-field scores instead
])
def test_answers_that_are_not_a_small_set_of_short_labels_get_no_label_scores(references):
    assert label_set(references) is None
    assert not any(key.startswith(("precision:", "recall:")) for key in score_all("a", references[0], "text", None))
