"""Device-to-device graphs (gossip_kd's topology), checked by hand."""
from __future__ import annotations

import math

import numpy as np
import pytest

from fedkd.strategies.gossip_kd.topology import edges, from_edges, geometric, k_regular, positions, restrict, ring, round_graph


def is_simple_and_symmetric(graph) -> bool:
    return all(d not in ns and all(d in graph[n] for n in ns) for d, ns in graph.items())


def test_ring_links_each_device_to_the_next_and_the_last_to_the_first():
    # Prepare / Execute
    graph = ring([0, 1, 2, 3, 4])
    # Assert: 0-1, 1-2, 2-3, 3-4, 4-0.
    assert graph == {0: (1, 4), 1: (0, 2), 2: (1, 3), 3: (2, 4), 4: (0, 3)}
    assert edges(graph) == [(0, 1), (0, 4), (1, 2), (2, 3), (3, 4)]


def test_small_rings():
    assert ring([7]) == {7: ()}
    assert ring([3, 5]) == {3: (5,), 5: (3,)}
    assert ring([]) == {}


def test_static_ring_loses_the_edges_of_an_offline_device_a_time_varying_one_closes_the_gap():
    # Prepare: a ring of 6 devices; device 3 is offline.
    online = [0, 1, 2, 4, 5]
    # Execute
    static = round_graph("ring", 6, online, seed=0, server_round=1)
    varying = round_graph("time_varying", 6, online, seed=0, server_round=1)
    # Assert: 2 and 4 have lost their partner 3; the time-varying ring joins them.
    assert static == {0: (1, 5), 1: (0, 2), 2: (1,), 4: (5,), 5: (0, 4)}
    assert varying == {0: (1, 5), 1: (0, 2), 2: (1, 4), 4: (2, 5), 5: (0, 4)}


def test_k_regular_gives_every_device_k_partners_and_is_seeded_per_round():
    # Prepare / Execute: 20 devices of degree 4 -> 20 * 4 / 2 = 40 edges.
    one = round_graph("k_regular", 100, range(20), seed=0, server_round=1, degree=4)
    again = round_graph("k_regular", 100, range(20), seed=0, server_round=1, degree=4)
    other = round_graph("k_regular", 100, range(20), seed=0, server_round=2, degree=4)
    # Assert
    assert {len(ns) for ns in one.values()} == {4}
    assert len(edges(one)) == 40 and is_simple_and_symmetric(one)
    assert one == again and one != other


def test_k_regular_with_an_odd_number_of_edge_ends_leaves_one_device_short():
    # 7 devices of degree 3 have 21 edge ends: 10 edges, one device with 2.
    graph = k_regular(range(7), 3, np.random.default_rng(0))
    assert sorted(len(ns) for ns in graph.values()) == [2, 3, 3, 3, 3, 3, 3]
    assert is_simple_and_symmetric(graph)


def test_k_regular_on_too_few_devices_is_complete():
    assert k_regular([4, 9, 2], 5, np.random.default_rng(0)) == {2: (4, 9), 4: (2, 9), 9: (2, 4)}


def test_geometric_links_exactly_the_devices_within_radio_range():
    # Prepare
    ids = list(range(30))
    xy = positions(ids, seed=5)
    # Execute
    graph = geometric(ids, seed=5, radio_range=0.25)
    # Assert: against the distances themselves.
    expected = {(a, b) for a in ids for b in ids if a < b and math.dist(xy[a], xy[b]) <= 0.25}
    assert set(edges(graph)) == expected and expected


def test_geometric_extremes_and_positions_are_a_function_of_seed_and_device():
    ids = list(range(5))
    assert len(edges(geometric(ids, seed=1, radio_range=math.sqrt(2)))) == 10  # the square's diagonal
    assert edges(geometric(ids, seed=1, radio_range=1e-9)) == []
    assert np.array_equal(positions([3], seed=1), positions([0, 1, 2, 3], seed=1)[3:])
    assert ((positions(ids, 1) >= 0) & (positions(ids, 1) < 1)).all()


def test_restrict_and_from_edges():
    graph = from_edges([0, 1, 2], [(0, 1), (1, 0), (2, 2), (1, 2)])  # a repeat and a self-loop are ignored
    assert graph == {0: (1,), 1: (0, 2), 2: (1,)}
    assert restrict(graph, [0, 2, 9]) == {0: (), 2: ()}


def test_unknown_topology_is_refused():
    with pytest.raises(ValueError, match="unknown topology 'star'"):
        round_graph("star", 3, [0, 1, 2], seed=0, server_round=1)
