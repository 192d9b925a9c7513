"""Partitioners: label skew, quantity skew, domains, disjointness, modality mix, laziness."""
from __future__ import annotations

import re
import tracemalloc

import numpy as np
import pytest

from fedkd.data.partition import ModalityMix, Partitioner
from fedkd.errors import FedkdError, ScenarioError
from fedkd.context import SimulationContext
from fedkd.scenario import PartitionSpec, parse_scenario
from fedkd.checks import load_scenario

NUM_CLASSES = 10
# 100 samples of each of 10 classes; domain = sample index mod 4 (four cameras).
LABELS = np.repeat(np.arange(NUM_CLASSES), 100)
DOMAINS = np.arange(len(LABELS)) % 4


def partitioner(seed: int = 0, num_devices: int | None = None, **spec) -> Partitioner:
    return Partitioner(PartitionSpec(**spec), LABELS, DOMAINS, NUM_CLASSES, seed, num_devices)


def classes_held(p: Partitioner, devices: int) -> np.ndarray:
    return np.array([len(np.unique(LABELS[p.shard(i).indices])) for i in range(devices)])


# ---- label skew -----------------------------------------------------------------------

@pytest.mark.parametrize("disjoint", [False, True], ids=["lazy", "disjoint"])
def test_small_alpha_gives_fewer_classes_per_device(disjoint: bool):
    # Prepare: 40 devices of 20 samples (800 of the 1,000 samples, so disjoint dealing never runs dry).
    common = dict(samples_per_device=20, quantity_sigma=0.0, disjoint=disjoint, num_devices=40)
    # Execute
    skewed = classes_held(partitioner(label_alpha=0.1, **common), 40)
    even = classes_held(partitioner(label_alpha=100.0, **common), 40)
    # Assert: Dir(0.1) puts nearly all mass on one or two classes; Dir(100) spreads 20 draws over
    # about 10 * (1 - 0.9**20) = 8.8 classes.
    assert skewed.mean() < 3.5
    assert even.mean() > 8.0


def test_small_alpha_is_further_from_uniform_in_kl():
    # Prepare
    def mean_kl_to_uniform(alpha: float) -> float:
        p = partitioner(label_alpha=alpha, samples_per_device=200, quantity_sigma=0.0, min_samples=1)
        kls = []
        for i in range(100):
            q = np.bincount(LABELS[p.shard(i).indices], minlength=NUM_CLASSES) / 200
            kls.append(np.sum(q[q > 0] * np.log(q[q > 0] * NUM_CLASSES)))
        return float(np.mean(kls))

    # Execute / Assert: log(10) = 2.30 is the KL of a one-class shard, 0 that of a perfectly even one;
    # sampling 200 labels alone leaves about (10 - 1) / (2 * 200) = 0.02.
    assert mean_kl_to_uniform(0.1) > 1.0 > 0.1 > mean_kl_to_uniform(100.0)


def test_null_alpha_is_iid():
    # Prepare
    p = partitioner(label_alpha=None, samples_per_device=100, quantity_sigma=0.0)
    # Execute: pooled label counts of 100 devices x 100 samples.
    pooled = np.bincount(np.concatenate([LABELS[p.shard(i).indices] for i in range(100)]), minlength=10)
    # Assert: each class expects 1,000 (binomial sd 30); allow 5 sd.
    assert np.all(np.abs(pooled - 1000) < 150)


# ---- quantity skew --------------------------------------------------------------------

def test_zero_sigma_gives_equal_shards_and_sigma_spreads_them_log_normally():
    # Prepare
    equal = partitioner(samples_per_device=50, quantity_sigma=0.0)
    spread = partitioner(samples_per_device=50, quantity_sigma=1.0, min_samples=1)
    # Execute
    equal_sizes = [len(equal.shard(i).indices) for i in range(200)]
    log_sizes = np.log([len(spread.shard(i).indices) for i in range(200)])
    # Assert: log size ~ N(log 50 = 3.91, 1); with 200 devices the sample sd lies well within 0.8..1.2.
    assert set(equal_sizes) == {50}
    assert 0.8 < log_sizes.std() < 1.2
    assert abs(np.median(log_sizes) - np.log(50)) < 0.3


def test_min_samples_is_a_floor():
    # Prepare
    p = partitioner(samples_per_device=10, quantity_sigma=2.0, min_samples=8)
    # Execute / Assert
    assert min(len(p.shard(i).indices) for i in range(300)) == 8


# ---- domains --------------------------------------------------------------------------

