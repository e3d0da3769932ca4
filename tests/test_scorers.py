"""The generic scorers: edit similarity keeps its definition now that rapidfuzz computes it."""

from __future__ import annotations

import random

import pytest

from tunesmith.scorers import edit_similarity, exact_match, normalize


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
