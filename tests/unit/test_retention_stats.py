"""The knowledge-retention experiment's paired statistics (experiments/knowledge_retention/scoring.py)."""

import importlib
import math
import sys
from pathlib import Path

import pytest

EXPERIMENTS = Path(__file__).resolve().parents[2] / "experiments"


def _scoring():
    """scoring.py imports its siblings and the forgetting experiment's task table by bare name."""
    dirs = [str(EXPERIMENTS / "knowledge_retention"), str(EXPERIMENTS / "forgetting")]
    sys.path[:0] = dirs
    try:
        return importlib.import_module("scoring")
    finally:
        for d in dirs:
            sys.path.remove(d)


def test_difference_of_identical_runs_is_exactly_zero():
    s = _scoring()
    col = [1.0, 0.0, 0.0, 1.0, 1.0, 0.0, 0.0, 0.0]
    r = s.paired_bootstrap(lambda a, b: a - b, [col, col], draws=200)
    assert (r["value"], r["lo"], r["hi"]) == (0.0, 0.0, 0.0)


def test_pairing_removes_the_items_difficulty_from_the_interval():
    # b wins on every item where a wins and on ten more: paired, the difference is never below zero
    s = _scoring()
    a = [1.0] * 50 + [0.0] * 250
    b = [1.0] * 60 + [0.0] * 240
    r = s.paired_bootstrap(lambda x, y: y - x, [a, b], draws=500)
    assert r["value"] == pytest.approx(10 / 300)
    assert 0.0 < r["lo"] < r["value"] < r["hi"]


def test_ratio_point_value_and_interval():
    s = _scoring()
    num = [1.0] * 30 + [0.0] * 70
    den = [1.0] * 40 + [0.0] * 60
    r = s.paired_ratio(num, den, draws=500)
    assert r["ratio"] == pytest.approx(0.75)
    assert r["lo"] < 0.75 < r["hi"] <= 1.0  # num's hits are a subset of den's: a resample never exceeds 1


def test_ratio_without_a_denominator_has_no_interval():
    s = _scoring()
    r = s.paired_ratio([0.0, 1.0], [0.0, 0.0], draws=50)
    assert math.isnan(r["lo"]) and math.isnan(r["hi"])


def test_runs_on_different_items_are_refused():
    s = _scoring()
    with pytest.raises(ValueError, match="differ in number"):
        s.paired_bootstrap(lambda a, b: a - b, [[1.0, 0.0], [1.0]])
