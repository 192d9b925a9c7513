"""Non-IID shards, computed lazily from (seed, device id).

A device's shard is a pure function of the seed, the device id and the train
labels, so a population of a million devices costs nothing until a device is
chosen, and any process (the server, a Ray worker) computes the same shard.

Shards are drawn independently per device, so two devices may share samples
(the population can be far larger than the dataset). Label skew follows the
usual Dirichlet recipe (Hsu et al. 2019, arXiv:1909.06335): each device draws
its class mix from Dir(alpha); small alpha means few classes per device.
Quantity skew draws the shard size from a log-normal around
``samples_per_device``. With ``by_domain`` each device sees one domain only
(a camera sees its own viewpoint).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..scenario import PartitionSpec
from ..seeding import hashed_uniform, rng_for


@dataclass(frozen=True)
class DeviceShard:
    device_id: int
    indices: np.ndarray  # rows of the train split, sorted
    domain: int | None


class Partitioner:
    """Deals the train split out to devices, one device at a time, on demand."""

    def __init__(self, spec: PartitionSpec, labels: np.ndarray, domains: np.ndarray | None,
                 num_classes: int, seed: int):
        self.spec, self.num_classes, self.seed = spec, num_classes, seed
        use_domains = spec.by_domain and domains is not None
        self.num_domains = int(domains.max()) + 1 if use_domains else 1
        dom = domains if use_domains else np.zeros(len(labels), dtype=np.int64)
        # One index pool per (domain, class): O(train size), built once per process.
        order = np.lexsort((np.arange(len(labels)), labels, dom))
        keys = dom[order] * num_classes + labels[order]
        bounds = np.searchsorted(keys, np.arange(self.num_domains * num_classes + 1))
        self._pools = [order[bounds[k]:bounds[k + 1]] for k in range(len(bounds) - 1)]

    def domain_of(self, device_id: int) -> int | None:
        if self.num_domains == 1 and not self.spec.by_domain:
            return None
        u = hashed_uniform(np.array([device_id]), self.seed, "domain")[0]
        return int(u * self.num_domains)

    def shard(self, device_id: int) -> DeviceShard:
        rng = rng_for(self.seed, "shard", device_id)
        spec = self.spec
        size = spec.samples_per_device * np.exp(spec.quantity_sigma * rng.standard_normal())
        size = max(spec.min_samples, int(round(size)))
        domain = self.domain_of(device_id)
        pools = self._pools[(domain or 0) * self.num_classes:((domain or 0) + 1) * self.num_classes]
        available = np.array([len(p) > 0 for p in pools])
        if spec.label_alpha is None:
            mix = available / available.sum()
        else:
            mix = rng.dirichlet(np.full(self.num_classes, spec.label_alpha)) * available
            mix = mix / mix.sum() if mix.sum() > 0 else available / available.sum()
        counts = rng.multinomial(size, mix)
        picked = []
        for pool, count in zip(pools, counts):
            if count:
                # Without replacement where the pool allows, so a shard repeats no sample needlessly.
                picked.append(rng.choice(pool, size=count, replace=count > len(pool)))
        return DeviceShard(device_id, np.sort(np.concatenate(picked)), domain)
