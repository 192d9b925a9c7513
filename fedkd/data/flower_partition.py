"""Flower Datasets partitioners dealing fedkd's train split (``data.partition.partitioner``).

``partitioner`` names a class of :mod:`flwr_datasets.partitioner`
(``DirichletPartitioner``, ``PathologicalPartitioner``, ``ShardPartitioner``,
``InnerDirichletPartitioner``, ``IidPartitioner``...), or ``module:Class`` /
``path/to/file.py:Class`` for a partitioner of your own; ``params`` are its
constructor's parameters. fedkd fills in what it knows unless ``params`` says
otherwise: ``num_partitions`` = the population's devices, ``partition_by`` =
``"label"`` (the column ``"domain"`` holds the train split's domains, where the
dataset has them), ``seed`` = one derived from the scenario's seed.

The partitioner sees a table of the train split's row numbers and labels, not
the samples, and device ``i`` holds the rows of partition ``i``. Unlike
fedkd's lazy partitioner, these partitioners materialise every partition at
once (O(devices) memory and time when the first device is dealt); fedkd's
stays the default and the one for populations beyond that (see
benchmarks/README.md for the measured cost).
"""
from __future__ import annotations

import inspect
import os
import warnings
from contextlib import contextmanager
from functools import lru_cache
from typing import Any

import numpy as np

from ..errors import FedkdError
from ..seeding import derive_seed
from .partition import DeviceShard, ModalityMix

PARTITIONER_GROUP = "fedkd.partitioners"


def _flwr_partitioners() -> dict[str, str]:
    try:
        import flwr_datasets.partitioner as module
    except ImportError:
        return {}
    # Vertical partitioners split columns (features), not rows (samples): no use for dealing shards.
    return {name: f"flwr_datasets.partitioner:{name}" for name in module.__all__
            if name != "Partitioner" and not name.startswith("Vertical")}


def _base() -> type:
    try:
        from flwr_datasets.partitioner import Partitioner
    except ImportError:
        raise FedkdError("data.partition.partitioner needs Flower Datasets: pip install 'fedkd[hf]'") from None
    return Partitioner


@lru_cache(maxsize=1)
def _kind():
    from ..registry import _Kind  # the strategies' lookup: names, module:Class, file.py:Class, entry points

    return _Kind("partitioner", PARTITIONER_GROUP, _flwr_partitioners, _base,
                 "a Flower Datasets partitioner (a subclass of flwr_datasets.partitioner.Partitioner)")


def partitioner_class(name: str) -> type:
    return _partitioner_class(name, os.getcwd())  # relative file names start at the current folder


@lru_cache(maxsize=16)
def _partitioner_class(name: str, cwd: str) -> type:
    from ..registry import _load_class

    _base()  # a missing extra is said plainly, before "unknown partitioner"
    return _load_class(name, _kind())[1]


def partitioner_params(cls: type, params: dict[str, Any], seed: int, num_devices: int) -> dict[str, Any]:
    """``params`` plus what fedkd fills in where the class takes it and ``params`` leaves it out."""
    accepted = inspect.signature(cls.__init__).parameters
    filled = {"num_partitions": num_devices, "partition_by": "label",
              "seed": derive_seed(seed, "flwr-partitioner") % 2**32}
    return {k: v for k, v in filled.items() if k in accepted and k not in params} | dict(params)


class FlowerPartitioner:
    """Device ``i`` holds partition ``i``; the same interface as :class:`fedkd.data.partition.Partitioner`."""

    uses_domains = False  # a device's shard may mix domains; fog assignment by domain falls back to a hash

    def __init__(self, spec, labels: np.ndarray, domains: np.ndarray | None, num_classes: int, seed: int,
                 num_devices: int | None = None):
        from datasets import Dataset as HFDataset
        from datasets import disable_progress_bars

        disable_progress_bars()  # fedkd's output stays one line per run or error

        if num_devices is None:
            raise ValueError("a Flower Datasets partitioner needs num_devices")
        if len(labels) == 0:
            raise FedkdError("the train split is empty; there is nothing to deal out to devices")
        cls = partitioner_class(spec.partitioner)
        kwargs = partitioner_params(cls, spec.params, seed, num_devices)
        try:
            self.flwr = cls(**kwargs)
        except (TypeError, ValueError) as exc:
            raise FedkdError(f"{spec.partitioner}{kwargs}: {' '.join(str(exc).split())}") from None
        columns = {"index": np.arange(len(labels), dtype=np.int64), "label": np.asarray(labels, np.int64)}
        if domains is not None:
            columns["domain"] = np.asarray(domains, np.int64)
        self.flwr.dataset = HFDataset.from_dict(columns)
        self.spec, self.num_classes, self.seed, self.num_devices = spec, num_classes, seed, num_devices
        self.modality_mix = ModalityMix(spec.modality_mix, seed) if spec.modality_mix else None

    def shard(self, device_id: int) -> DeviceShard:
        if not 0 <= device_id < self.num_devices:
            raise IndexError(f"device id {device_id} not in [0, {self.num_devices})")
        with _dealing(self.spec.partitioner, f"partition {device_id}"):
            self.flwr.num_partitions  # noqa: B018 - deals every partition, for the partitioners that do so
            dealt = getattr(self.flwr, "_partition_id_to_indices", None)
            if isinstance(dealt, dict) and device_id in dealt:
                # The row numbers the partitioner already holds (its table's rows are the train rows):
                # tens of microseconds, where load_partition builds an Arrow table of each shard (~30-70 ms).
                rows = dealt[device_id]
            else:
                rows = self.flwr.load_partition(device_id)["index"]
        return DeviceShard(device_id, np.sort(np.asarray(rows, dtype=np.int64)), None, self.modalities_of(device_id))

    def domain_of(self, device_id: int) -> int | None:
        return None

    def modalities_of(self, device_id: int) -> tuple[str, ...] | None:
        return None if self.modality_mix is None else self.modality_mix.of(device_id)

    def check(self) -> None:
        """Deal now and check one partition per device, none empty; a FedkdError otherwise."""
        rows = len(self.flwr.dataset)
        if self.num_devices > rows:
            raise FedkdError(f"{self.spec.partitioner}'s partitions are disjoint, so {self.num_devices:,} devices "
                             f"need at least as many train samples; the train split has {rows:,}")
        with _dealing(self.spec.partitioner, "the partitions"):
            made = self.flwr.num_partitions  # most partitioners deal everything here or on first load
        if made != self.num_devices:
            raise FedkdError(f"{self.spec.partitioner} makes {made:,} partitions for {self.num_devices:,} devices; "
                             "fedkd gives device i partition i, so they must be equal")
        for device_id in (0, self.num_devices - 1):
            self.shard(device_id)
        dealt = getattr(self.flwr, "_partition_id_to_indices", None)  # a private dict; not every class has it
        if isinstance(dealt, dict) and dealt:
            empty = [i for i in range(self.num_devices) if len(dealt.get(i, ())) == 0]
            if empty:
                raise FedkdError(f"{self.spec.partitioner} gives {len(empty):,} devices no sample "
                                 f"(device {empty[0]} first); use fewer devices or other params")


@contextmanager
def _dealing(name: str, what: str):
    """Flower's dealing errors as one FedkdError line; its retry warnings silenced (the error says it)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        try:
            yield
        except (KeyError, ValueError, IndexError, TypeError) as exc:
            raise FedkdError(f"{name} failed to deal {what}: {type(exc).__name__}: "
                             f"{' '.join(str(exc).split())}") from None
