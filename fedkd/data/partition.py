"""Non-IID shards and modality availability, computed from (seed, device id).

Four properties compose; each is seeded on its own, so turning one on does not
reshuffle the others:

- **label skew** (``label_alpha``): each device draws its class mix from
  Dir(alpha) (Hsu et al. 2019, arXiv:1909.06335); small alpha means few classes
  per device, ``null`` means IID;
- **quantity skew** (``quantity_sigma``): the shard size is log-normal around
  ``samples_per_device``, never below ``min_samples``;
- **domain** (``by_domain``): each device sees one domain of the dataset only
  (a camera sees its own viewpoint);
- **modality availability** (``modality_mix``): which modalities a device
  holds, e.g. 60 % camera only, 30 % sensor only, 10 % both. It applies to
  devices whose device class leaves ``modalities`` null; a class's own list
  takes precedence (see :meth:`fedkd.context.SimulationContext.modalities_of`).

Two modes deal the samples:

- **lazy** (default): a device's shard is a pure function of the seed, the
  device id and the train labels. Nothing per device is built, so a population
  of a million devices costs nothing until a device is chosen, and any process
  (the server, a Ray worker) computes the same shard. Shards are drawn
  independently, so two devices may share samples: the population can be far
  larger than the dataset.
- **disjoint**: no two shards share a sample. All shards are dealt once per
  process, in O(train size + devices x classes); this needs
  ``devices * min_samples <= train samples``. Devices take their turn in a
  seeded order and draw their Dirichlet mix from what is left, as in Hsu et
  al.; when a class runs out, the shortfall comes from the classes still left.
  If the target sizes add up to more than the train split (or a domain) holds,
  they shrink in proportion, never below ``min_samples``. With ``by_domain``,
  devices are spread over domains in proportion to the domains' train sizes, so
  every domain can feed its devices.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..errors import FedkdError
from ..scenario import PartitionSpec, modality_set
from ..seeding import hashed_uniform, rng_for


@dataclass(frozen=True)
class DeviceShard:
    device_id: int
    indices: np.ndarray  # rows of the train split, sorted
    domain: int | None  # the one domain the device sees; None unless by_domain
    modalities: tuple[str, ...] | None = None  # drawn from modality_mix; None = no mix


class ModalityMix:
    """Which modality set each device holds, a pure function of (seed, device id)."""

    def __init__(self, mix: dict[str, float], seed: int):
        self.seed = seed
        self.sets: tuple[tuple[str, ...], ...] = tuple(modality_set(key) for key in mix)
        self._cum_share = np.cumsum(list(mix.values()))
        self._cum_share[-1] = 1.0  # shares sum to 1 up to float error

    def index(self, device_ids: np.ndarray) -> np.ndarray:
        """Index into :attr:`sets` of each device (vectorised, no per-device state)."""
        u = hashed_uniform(np.asarray(device_ids), self.seed, "modality-mix")
        return np.searchsorted(self._cum_share, u, side="right")

    def of(self, device_id: int) -> tuple[str, ...]:
        return self.sets[int(self.index(np.array([device_id]))[0])]


class Partitioner:
    """Deals the train split out to devices; see the module docstring for the modes.

    ``num_devices`` is needed for ``disjoint`` (the deal covers them all); in
    lazy mode it only bounds the device ids accepted.
    """

    def __init__(self, spec: PartitionSpec, labels: np.ndarray, domains: np.ndarray | None,
                 num_classes: int, seed: int, num_devices: int | None = None):
        if len(labels) == 0:
            raise FedkdError("the train split is empty; there is nothing to deal out to devices")
        self.spec, self.num_classes, self.seed, self.num_devices = spec, num_classes, seed, num_devices
        self.uses_domains = spec.by_domain and domains is not None
        dom = np.asarray(domains, dtype=np.int64) if self.uses_domains else np.zeros(len(labels), np.int64)
        num_domains = int(dom.max()) + 1
        # One index pool per (domain, class), as slices of one sorted array: O(train size), once per process.
        self._order = np.lexsort((np.arange(len(labels)), labels, dom))
        keys = dom[self._order] * num_classes + np.asarray(labels)[self._order]
        self._bounds = np.searchsorted(keys, np.arange(num_domains * num_classes + 1))
        self.domain_sizes = np.diff(self._bounds[::num_classes])
        # A device is only ever sent to a domain that has train samples.
        self._domains = np.flatnonzero(self.domain_sizes > 0)
        self.modality_mix = ModalityMix(spec.modality_mix, seed) if spec.modality_mix else None
        self._dealt: _DisjointDeal | None = None
        if spec.disjoint:
            if num_devices is None:
                raise ValueError("a disjoint partition needs num_devices")
            self._dealt = self._deal_disjoint(num_devices)

    # ---- what a device gets ---------------------------------------------------------
    def shard(self, device_id: int) -> DeviceShard:
        if self.num_devices is not None and not 0 <= device_id < self.num_devices:
            raise IndexError(f"device id {device_id} not in [0, {self.num_devices})")
        if self._dealt is not None:
            indices = self._dealt.indices_of(device_id)
        else:
            indices = self._draw_lazily(device_id)
        return DeviceShard(device_id, indices, self.domain_of(device_id), self.modalities_of(device_id))

    def domain_of(self, device_id: int) -> int | None:
        if not self.uses_domains:
            return None
        if self._dealt is not None:
            return int(self._dealt.domain[device_id])
        u = hashed_uniform(np.array([device_id]), self.seed, "domain")[0]
        return int(self._domains[int(u * len(self._domains))])

    def modalities_of(self, device_id: int) -> tuple[str, ...] | None:
        """The modality set drawn from ``modality_mix``; None when the scenario gives no mix."""
        return None if self.modality_mix is None else self.modality_mix.of(device_id)

    # ---- shared draws -----------------------------------------------------------------
    def _pool(self, domain: int, label: int) -> np.ndarray:
        k = domain * self.num_classes + label
        return self._order[self._bounds[k]:self._bounds[k + 1]]

    def _pool_sizes(self, domain: int) -> np.ndarray:
        return np.diff(self._bounds[domain * self.num_classes:(domain + 1) * self.num_classes + 1])

    def _draw_size_and_mix(self, rng: np.random.Generator, available: np.ndarray) -> tuple[int, np.ndarray]:
        """Target shard size (quantity skew) and class mix (label skew) over ``available`` classes."""
        spec = self.spec
        size = spec.samples_per_device * np.exp(spec.quantity_sigma * rng.standard_normal())
        size = max(spec.min_samples, int(round(size)))
        uniform = available / available.sum()
        if spec.label_alpha is None:
            return size, uniform
        mix = rng.dirichlet(np.full(self.num_classes, spec.label_alpha)) * available
        return size, (mix / mix.sum() if mix.sum() > 0 else uniform)

    # ---- lazy mode --------------------------------------------------------------------
    def _draw_lazily(self, device_id: int) -> np.ndarray:
        rng = rng_for(self.seed, "shard", device_id)
        domain = self.domain_of(device_id) or 0
        size, mix = self._draw_size_and_mix(rng, self._pool_sizes(domain) > 0)
        picked = []
        for label, count in enumerate(rng.multinomial(size, mix)):
            if count:
                pool = self._pool(domain, label)
                # Without replacement where the pool allows, so a shard repeats no sample needlessly.
                picked.append(rng.choice(pool, size=count, replace=count > len(pool)))
        return np.sort(np.concatenate(picked))

    # ---- disjoint mode ----------------------------------------------------------------
    def _deal_disjoint(self, num_devices: int) -> "_DisjointDeal":
        min_samples = self.spec.min_samples
        train_size = int(self.domain_sizes.sum())
        if num_devices * min_samples > train_size:
            raise FedkdError(
                f"disjoint shards need devices x min_samples <= train samples, but "
                f"{num_devices:,} x {min_samples} = {num_devices * min_samples:,} > {train_size:,}; "
                "use fewer devices, a smaller min_samples, or disjoint: false")
        rng = rng_for(self.seed, "disjoint")
        domain = _spread_over_domains(self.domain_sizes, self._domains, num_devices, rng)
        shards: list[np.ndarray] = [np.empty(0, np.int64)] * num_devices
        for d in self._domains:
            devices = np.flatnonzero(domain == d)
            if len(devices) * min_samples > self.domain_sizes[d]:
                raise FedkdError(
                    f"disjoint shards by domain: domain {d} holds {self.domain_sizes[d]:,} train samples, "
                    f"too few for its {len(devices):,} devices x min_samples {min_samples}; "
                    "use fewer devices, a smaller min_samples, or disjoint: false")
            for device_id, indices in self._deal_domain(int(d), devices, rng):
                shards[device_id] = indices
        return _DisjointDeal.of(shards, domain if self.uses_domains else None)

    def _deal_domain(self, domain: int, devices: np.ndarray, rng: np.random.Generator):
        """(device id, sorted indices) for each device of one domain, without overlap."""
        pools = [rng.permutation(self._pool(domain, k)) for k in range(self.num_classes)]
        left = np.array([len(p) for p in pools])
        # The same per-device draws as lazy mode, so alpha and sigma mean the same in both.
        drawn = [self._draw_size_and_mix(rng_for(self.seed, "shard", int(i)), left > 0) for i in devices]
        sizes = _fit_sizes(np.array([s for s, _ in drawn]), int(left.sum()), self.spec.min_samples)
        taken = np.zeros(self.num_classes, np.int64)  # per class: how much of the pool is dealt
        for turn in rng.permutation(len(devices)):  # seeded order: low ids get no first pick
            mix = drawn[turn][1]
            counts = _take(rng.multinomial(sizes[turn], mix), mix, left)
            left -= counts
            parts = [pools[k][taken[k]:taken[k] + c] for k, c in enumerate(counts) if c]
            taken += counts
            yield int(devices[turn]), np.sort(np.concatenate(parts))


@dataclass(frozen=True)
class _DisjointDeal:
    """All disjoint shards in two flat arrays: O(train size + devices), not one object per device."""

    flat: np.ndarray  # every device's indices, device after device
    offsets: np.ndarray  # device i owns flat[offsets[i]:offsets[i + 1]]
    domain: np.ndarray | None

    @classmethod
    def of(cls, shards: list[np.ndarray], domain: np.ndarray | None) -> "_DisjointDeal":
        offsets = np.concatenate([[0], np.cumsum([len(s) for s in shards])]).astype(np.int64)
        return cls(np.concatenate(shards).astype(np.int64), offsets, domain)

    def indices_of(self, device_id: int) -> np.ndarray:
        return self.flat[self.offsets[device_id]:self.offsets[device_id + 1]].copy()


def _spread_over_domains(domain_sizes: np.ndarray, domains: np.ndarray, num_devices: int,
                         rng: np.random.Generator) -> np.ndarray:
    """Domain of each device: counts in proportion to the domains' sizes (largest remainder), seeded order."""
    quota = domain_sizes[domains] / domain_sizes[domains].sum() * num_devices
    counts = np.floor(quota).astype(np.int64)
    extra = np.argsort(-(quota - counts), kind="stable")[:num_devices - counts.sum()]
    counts[extra] += 1
    return rng.permutation(np.repeat(domains, counts))


