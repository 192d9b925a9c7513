"""fedkd.stats: every expected number below is worked out by hand in the comments.

t quantiles used (two-sided 95 %, from a t table): t(0.975, 1) = 12.706205,
t(0.975, 2) = 4.302653.
"""
from __future__ import annotations

import math

import numpy as np
import pytest

from fedkd.stats import paired_difference, parse_seeds, ratio, summarize_values, t_halfwidth


def test_summary_of_one_two_three():
    # mean = 6 / 3 = 2; deviations -1, 0, 1: sample variance (1 + 0 + 1) / (3 - 1) = 1, std = 1.
    # ci95 = 2 -/+ t(0.975, 2) * 1 / sqrt(3) = 2 -/+ 4.302653 * 0.577350 = 2 -/+ 2.484138
    #      = [-0.484138, 4.484138].
    s = summarize_values([1, 2, 3])

    assert s["mean"] == 2 and s["std"] == pytest.approx(1) and s["n"] == 3
    assert s["ci95"] == pytest.approx([-0.484138, 4.484138], abs=1e-6)


def test_summary_of_two_values_uses_one_degree_of_freedom():
    # [10, 20]: mean 15; sample variance ((-5)^2 + 5^2) / 1 = 50, std = 7.071068;
    # half-width = 12.706205 * 7.071068 / sqrt(2) = 12.706205 * 5 = 63.531024.
    s = summarize_values([10.0, 20.0])

    assert s["std"] == pytest.approx(7.071068, abs=1e-6)
    assert s["ci95"] == pytest.approx([15 - 63.531024, 15 + 63.531024], abs=1e-5)


def test_missing_values_are_left_out_and_one_value_has_no_spread():
    # None (a seed that never reached the target) and NaN are not values: [4] remains.
    assert summarize_values([None, 4.0, math.nan]) == {"mean": 4.0, "std": None, "ci95": None, "n": 1}
    assert summarize_values([]) == {"mean": None, "std": None, "ci95": None, "n": 0}


def test_equal_values_have_a_zero_width_interval():
    assert summarize_values([5, 5]) == {"mean": 5.0, "std": 0.0, "ci95": [5.0, 5.0], "n": 2}


def test_paired_difference_by_hand():
    # a = [3, 5, 4], b = [1, 2, 2]: differences d = [2, 3, 2], mean 7/3 = 2.333333.
    # Deviations -1/3, 2/3, -1/3: variance (1/9 + 4/9 + 1/9) / 2 = 1/3, sd = 0.577350,
    # standard error sd / sqrt(3) = 1/3.
    # ci95 = 7/3 -/+ 4.302653 / 3 = 2.333333 -/+ 1.434218 = [0.899116, 3.767551].
    # t = (7/3) / (1/3) = 7 with 2 degrees of freedom, whose CDF is 1/2 + t / (2 sqrt(t^2 + 2)):
    # p = 2 * (1 - CDF(7)) = 1 - 7 / sqrt(51) = 1 - 0.980196 = 0.019804.
    d = paired_difference([3, 5, 4], [1, 2, 2])

    assert d["mean"] == pytest.approx(2.333333, abs=1e-6) and d["n"] == 3
    assert d["ci95"] == pytest.approx([0.899116, 3.767551], abs=1e-6)
    assert d["p_value"] == pytest.approx(0.019804, abs=1e-6)


def test_paired_difference_with_two_pairs_of_opposite_sign():
    # d = [0.8 - 0.5, 0.6 - 0.7] = [0.3, -0.1]: mean 0.1, sd = sqrt((0.2^2 + 0.2^2) / 1) = 0.282843,
    # se = 0.2, t = 0.5 with 1 degree of freedom (Cauchy): p = 1 - (2 / pi) * atan(0.5)
    # = 1 - 0.636620 * 0.463648 = 0.704833; ci95 = 0.1 -/+ 12.706205 * 0.2 = [-2.441241, 2.641241].
    d = paired_difference([0.8, 0.6], [0.5, 0.7])

    assert d["mean"] == pytest.approx(0.1)
    assert d["p_value"] == pytest.approx(0.704833, abs=1e-6)
    assert d["ci95"] == pytest.approx([-2.441241, 2.641241], abs=1e-6)


def test_pairs_with_a_missing_side_are_dropped():
    # Only the first pair has both sides: difference 1, no spread, no test.
    assert paired_difference([1, None, 3], [0, 2, None]) == {"mean": 1.0, "ci95": None, "p_value": None, "n": 1}
    assert paired_difference([None], [1.0])["n"] == 0


def test_identical_differences_have_no_p_value():
    # d = [1, 1]: the t statistic divides by a zero spread; the interval is the point 1.
    assert paired_difference([2, 3], [1, 2]) == {"mean": 1.0, "ci95": [1.0, 1.0], "p_value": None, "n": 2}


def test_paired_values_must_pair_up():
    with pytest.raises(ValueError, match="equal lengths"):
        paired_difference([1, 2], [1])


def test_ratio_and_halfwidth():
    assert ratio(15, 10) == 1.5 and ratio(None, 1) is None and ratio(1, 0) is None
    # std 1 over 3 values: 4.302653 / sqrt(3) = 2.484138; one value: no interval.
    assert t_halfwidth(np.array([1.0, 1.0]), np.array([3, 1])) == pytest.approx([2.484138, np.nan], abs=1e-6,
                                                                               nan_ok=True)


@pytest.mark.parametrize("text, seeds", [
    ("4", [4]), ("0-4", [0, 1, 2, 3, 4]), ("0,2,7", [0, 2, 7]), ("0-2,7", [0, 1, 2, 7]),
    ("7,0", [7, 0]), (" 1 , 3-3 ", [1, 3]),
])
def test_seeds_syntax(text, seeds):
    assert parse_seeds(text) == seeds


@pytest.mark.parametrize("text, message", [
    ("0-", "expected seeds such as"), ("b", "expected seeds such as"), ("", "expected seeds such as"),
    ("-1", "expected seeds such as"), ("1.5", "expected seeds such as"), ("1,,2", "expected seeds such as"),
    ("\u0663", "expected seeds such as"),  # an Arabic-Indic 3: int() would take it, the syntax does not
    ("3-1", "expected a range A-B with A <= B; got 3-1"),
    ("1,1", "expected each seed once; 1 is given twice"),
    ("0-2,2", "expected each seed once; 2 is given twice"),
    ("0-99999999", "expected at most 10,000 seeds"),
])
def test_malformed_seeds_say_what_was_expected(text, message):
    with pytest.raises(ValueError, match="^expected") as caught:
        parse_seeds(text)
    assert message in str(caught.value)
