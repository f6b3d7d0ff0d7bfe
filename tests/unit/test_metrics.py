"""Answer-matching metrics on hand-worked examples (each expected value is worked out in the comment)."""

from __future__ import annotations

import pytest

from loramoe.eval.metrics import (
    GENERATION_METRICS,
    alias_contained,
    exact_match,
    first_line,
    mean_interval,
    normalize_answer,
    prefix_match,
    rank_of_gold,
    ranking_accuracy,
    regex_match,
    rouge_l,
    token_f1,
    verbatim_match,
    wilson_interval,
)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (
            "The  Eiffel-Tower!",
            "eiffeltower",
        ),  # lowercase, '-' and '!' dropped, article dropped, spaces collapsed
        ("  a Tale of Two Cities. ", "tale of two cities"),
        ("An apple, an orange", "apple orange"),
        ("theatre", "theatre"),  # 'the' only removed as a whole word
        ("U.S.A.", "usa"),
        ("", ""),
    ],
)
def test_normalize_answer_is_squad_normalisation(text: str, expected: str) -> None:
    assert normalize_answer(text) == expected


def test_exact_match_takes_any_alias_after_normalisation() -> None:
    golds = ["Jamaican Creole English Language", "Jamaican English"]
    assert exact_match("jamaican english.", golds) == 1.0
    assert exact_match("The Jamaican English", golds) == 1.0  # the article is normalised away
    assert exact_match("Jamaican", golds) == 0.0
    assert exact_match("Paris", "paris") == 1.0  # a single string is one alias
    assert exact_match("anything", []) == 0.0


def test_token_f1_hand_worked() -> None:
    # pred "barack obama" vs gold "obama": common 1, P = 1/2, R = 1/1, F1 = 2 * .5 * 1 / 1.5 = 2/3.
    assert token_f1("Barack Obama", ["Obama"]) == pytest.approx(2 / 3)
    # Best alias wins: "president barack obama" vs "barack obama" -> P 2/3, R 1, F1 0.8.
    assert token_f1("President Barack Obama", ["Michelle", "Barack Obama"]) == pytest.approx(0.8)
    # Repeated tokens count with multiplicity: pred "new new york" vs gold "new york" -> common 2, P 2/3, R 1.
    assert token_f1("new new york", "New York") == pytest.approx(0.8)
    assert token_f1("London", ["Paris"]) == 0.0
    assert token_f1("the", ["a"]) == 1.0  # both normalise to empty: agreement
    assert token_f1("", ["Paris"]) == 0.0


def test_alias_contained_matches_whole_tokens_in_a_sentence() -> None:
    assert alias_contained("The capital of France is Paris.", ["Paris"]) == 1.0
    assert alias_contained("I think it is New York City", ["new york"]) == 1.0
    assert alias_contained("He took the bus.", ["US"]) == 0.0  # no match inside a word
    assert alias_contained("Parisian food", ["Paris"]) == 0.0
    assert alias_contained("The answer", ["The"]) == 0.0  # an alias that normalises to nothing never matches


def test_prefix_match_for_cloze_continuations() -> None:
    assert prefix_match(" Antarctica. It is the largest", ["Antarctica"]) == 1.0
    assert prefix_match("the Pacific Ocean", ["Pacific Ocean"]) == 1.0
    assert prefix_match("Antarctican", ["Antarctica"]) == 0.0  # token boundary
    assert prefix_match("located in Antarctica", ["Antarctica"]) == 0.0
    assert alias_contained("located in Antarctica", ["Antarctica"]) == 1.0


def test_regex_match_on_raw_text_case_insensitive() -> None:
    pattern = r"20\s?,?\s?(32|40)0\s?-?\s?f(ee|oo)t|6,194-meter"
    assert regex_match("It is 20,320 feet tall.", pattern) == 1.0
    assert regex_match("about 20320 FEET", pattern) == 1.0
    assert regex_match("6,194-meter peak", pattern) == 1.0
    assert regex_match("20,000 feet", pattern) == 0.0
    assert regex_match("After the Fall", [r"Finishing the Play", r"After the Fall"]) == 1.0
    assert regex_match("a (b", "(b") == 1.0  # an invalid pattern is matched literally


