"""Which GGUF the Modelfile serves, on made-up score tables (export/choice.py), and the fidelity gate's verdict."""

from __future__ import annotations

from pathlib import Path

import pytest

from tunesmith.config import ExportConfig
from tunesmith.export import fidelity
from tunesmith.export.choice import Candidate, choose

MiB = 2**20
# The extraction task: the merged model answered 97.5% of 200 held-out messages exactly.
MERGED = 0.975
TABLE = [Candidate("q4_k_m", 105 * MiB, 0.93), Candidate("q8_0", 145 * MiB, 0.97), Candidate("f16", 271 * MiB, 0.975)]


def test_the_smallest_within_one_point_of_the_merged_model():
    choice = choose(TABLE, MERGED, 0.01)
    assert choice.quant == "q8_0" and choice.warning is None
    assert choice.reason == "the smallest within 1 point of the merged model's exact match 97.5%"


def test_a_quantization_losing_exactly_the_tolerance_is_within_it():
    table = [Candidate("q4_k_m", 105 * MiB, 0.965), *TABLE[1:]]  # 97.5 - 96.5: 1 point, in floating point
    assert choose(table, MERGED, 0.01).quant == "q4_k_m"
    assert choose(table, MERGED, 0.005).quant == "q8_0"


def test_one_that_fails_the_fidelity_check_is_passed_over_even_when_accurate():
    table = [Candidate("q4_k_m", 105 * MiB, 0.975, passed=False), *TABLE[1:]]
    assert choose(table, MERGED, 0.01).quant == "q8_0"


def test_none_within_the_tolerance_gives_the_most_accurate():
    table = [Candidate("q4_k_m", 105 * MiB, 0.80), Candidate("q8_0", 145 * MiB, 0.90),
             Candidate("q6_k", 120 * MiB, 0.90)]
    choice = choose(table, MERGED, 0.01)
    assert choice.quant == "q6_k"  # as accurate as q8_0, and smaller
    assert choice.reason.startswith("the most accurate: none passing is within 1 point")


def test_a_named_quantization_is_honoured_with_a_warning_when_it_loses_more():
    choice = choose(TABLE, MERGED, 0.01, named="q4_k_m")
    assert choice.quant == "q4_k_m" and choice.reason == "export.modelfile_quant"
    assert choice.warning == ("export.modelfile_quant q4_k_m answers 93.0% of the held-out set exactly, 4.5 points "
                              "below the merged model's 97.5%")
    assert choose(TABLE, MERGED, 0.01, named="f16").warning is None


def test_without_held_out_scores_the_first_quantization_asked_for():
    unscored = [Candidate(c.quant, c.size, None) for c in TABLE]
    assert choose(unscored, None, 0.01).quant == "q4_k_m"
    assert choose(unscored, None, 0.01, named="q8_0").quant == "q8_0"


@pytest.mark.parametrize(("exact_match", "agreement", "passed"), [
    (0.955, 0.95, True),   # 2 points below the merged model: the default allows it
    (0.95, 0.95, False),   # 2.5 points below
    (0.975, 0.70, False),  # as accurate, but its answers agree with the merged model's on too few prompts
])
def test_the_fidelity_gate_fails_a_quantization_that_loses_more_than_two_points(tmp_path, exact_match, agreement,
                                                                                passed):
    path = Path(tmp_path / "m.gguf")
    path.write_bytes(b"GGUF")
    result = fidelity.compare("q4_k_m", path, ["a"] * 20, ["a"] * round(20 * agreement) + ["b"] * round(20 * (1 - agreement)),
                              ([[1]] * 20, [[1]] * 20), ([-0.1] * 20, [-0.2] * 20), 1.0)
    fidelity.judge(result, exact_match, MERGED, ExportConfig())
    assert result.passed is passed
    assert result.exact_match_loss == pytest.approx(MERGED - exact_match)


def test_modelfile_quant_must_be_a_known_quantization():
    from pydantic import ValidationError

    assert ExportConfig(modelfile_quant="Q8_0").modelfile_quant == "q8_0"
    with pytest.raises(ValidationError, match="unknown quantization 'q9'"):
        ExportConfig(modelfile_quant="q9")


def test_a_quantization_not_scored_on_the_whole_set_is_never_chosen():
    """export answers the whole set smallest first and stops once one keeps the accuracy: the larger ones have no
    exact match (export._fidelity), and could not be chosen over it anyway."""
    table = [Candidate("q4_k_m", 105 * MiB, 0.97), Candidate("q8_0", 145 * MiB, None), Candidate("f16", 271 * MiB, None)]
    assert choose(table, MERGED, 0.01).quant == "q4_k_m"
    table = [Candidate("q4_k_m", 105 * MiB, 0.90), Candidate("q8_0", 145 * MiB, 0.93), Candidate("f16", 271 * MiB, None)]
    assert choose(table, MERGED, 0.01).quant == "q8_0"
    assert choose(table, MERGED, 0.01, named="f16").warning is None  # nothing to warn about without a score
