"""Seeds derived from (seed, what, round, device, ...) so that results never
depend on call order, thread scheduling or Python's hash randomisation."""
from __future__ import annotations

import hashlib

import numpy as np


def derive_seed(*parts: object) -> int:
    """A 63-bit seed that depends only on ``parts`` (their ``str``), stable across runs."""
    digest = hashlib.blake2b("\x1f".join(map(str, parts)).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


def rng_for(*parts: object) -> np.random.Generator:
    """A numpy Generator seeded from ``parts``; see :func:`derive_seed`."""
    return np.random.default_rng(derive_seed(*parts))


_GOLDEN = np.uint64(0x9E3779B97F4A7C15)


def _splitmix64(x: np.ndarray) -> np.ndarray:
    # splitmix64's finaliser: a bijective mixer, so every device id gets its own stream.
    x = x.astype(np.uint64, copy=True)
    with np.errstate(over="ignore"):
        x += _GOLDEN
        x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        x = x ^ (x >> np.uint64(31))
    return x


def hashed_uniform(ids: np.ndarray, *parts: object) -> np.ndarray:
    """One uniform [0, 1) number per id, a pure function of (parts, id).

    Vectorised and stateless: a population of a million devices gets its
    per-device draws without a per-device generator or a per-device object.
    """
    key = np.uint64(derive_seed(*parts))
    mixed = _splitmix64(np.asarray(ids, dtype=np.uint64) ^ key)
    return (mixed >> np.uint64(11)).astype(np.float64) * (1.0 / (1 << 53))