def test_ranking_helpers() -> None:
    assert rank_of_gold([-1.0, -3.0, -2.0], 0) == 1
    assert rank_of_gold([-1.0, -3.0, -2.0], 2) == 2
    assert rank_of_gold([-1.0, -3.0, -2.0], 1) == 3
    assert ranking_accuracy([-1.0, -3.0, -2.0], 0) == 1.0
    assert ranking_accuracy([-1.0, -3.0, -2.0], 2) == 0.0
    # A tie with a distractor counts against the gold: equal scores are not knowledge.
    assert rank_of_gold([-2.0, -2.0], 1) == 2
    assert ranking_accuracy([-2.0, -2.0], 0) == 0.0


def test_ranking_rejects_bad_input() -> None:
    with pytest.raises(ValueError, match="out of range"):
        rank_of_gold([-1.0, -2.0], 2)
    with pytest.raises(ValueError, match="NaN"):
        rank_of_gold([float("nan"), -2.0], 1)


def test_verbatim_match_counts_case_and_punctuation_but_not_surrounding_space() -> None:
    assert verbatim_match("  #42#\n", ["#42#"]) == 1.0
    assert verbatim_match("42", ["#42#"]) == 0.0  # the format is the task
    assert verbatim_match("Zorp", "ZORP") == 0.0


def test_rouge_l_is_the_best_reference_and_first_line_cuts_the_rest() -> None:
    pytest.importorskip("rouge_score")
    # LCS "the cat sat" = 3 of 3 predicted and 3 of 6 reference tokens: F = 2 * 1 * 0.5 / 1.5 = 2/3
    assert rouge_l("the cat sat", ["dogs bark", "the cat sat on a mat"]) == pytest.approx(2 / 3)
    assert rouge_l("anything", []) == 0.0
    assert first_line("\n  Paris.  \nQuestion: next") == "Paris." and first_line(" \n ") == ""


def test_every_generation_metric_takes_a_prediction_and_golds() -> None:
    pytest.importorskip("rouge_score")
    for name, metric in GENERATION_METRICS.items():
        assert metric("Paris", ["Paris"]) == 1.0, name


def test_mean_interval_is_lm_evals_mean_and_stderr() -> None:
    from lm_eval.api.metrics import mean, mean_stderr

    values = [1.0, 0.0, 1.0, 1.0, 0.0, 0.5]
    got = mean_interval(values)
    assert got["mean"] == mean(values) and got["stderr"] == pytest.approx(mean_stderr(values), rel=1e-12)
    assert got["low"] == pytest.approx(got["mean"] - 1.959964 * got["stderr"]) and got["n"] == 6
    assert mean_interval([0.25]) == {"mean": 0.25, "stderr": None, "low": None, "high": None, "n": 1}
    with pytest.raises(ValueError, match="no values"):
        mean_interval([])


def test_accuracies_get_the_wilson_interval() -> None:
    # 8 of 10: p = 0.8, z^2 = 3.8415; centre (0.8 + 0.19207) / 1.38415 = 0.71674, half-width
    # 1.959964 * sqrt(0.016 + 0.0096037) / 1.38415 = 0.22657 -> [0.49016, 0.94331]
    low, high = wilson_interval(8, 10)
    assert (low, high) == (pytest.approx(0.49016, abs=1e-5), pytest.approx(0.94331, abs=1e-5))
    assert mean_interval([1.0] * 8 + [0.0] * 2)["low"] == low
    assert wilson_interval(0, 5)[0] == 0.0 and wilson_interval(5, 5)[1] == 1.0  # never outside [0, 1]
    assert mean_interval([1.0])["high"] == 1.0
