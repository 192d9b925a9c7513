"""Device-to-device graphs: who exchanges predictions with whom in a serverless round.

A graph is a plain dict from device id to the sorted tuple of its neighbours;
edges are undirected, so ``j in graph[k]`` exactly when ``k in graph[j]``.
Every builder is a pure function of its arguments: the same seed and round
give the same graph in any process.

The kinds a gossip strategy uses each round (:func:`round_graph`):

- ``ring``: each device linked to the next in id order, the last to the first,
  over the whole population and fixed; a device whose ring neighbour is
  offline has one partner fewer this round;
- ``k_regular``: a random ``degree``-regular graph (Steger & Wormald's
  pairing) over the devices online now, drawn afresh each round from
  (seed, round);
- ``geometric``: devices within ``radio_range`` of each other, at positions in
  the unit square hashed from (seed, device id), so fixed; only online
  devices talk;
- ``time_varying``: a ring in id order over the devices online now, re-formed
  each round, so neighbours change with availability.
"""
from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np
from scipy.spatial import cKDTree

from fedkd.seeding import hashed_uniform, rng_for

Graph = dict[int, tuple[int, ...]]
KINDS = ("ring", "k_regular", "geometric", "time_varying")


def from_edges(devices: Iterable[int], edges: Iterable[tuple[int, int]]) -> Graph:
    """The graph on ``devices`` with ``edges`` (either order; self-loops and repeats ignored)."""
    neighbours: dict[int, set[int]] = {int(d): set() for d in devices}
    for a, b in edges:
        if a != b:
            neighbours[int(a)].add(int(b))
            neighbours[int(b)].add(int(a))
    return {d: tuple(sorted(n)) for d, n in sorted(neighbours.items())}


def edges(graph: Graph) -> list[tuple[int, int]]:
    """Each undirected edge once, as (smaller id, larger id), sorted."""
    return sorted((a, b) for a, ns in graph.items() for b in ns if a < b)


def restrict(graph: Graph, keep: Iterable[int]) -> Graph:
    """The subgraph induced by the devices in ``keep`` (those of ``graph``)."""
    kept = {int(d) for d in keep} & set(graph)
    return {d: tuple(n for n in graph[d] if n in kept) for d in sorted(kept)}


def ring(devices: Sequence[int]) -> Graph:
    """Each device linked to the next one in the given order, and the last to the first.

    Two devices make one edge; one device has no neighbour."""
    ids = [int(d) for d in devices]
    return from_edges(ids, zip(ids, ids[1:] + ids[:1]) if len(ids) > 1 else [])


def k_regular(devices: Sequence[int], degree: int, rng: np.random.Generator) -> Graph:
    """A random ``degree``-regular simple graph on ``devices``.

    Steger & Wormald's pairing ("Generating random regular graphs quickly",
    1999): join random pairs of free edge ends ("stubs") of different devices
    not yet linked, starting over if stuck. With fewer devices than
    ``degree + 1`` every device links to all others; when ``len(devices) *
    degree`` is odd one device is left one edge short.
    """
    if degree < 0:
        raise ValueError(f"degree must be 0 or more, got {degree}")
    ids = sorted(int(d) for d in devices)
    n = len(ids)
    if degree >= n - 1:
        return from_edges(ids, [(a, b) for i, a in enumerate(ids) for b in ids[i + 1:]])
    for _ in range(1000):
        stubs = np.repeat(np.arange(n), degree)
        if len(stubs) % 2:
            stubs = np.delete(stubs, rng.integers(len(stubs)))
        found = _pair_stubs(stubs, rng)
        if found is not None:
            return from_edges(ids, [(ids[a], ids[b]) for a, b in found])
    raise RuntimeError(f"no {degree}-regular graph found on {n} devices")  # pragma: no cover


def _pair_stubs(stubs: np.ndarray, rng: np.random.Generator) -> set[tuple[int, int]] | None:
    found: set[tuple[int, int]] = set()
    stubs = list(stubs)
    while stubs:
        rng.shuffle(stubs)
        left = []
        for a, b in zip(stubs[::2], stubs[1::2]):
            pair = (min(a, b), max(a, b))
            if a == b or pair in found:
                left += [a, b]
            else:
                found.add(pair)
        if len(left) == len(stubs):
            # Shuffling again only helps if some two free ends could still be joined.
            if not any(a != b and (min(a, b), max(a, b)) not in found
                       for i, a in enumerate(left) for b in left[i + 1:]):
                return None
        stubs = left
    return {(int(a), int(b)) for a, b in found}


def positions(devices: Sequence[int], seed: int) -> np.ndarray:
    """Each device's place in the unit square, (len(devices), 2): a pure function of (seed, id)."""
    ids = np.asarray(devices, dtype=np.int64)
    return np.stack([hashed_uniform(ids, seed, "d2d-position", axis) for axis in ("x", "y")], axis=1)


def geometric(devices: Sequence[int], seed: int, radio_range: float) -> Graph:
    """Devices within ``radio_range`` of each other (Euclidean, in the unit square)."""
    ids = [int(d) for d in devices]
    if not ids:
        return {}
    pairs = cKDTree(positions(ids, seed)).query_pairs(radio_range)  # O(n log n), not all n^2 pairs
    return from_edges(ids, [(ids[i], ids[j]) for i, j in pairs])


def round_graph(kind: str, population: int, online: Sequence[int], *, seed: int, server_round: int,
                degree: int = 4, radio_range: float = 0.3) -> Graph:
    """The graph of one round over the devices ``online`` (see the table above)."""
    online = sorted(int(d) for d in online)
    if kind == "ring":
        # The population's ring restricted to the online devices, without building it whole.
        on = set(online)
        return from_edges(online, [(d, (d + 1) % population) for d in online if (d + 1) % population in on])
    if kind == "k_regular":
        return k_regular(online, degree, rng_for(seed, "d2d-graph", server_round))
    if kind == "geometric":
        return geometric(online, seed, radio_range)
    if kind == "time_varying":
        return ring(online)
    raise ValueError(f"unknown topology {kind!r}; expected one of {', '.join(KINDS)}")
