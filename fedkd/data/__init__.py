"""Datasets by name, built lazily and cached per process.

The registry lists the built-in datasets explicitly; each entry is imported only
when used, so naming a dataset costs nothing until a device or the evaluator
needs its samples.
"""
from __future__ import annotations

import importlib
import inspect
import json
from functools import lru_cache
from typing import Any

from ..errors import FedkdError
from .base import Dataset, ModalitySpec, Split

DATASETS: dict[str, str] = {
    "parking": "fedkd.data.parking:ParkingWorld",
    "av_digits": "fedkd.data.av_digits:AVDigits",
    "patch_folders": "fedkd.data.patch_folders:PatchFolderDataset",
}

__all__ = ["DATASETS", "Dataset", "ModalitySpec", "Split", "dataset_class", "load_dataset"]


def dataset_class(name: str) -> type[Dataset]:
    if name not in DATASETS:
        raise FedkdError(f"unknown dataset {name!r}; expected one of {sorted(DATASETS)}")
    module, _, attr = DATASETS[name].partition(":")
    return getattr(importlib.import_module(module), attr)


def dataset_options(name: str) -> dict[str, inspect.Parameter]:
    """The constructor options a dataset accepts (``seed`` is set by the scenario)."""
    params = inspect.signature(dataset_class(name).__init__).parameters
    return {k: p for k, p in params.items() if k not in ("self", "seed")}


@lru_cache(maxsize=8)
def _cached(name: str, options_json: str, seed: int) -> Dataset:
    return dataset_class(name)(seed=seed, **json.loads(options_json))


def load_dataset(name: str, options: dict[str, Any], seed: int) -> Dataset:
    """The dataset ``name`` built with ``options``; one instance per process and key.

    Cached because every device's task in a process reads the same splits; the
    cache key is the canonical JSON of the options, so equal options share it.
    """
    return _cached(name, json.dumps(options, sort_keys=True), seed)
