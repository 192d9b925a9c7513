"""Statistics over seeds, and the ``--seeds`` syntax.

Pure functions of numbers (no pandas, no files): what ``summary.json`` and the
plots say about a strategy run with several seeds. Every interval is a
two-sided 95 % Student t interval of the mean; the sample standard deviation
uses ``ddof=1``. With fewer than two values there is no spread to speak of,
so ``std``, ``ci95`` and ``p_value`` are None (null in JSON).
"""
from __future__ import annotations

import math
import re
from collections.abc import Sequence

import numpy as np
from scipy import stats as sps

CONFIDENCE = 0.95
MAX_SEEDS = 10_000  # `--seeds 0-999999999` is a typo, not an experiment; refuse it before it runs


def t_quantile(n: int | np.ndarray) -> float | np.ndarray:
    """t(0.975, n - 1): the half-width of the 95 % interval in standard errors (NaN when n < 2)."""
    dof = np.asarray(n, dtype=float) - 1
    safe = np.where(dof >= 1, dof, np.nan)  # scipy warns on dof 0; NaN says "no interval" as well
    quantile = sps.t.ppf(0.5 + CONFIDENCE / 2, safe)
    return float(quantile) if np.ndim(quantile) == 0 else quantile


def t_halfwidth(std: float | np.ndarray, n: int | np.ndarray) -> float | np.ndarray:
    """Half-width of the 95 % t interval of a mean of ``n`` values whose sample std is ``std``."""
    return t_quantile(n) * np.asarray(std, dtype=float) / np.sqrt(np.asarray(n, dtype=float))


def _present(values: Sequence[float | None]) -> list[float]:
    # None (a seed that never reached the target) and NaN are "no value", not zero.
    return [float(v) for v in values if v is not None and not math.isnan(float(v))]


def summarize_values(values: Sequence[float | None]) -> dict:
    """``{"mean", "std", "ci95", "n"}`` of the values that are not None.

    ``std`` is the sample standard deviation (ddof=1) and ``ci95`` ``[lo, hi]``
    the 95 % t interval of the mean; both None with fewer than two values,
    ``mean`` None with none.
    """
    kept = _present(values)
    n = len(kept)
    if n == 0:
        return {"mean": None, "std": None, "ci95": None, "n": 0}
    mean = float(np.mean(kept))
    if n == 1:
        return {"mean": mean, "std": None, "ci95": None, "n": 1}
    std = float(np.std(kept, ddof=1))
    half = float(t_halfwidth(std, n))
    return {"mean": mean, "std": std, "ci95": [mean - half, mean + half], "n": n}


def paired_difference(a: Sequence[float | None], b: Sequence[float | None]) -> dict:
    """``a - b`` pair by pair: ``{"mean", "ci95", "p_value", "n"}``.

    ``a[i]`` and ``b[i]`` belong to the same seed; a pair where either is None
    is left out. ``p_value`` is the two-sided paired t-test
    (``scipy.stats.ttest_rel``); None with fewer than two pairs or when every
    difference is the same (the test divides by their spread).
    """
    if len(a) != len(b):
        raise ValueError(f"paired values need equal lengths, got {len(a)} and {len(b)}")
    pairs = [(float(x), float(y)) for x, y in zip(a, b)
             if x is not None and y is not None and not math.isnan(float(x)) and not math.isnan(float(y))]
    n = len(pairs)
    if n == 0:
        return {"mean": None, "ci95": None, "p_value": None, "n": 0}
    diffs = np.array([x - y for x, y in pairs])
    mean = float(diffs.mean())
    if n == 1:
        return {"mean": mean, "ci95": None, "p_value": None, "n": 1}
    std = float(diffs.std(ddof=1))
    half = float(t_halfwidth(std, n))
    p_value = None
    if std > 0:
        xs, ys = zip(*pairs)
        p_value = float(sps.ttest_rel(xs, ys).pvalue)
    return {"mean": mean, "ci95": [mean - half, mean + half], "p_value": p_value, "n": n}


def ratio(numerator: float | None, denominator: float | None) -> float | None:
    """``numerator / denominator``; None when either is missing or the denominator is 0."""
    if numerator is None or denominator is None or denominator == 0:
        return None
    return float(numerator) / float(denominator)


SEEDS_SYNTAX = "seeds such as 4, 0-4, 0,2,7 or 0-2,7 (non-negative integers, each once)"


def parse_seeds(text: str) -> list[int]:
    """``"0-2,7"`` -> ``[0, 1, 2, 7]``, in the order given.

    Raises ValueError whose message starts with "expected" for anything else:
    an empty item, a negative or non-integer seed, a range that goes down, a
    seed given twice, more than ``MAX_SEEDS`` seeds.
    """
    seeds: list[int] = []
    for item in text.split(","):
        seeds.extend(_parse_item(item.strip()))
        if len(seeds) > MAX_SEEDS:
            raise ValueError(f"expected at most {MAX_SEEDS:,} seeds")
    seen: set[int] = set()
    for seed in seeds:
        if seed in seen:
            raise ValueError(f"expected each seed once; {seed} is given twice")
        seen.add(seed)
    return seeds


_ITEM = re.compile(r"(?P<first>[0-9]+)(?:-(?P<last>[0-9]+))?")  # ASCII digits only: int() takes others


def _parse_item(item: str) -> range:
    match = _ITEM.fullmatch(item)
    if match is None:
        raise ValueError(f"expected {SEEDS_SYNTAX}; got {item!r}")
    first = int(match["first"])
    last = int(match["last"]) if match["last"] is not None else first
    if last < first:
        raise ValueError(f"expected a range A-B with A <= B; got {item}")
    if last - first >= MAX_SEEDS:
        raise ValueError(f"expected at most {MAX_SEEDS:,} seeds; {item} has {last - first + 1:,}")
    return range(first, last + 1)
