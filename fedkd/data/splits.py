"""Train / test / public splits shared by the dataset loaders.

Stratified, seeded per stratum, and returned sorted, so a split is a function
of the data and the seed only, never of the order strata are visited in.
"""
from __future__ import annotations

import numpy as np

from fedkd.data.base import SPLIT_NAMES, SplitName
from fedkd.errors import FedkdError
from fedkd.seeding import rng_for


def check_fractions(test_fraction: float, public_fraction: float) -> None:
    """Reject split fractions that would leave no training data."""
    if not (0 < test_fraction < 1 and 0 < public_fraction < 1 and test_fraction + public_fraction < 1):
        raise FedkdError(
            f"test_fraction={test_fraction}, public_fraction={public_fraction}: "
            "expected each in (0, 1) and their sum below 1"
        )


def _stratum_sizes(n: int, test_fraction: float, public_fraction: float) -> tuple[int, int]:
    """(n_test, n_public) for one stratum of ``n`` samples.

    Strata of 3 or more give every split at least one sample, so small strata
    (a rare camera, a tiny fixture) still appear in test and public; train
    always keeps at least one.
    """
    n_test = int(round(n * test_fraction))
    n_public = int(round(n * public_fraction))
    if n >= 3:
        n_test, n_public = max(n_test, 1), max(n_public, 1)
    while n_test + n_public > max(n - 1, 0):
        if n_test >= n_public:
            n_test -= 1
        else:
            n_public -= 1
    return n_test, n_public


def stratified_split_indices(
    strata: np.ndarray,
    test_fraction: float,
    public_fraction: float,
    *rng_parts: object,
) -> dict[SplitName, np.ndarray]:
    """Disjoint train / test / public index arrays, stratified by ``strata``.

    Each stratum is shuffled with its own ``rng_for(*rng_parts, "split",
    stratum)``, so one stratum's draw does not depend on how many others
    exist. Indices within each split come back sorted, so a split's order is
    a function of its membership only.
    """
    check_fractions(test_fraction, public_fraction)
    strata = np.asarray(strata)
    parts: dict[SplitName, list[np.ndarray]] = {s: [] for s in SPLIT_NAMES}
    for stratum in np.unique(strata):
        members = np.flatnonzero(strata == stratum)
        members = rng_for(*rng_parts, "split", stratum.item()).permutation(members)
        n_test, n_public = _stratum_sizes(len(members), test_fraction, public_fraction)
        parts["test"].append(members[:n_test])
        parts["public"].append(members[n_test : n_test + n_public])
        parts["train"].append(members[n_test + n_public :])
    return {s: np.sort(np.concatenate(parts[s])).astype(np.int64) for s in SPLIT_NAMES}
