"""Datasets by name, found the way strategies are, built lazily and cached per process.

``data.dataset`` is a registry name (below), ``module:Class``,
``path/to/file.py:Class`` (relative to the current folder), or a name an
installed package registered in the ``fedkd.datasets`` entry-point group. A
built-in name wins over an entry point of the same name. The lookup is
:mod:`fedkd.registry`'s, shared with strategies and allocators, so the errors
read the same. Each entry is imported only when used, so naming a dataset
costs nothing until a device or the evaluator needs its samples.
"""
from __future__ import annotations

import inspect
import json
import os
from collections import OrderedDict
from functools import lru_cache
from typing import Any

from .base import Dataset, ModalitySpec, Split

DATASET_GROUP = "fedkd.datasets"

DATASETS: dict[str, str] = {
    "parking": "fedkd.data.parking:ParkingWorld",
    "av_digits": "fedkd.data.av_digits:AVDigits",
    "patch_folders": "fedkd.data.patch_folders:PatchFolderDataset",
    "arrays": "fedkd.data.arrays:ArraysDataset",
    "huggingface": "fedkd.data.huggingface:HuggingFaceDataset",
}

__all__ = ["DATASETS", "DATASET_GROUP", "Dataset", "ModalitySpec", "Split", "dataset_class",
           "dataset_options", "load_dataset", "registered_datasets"]


@lru_cache(maxsize=1)
def _kind():
    # Imported here: the registry imports flwr, which plain data users need not pay for.
    from ..registry import _Kind

    return _Kind("dataset", DATASET_GROUP, lambda: dict(DATASETS), lambda: Dataset,
                 "a fedkd dataset (a subclass of fedkd.data.Dataset)")


def registered_datasets() -> dict[str, str]:
    """Every name a dataset is known by: built-ins first, then installed plugins."""
    from ..registry import registered

    return registered(_kind())


def dataset_class(name: str) -> type[Dataset]:
    """The class ``name`` refers to; a one-line FedkdError if it cannot be used.

    Cached, so a dataset file is executed once per process: every later lookup
    (option checks, the run, each device's task) sees the same class. The key
    holds the current folder, which relative file names start from.
    """
    return _dataset_class(name, os.getcwd())


@lru_cache(maxsize=32)
def _dataset_class(name: str, cwd: str) -> type[Dataset]:
    from ..registry import _load_class

    return _load_class(name, _kind())[1]


def dataset_options(name: str) -> dict[str, inspect.Parameter] | None:
    """The constructor options a dataset accepts (``seed`` is set by the scenario);
    None when it takes ``**kwargs``, so any option may be right."""
    params = inspect.signature(dataset_class(name).__init__).parameters
    if any(p.kind is p.VAR_KEYWORD for p in params.values()):
        return None
    return {k: p for k, p in params.items()
            if k not in ("self", "seed") and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}


def takes_seed(cls: type[Dataset]) -> bool:
    params = inspect.signature(cls.__init__).parameters
    return "seed" in params or any(p.kind is p.VAR_KEYWORD for p in params.values())


_CACHE_SIZE = 8
_built: OrderedDict[tuple[str, str, int, str], Dataset] = OrderedDict()


def load_dataset(name: str, options: dict[str, Any], seed: int) -> Dataset:
    """The dataset ``name`` built with ``options``; one instance per process and key.

    Cached because every device's task in a process reads the same splits; the
    cache key is the canonical JSON of the options, so equal options share it.
    The constructor gets the options as written: their order can matter (the
    order of ``arrays`` modalities is the dataset's modality order).
    """
    # The current folder is part of the key: relative paths (a dataset file, an .npz) start there.
    key = (name, json.dumps(options, sort_keys=True), seed, os.getcwd())
    if key in _built:
        _built.move_to_end(key)
        return _built[key]
    cls = dataset_class(name)
    options = json.loads(json.dumps(options))  # a private copy, as the cache used to hand out
    # A dataset without randomness need not take the seed.
    dataset = cls(seed=seed, **options) if takes_seed(cls) else cls(**options)
    _built[key] = dataset
    if len(_built) > _CACHE_SIZE:
        _built.popitem(last=False)
    return dataset