def _fit_sizes(targets: np.ndarray, capacity: int, min_samples: int) -> np.ndarray:
    """Shrink target sizes in proportion until they fit ``capacity``, never below ``min_samples``.

    The caller guarantees ``len(targets) * min_samples <= capacity``, so a fit exists.
    """
    if targets.sum() <= capacity:
        return targets
    low, high = 0.0, 1.0  # bisection on the common factor; 50 halvings reach float precision
    for _ in range(50):
        mid = (low + high) / 2
        if np.maximum(min_samples, np.floor(mid * targets)).sum() <= capacity:
            low = mid
        else:
            high = mid
    return np.maximum(min_samples, np.floor(low * targets)).astype(np.int64)


def _take(wanted: np.ndarray, mix: np.ndarray, left: np.ndarray) -> np.ndarray:
    """Per-class counts summing to ``wanted.sum()`` that fit ``left``.

    What a class cannot supply comes from the classes still left, weighted by
    the device's own mix where it has any weight there (so the label skew
    survives), else by what is left. The caller guarantees ``left.sum()`` is
    enough.
    """
    counts = np.minimum(wanted, left)
    short = int(wanted.sum() - counts.sum())
    while short > 0:
        room = left - counts
        weight = np.where(room > 0, mix, 0.0)
        weight = weight if weight.sum() > 1e-12 else room.astype(np.float64)
        add = np.minimum(np.floor(short * weight / weight.sum()).astype(np.int64), room)
        if add.sum() == 0:  # fewer units short than classes to spread them over
            add[np.argmax(weight)] = 1
        counts += add
        short -= int(add.sum())
    return counts