@pytest.mark.parametrize("disjoint", [False, True], ids=["lazy", "disjoint"])
def test_by_domain_gives_each_device_one_domain_and_uses_them_all(disjoint: bool):
    # Prepare
    p = partitioner(by_domain=True, disjoint=disjoint, num_devices=40, samples_per_device=20)
    # Execute
    shards = [p.shard(i) for i in range(40)]
    # Assert
    for shard in shards:
        assert set(DOMAINS[shard.indices]) == {shard.domain}
    assert {s.domain for s in shards} == {0, 1, 2, 3}


def test_without_by_domain_a_device_has_no_domain_and_mixes_them():
    # Prepare / Execute
    shard = partitioner(samples_per_device=100, label_alpha=None).shard(7)
    # Assert
    assert shard.domain is None and len(set(DOMAINS[shard.indices])) == 4


def test_disjoint_by_domain_spreads_devices_in_proportion_to_domain_size():
    # Prepare: domain 0 holds 700 samples, domain 1 holds 300.
    domains = (np.arange(1000) >= 700).astype(np.int64)
    p = Partitioner(PartitionSpec(by_domain=True, disjoint=True), LABELS, domains, NUM_CLASSES, 0, 10)
    # Execute
    per_domain = np.bincount([p.shard(i).domain for i in range(10)])
    # Assert: 10 devices x 0.7 / 0.3
    assert per_domain.tolist() == [7, 3]


# ---- disjointness ---------------------------------------------------------------------

def test_disjoint_shards_never_overlap():
    # Prepare: targets of 64 per device far exceed 1,000 / 50 = 20, so sizes shrink to fit.
    p = partitioner(disjoint=True, num_devices=50, samples_per_device=64, min_samples=8)
    # Execute
    shards = [p.shard(i).indices for i in range(50)]
    flat = np.concatenate(shards)
    # Assert
    assert len(flat) == len(np.unique(flat)) <= len(LABELS)
    assert min(len(s) for s in shards) >= 8
    assert all(np.all(np.diff(s) > 0) for s in shards)  # sorted, no repeats


def test_disjoint_uses_the_requested_sizes_when_they_fit():
    # Prepare: 10 devices x 50 = 500 of 1,000 samples.
    p = partitioner(disjoint=True, num_devices=10, samples_per_device=50, quantity_sigma=0.0)
    # Execute / Assert
    assert [len(p.shard(i).indices) for i in range(10)] == [50] * 10


def test_lazy_shards_may_overlap_which_is_why_disjoint_exists():
    # Prepare: 100 devices x 50 samples from 1,000: independent draws must collide.
    p = partitioner(samples_per_device=50, quantity_sigma=0.0)
    # Execute
    flat = np.concatenate([p.shard(i).indices for i in range(100)])
    # Assert
    assert len(np.unique(flat)) < len(flat)


def test_disjoint_too_many_devices_is_an_error_with_the_numbers():
    # Prepare / Execute / Assert: 200 x 8 = 1,600 > 1,000
    with pytest.raises(FedkdError, match=r"200 x 8 = 1,600 > 1,000"):
        partitioner(disjoint=True, num_devices=200, min_samples=8)


def test_disjoint_too_many_devices_fails_at_load_naming_the_key(write_scenario, tiny_scenario):
    # Prepare: av_digits has 1,800 train samples; 300 devices x 8 = 2,400.
    tiny_scenario["population"]["devices"] = 300
    tiny_scenario["data"]["partition"].update(disjoint=True, min_samples=8)
    # Execute / Assert
    with pytest.raises(ScenarioError, match=r"data\.partition\.disjoint: .*300 x 8 = 2,400 > 1,800"):
        load_scenario(write_scenario(tiny_scenario))


# ---- determinism ----------------------------------------------------------------------

@pytest.mark.parametrize("disjoint", [False, True], ids=["lazy", "disjoint"])
def test_same_seed_same_shards_other_seed_other_shards(disjoint: bool):
    # Prepare
    spec = dict(disjoint=disjoint, num_devices=30, samples_per_device=20, by_domain=True)
    a, b, c = partitioner(seed=1, **spec), partitioner(seed=1, **spec), partitioner(seed=2, **spec)
    # Execute / Assert
    for i in range(30):
        assert np.array_equal(a.shard(i).indices, b.shard(i).indices) and a.shard(i).domain == b.shard(i).domain
    assert any(not np.array_equal(a.shard(i).indices, c.shard(i).indices) for i in range(30))


def test_a_shard_does_not_depend_on_which_devices_were_asked_first():
    # Prepare
    first, second = partitioner(), partitioner()
    # Execute
    for i in range(20):
        first.shard(i)
    # Assert
    assert np.array_equal(first.shard(20).indices, second.shard(20).indices)


def test_device_ids_outside_the_population_are_refused():
    with pytest.raises(IndexError):
        partitioner(num_devices=10).shard(10)


# ---- laziness -------------------------------------------------------------------------

