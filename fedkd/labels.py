"""The labelled public samples a run's strategies may read, one set for all.

Strategies that need labels on the server (a validation set for early
stopping, a warm start, a check of teachers) take them from one seeded order
of the public split: a strategy that reads ``n`` labels reads the first ``n``
of that order, so two strategies with the same budget read the same samples
and a smaller budget reads a subset of a larger one. What each strategy read
is reported in ``summary.json`` (``labelled_public``), so label budgets can be
compared run by run.
"""
from __future__ import annotations

import numpy as np

from .seeding import rng_for


def labelled_order(seed: int, public_size: int) -> np.ndarray:
    """The public split's indices in the order labels are handed out (seeded, no test data)."""
    return rng_for(seed, "labelled-public").permutation(public_size)


def labelled_public(seed: int, public_size: int, count: int) -> np.ndarray:
    """The ``count`` labelled public samples of a run with ``seed``, sorted; at most the whole split."""
    if count < 0:
        raise ValueError(f"a label budget must be 0 or more, got {count}")
    return np.sort(labelled_order(seed, public_size)[:min(count, public_size)])


def unlabelled_public(seed: int, public_size: int, count: int) -> np.ndarray:
    """The public samples outside :func:`labelled_public` (what devices may be asked about), sorted."""
    return np.sort(labelled_order(seed, public_size)[min(count, public_size):])
