"""``huggingface``: a Hugging Face dataset on local disk, columns mapped to modalities.

``path`` is a folder written by ``datasets.save_to_disk`` (a ``Dataset`` or a
``DatasetDict``), or files ``datasets.load_dataset`` reads: a ``.parquet`` /
``.csv`` / ``.json`` / ``.jsonl`` file, or a folder of them (or ``builder``
names the loader, e.g. ``imagefolder``). fedkd never fetches from the Hub: set
``HF_DATASETS_OFFLINE=1`` where there is no network.

The options are those of ``arrays`` (see :mod:`fedkd.data.tables`) with
columns for arrays, plus which Hugging Face splits feed fedkd's::

    data:
      dataset: huggingface
      options:
        path: ~/data/watch_hf          # save_to_disk folder
        modalities:
          accel: {array: imu, channels: [0, 1, 2]}
          gyro: {array: imu, channels: [3, 4, 5]}
        labels: label                  # a ClassLabel column names the classes
        train_split: train
        test_split: test               # null: cut test_fraction from train
        public_split: null             # null: cut public_fraction from train

Image columns (PIL images) arrive as ``(H, W, C)`` arrays: give
``channels_last: true`` (and ``shape`` for grey images, which come as ``(H, W)``).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from ..errors import FedkdError
from .base import DatasetOptionError
from .tables import TableDataset

BUILDERS = {".parquet": "parquet", ".pq": "parquet", ".csv": "csv", ".json": "json", ".jsonl": "json"}


def _datasets():
    try:
        import datasets
    except ImportError:
        raise FedkdError("the huggingface dataset needs the datasets package: pip install 'fedkd[hf]'") from None
    # fedkd prints one line per run or error; the library's progress bars would bury it.
    datasets.disable_progress_bars()
    return datasets


def open_local(path: Path, builder: str | None) -> dict[str, Any]:
    """The Hugging Face splits at ``path``, by name."""
    datasets = _datasets()
    if not path.exists():
        where = "" if path.is_absolute() else f" (relative paths start at the current folder, {Path.cwd()})"
        raise DatasetOptionError("path", f"{path}: no such file or folder{where}")
    saved = path.is_dir() and any((path / f).is_file() for f in ("dataset_dict.json", "state.json"))
    try:
        if saved and builder is None:
            loaded = datasets.load_from_disk(str(path))
        elif path.is_file():
            kind = builder or BUILDERS.get(path.suffix.lower())
            if kind is None:
                raise DatasetOptionError("builder", f"{path}: cannot tell how to read a {path.suffix or 'suffix-less'} "
                                         f"file; expected one of {sorted(BUILDERS)} or a `builder`")
            loaded = datasets.load_dataset(kind, data_files=str(path))
        else:
            loaded = datasets.load_dataset(builder or str(path), data_dir=str(path) if builder else None)
    except FedkdError:
        raise
    except Exception as exc:  # noqa: BLE001 - whatever the datasets library raises, in one line
        raise DatasetOptionError("path", f"{path}: datasets cannot read it: {type(exc).__name__}: "
                                 f"{' '.join(str(exc).split())[:300]}") from None
    return dict(loaded) if isinstance(loaded, datasets.DatasetDict) else {"train": loaded}


class HuggingFaceDataset(TableDataset):
    """Paired samples from a local Hugging Face dataset, mapped by the options."""

    name = "huggingface"

    def __init__(
        self,
        path: str,
        modalities: dict[str, Any],
        labels: str = "label",
        seed: int = 0,
        domains: str | None = None,
        classes: list[str] | None = None,
        builder: str | None = None,
        train_split: str = "train",
        test_split: str | None = None,
        public_split: str | None = None,
        test_fraction: float = 0.2,
        public_fraction: float = 0.2,
        standardize: bool = False,
    ) -> None:
        if not isinstance(modalities, dict):
            raise FedkdError(f"modalities={modalities!r}: expected a mapping of modality name to column")
        splits = open_local(Path(path).expanduser(), builder)
        chosen = {"train": train_split, "test": test_split, "public": public_split}
        parts = []
        for ours, theirs in chosen.items():
            if theirs is None:
                continue
            if theirs not in splits:
                raise DatasetOptionError(f"{ours}_split", f"{path} has no split {theirs!r}; it has {sorted(splits)}")
            parts.append((ours, splits[theirs].with_format("numpy")))
        columns = set(parts[0][1].column_names)
        for ours, part in parts[1:]:
            if set(part.column_names) != columns:
                raise DatasetOptionError(f"{ours}_split", f"split {chosen[ours]!r} has columns {sorted(part.column_names)}, "
                                         f"split {train_split!r} has {sorted(columns)}")
        cache: dict[str, np.ndarray] = {}

        def source(name: str, key: str) -> np.ndarray:
            if name == "__fedkd_split__":  # which fedkd split each row came from
                return np.concatenate([np.full(len(p), ours) for ours, p in parts])
            if name not in columns:
                raise DatasetOptionError(key, f"{path} has no column {name!r}; it has {sorted(columns)}")
            if name not in cache:
                cache[name] = np.concatenate([_column(p, name) for _, p in parts])
            return cache[name]

        if classes is None:
            feature = parts[0][1].features.get(labels)
            classes = list(getattr(feature, "names", None) or []) or None  # a ClassLabel names its classes
        self._build(source, modalities=modalities, labels=labels, domains=domains, classes=classes,
                    split="__fedkd_split__" if len(parts) > 1 else None, test_fraction=test_fraction,
                    public_fraction=public_fraction, standardize_inputs=standardize, seed=seed,
                    meta={"path": str(path)})


def _column(part, name: str) -> np.ndarray:
    values = part[name]
    if isinstance(values, list):  # rows of different shapes come back as a list; as_rows reports them
        out = np.empty(len(values), dtype=object)
        out[:] = values
        return out
    return np.asarray(values)