def test_a_million_devices_cost_no_per_device_structure():
    # Prepare
    spec = PartitionSpec(by_domain=True, modality_mix={"camera": 0.6, "sensor": 0.3, "camera+sensor": 0.1})
    tracemalloc.start()
    try:
        # Execute
        p = Partitioner(spec, LABELS, DOMAINS, NUM_CLASSES, 0, num_devices=1_000_000)
        last = p.shard(999_999)
        _, peak_bytes = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    # Assert: one byte per device would already be 1 MB; the pools for 1,000 samples are ~10 kB.
    assert peak_bytes < 500_000
    again = Partitioner(spec, LABELS, DOMAINS, NUM_CLASSES, 0, num_devices=1_000_000).shard(999_999)
    assert np.array_equal(last.indices, again.indices)
    assert (last.domain, last.modalities) == (again.domain, again.modalities)


# ---- modality availability ------------------------------------------------------------

def test_modality_mix_shares_and_determinism():
    # Prepare
    mix = ModalityMix({"camera": 0.6, "sensor": 0.3, "camera+sensor": 0.1}, seed=0)
    # Execute
    share = np.bincount(mix.index(np.arange(20_000)), minlength=3) / 20_000
    # Assert: binomial sd at 20,000 devices is at most 0.0035; allow 0.015.
    assert np.allclose(share, [0.6, 0.3, 0.1], atol=0.015)
    assert mix.of(12345) == ModalityMix({"camera": 0.6, "sensor": 0.3, "camera+sensor": 0.1}, 0).of(12345)
    assert mix.sets[2] == ("camera", "sensor")
    other = ModalityMix({"camera": 0.6, "sensor": 0.3, "camera+sensor": 0.1}, seed=1)
    assert not np.array_equal(mix.index(np.arange(100)), other.index(np.arange(100)))


def test_no_mix_means_the_partitioner_leaves_modalities_alone():
    assert partitioner().shard(3).modalities is None


def test_class_modalities_take_precedence_and_devices_hold_only_their_modalities(tiny_scenario):
    # Prepare: phones fix [audio]; cameras leave modalities open and take the mix (all image-only here).
    tiny_scenario["population"]["classes"][1].pop("modalities")
    tiny_scenario["data"]["partition"]["modality_mix"] = {"image": 1.0}
    tiny_scenario["population"]["devices"] = 40
    ctx = SimulationContext(parse_scenario(tiny_scenario))
    # Execute
    devices = [ctx.device(i) for i in range(40)]
    # Assert
    for d in devices:
        expected = ("audio",) if d.device_class == "phone" else ("image",)
        assert d.modalities == expected
        assert set(d.data.inputs) == set(expected)
    assert {d.device_class for d in devices} == {"phone", "camera"}


def test_mix_gives_every_set_to_open_devices(tiny_scenario):
    # Prepare
    for c in tiny_scenario["population"]["classes"]:
        c.pop("modalities")
    tiny_scenario["data"]["partition"]["modality_mix"] = {"audio": 0.5, "image+audio": 0.5}
    ctx = SimulationContext(parse_scenario(tiny_scenario))
    # Execute
    seen = {ctx.modalities_of(i) for i in range(12)}
    # Assert: in dataset order, whatever order the key names them in
    assert seen == {("audio",), ("audio", "image")}


# ---- validation -----------------------------------------------------------------------

@pytest.mark.parametrize("mix, key, message", [
    ({"audio": 0.5, "image": 0.4}, "data.partition.modality_mix", "sum to 1"),
    ({"audio+image": 0.5, "image+audio": 0.5}, "data.partition.modality_mix", "same modality set"),
    ({"audio+": 1.0}, "data.partition.modality_mix", "joined by '+'"),
    ({"audio": 0.5, "lidar": 0.5}, "data.partition.modality_mix.lidar", "unknown modality 'lidar'"),
])
def test_bad_modality_mix_names_the_key(write_scenario, tiny_scenario, mix, key, message):
    # Prepare
    tiny_scenario["population"]["classes"][1].pop("modalities")
    tiny_scenario["data"]["partition"]["modality_mix"] = mix
    # Execute / Assert
    with pytest.raises(ScenarioError, match=rf"{re.escape(key)}: .*{re.escape(message)}"):
        load_scenario(write_scenario(tiny_scenario))


def test_a_mix_no_device_can_use_is_an_error(write_scenario, tiny_scenario):
    # Prepare: both tiny classes fix their modalities.
    tiny_scenario["data"]["partition"]["modality_mix"] = {"audio": 1.0}
    # Execute / Assert
    with pytest.raises(ScenarioError, match=r"data\.partition\.modality_mix: every device class fixes"):
        load_scenario(write_scenario(tiny_scenario))
