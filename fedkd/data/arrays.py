"""``arrays``: your own data without code, from an ``.npz``, parquet or CSV file.

The options map arrays (``.npz``) or columns (parquet, CSV) to modalities,
labels and optional domains, and say how test and public are cut::

    data:
      dataset: arrays
      options:
        path: watch.npz              # relative to the folder fedkd runs in
        modalities:
          accel: {array: imu, channels: [0, 1, 2]}   # one (N, 6, T) recording,
          gyro:  {array: imu, channels: [3, 4, 5]}   # two 3-channel modalities
        labels: activity             # integers 0..K-1, or names
        domains: wearer              # optional: e.g. who wore the watch
        split: null                  # optional: an array of "train"/"test"/"public" per sample
        test_fraction: 0.2           # what is cut from train when `split` gives no test rows
        public_fraction: 0.2
        standardize: false           # true: zero mean, unit std per channel (train statistics)

Every modality entry is described in :mod:`fedkd.data.tables` (``array`` or
``columns``, ``shape``, ``channels_last``, ``channels``, ``kind``). Without
``split`` the three splits are cut stratified by label (and domain), seeded by
the scenario's seed, as the built-in datasets are.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from ..errors import FedkdError
from .base import DatasetOptionError
from .tables import Source, TableDataset

SUFFIXES = (".npz", ".parquet", ".pq", ".csv")


def open_source(path: Path) -> tuple[Source, list[str]]:
    """A reader of named arrays in ``path`` and the names it holds."""
    if not path.is_file():
        where = "" if path.is_absolute() else f" (relative paths start at the current folder, {Path.cwd()})"
        raise DatasetOptionError("path", f"{path}: no such file{where}")
    suffix = path.suffix.lower()
    if suffix not in SUFFIXES:
        raise DatasetOptionError("path", f"{path}: expected a file ending in {', '.join(SUFFIXES)}")
    try:
        if suffix == ".npz":
            # No pickles: an .npz from elsewhere must not run code when it is read.
            with np.load(path, allow_pickle=False) as npz:
                table = {k: npz[k] for k in npz.files}
        else:
            import pandas as pd

            frame = pd.read_csv(path) if suffix == ".csv" else pd.read_parquet(path)
            table = {str(c): frame[c].to_numpy() for c in frame.columns}
    except ImportError as exc:
        raise DatasetOptionError("path", f"{path}: reading parquet needs pyarrow ({exc}); "
                                 "pip install 'fedkd[hf]' installs it") from None
    except (OSError, ValueError) as exc:
        raise DatasetOptionError("path", f"{path}: cannot read it: {' '.join(str(exc).split())}") from None
    noun = "array" if suffix == ".npz" else "column"

    def source(name: str, key: str) -> np.ndarray:
        if name not in table:
            raise DatasetOptionError(key, f"{path} has no {noun} {name!r}; it has {sorted(table)}")
        return table[name]

    return source, sorted(table)


class ArraysDataset(TableDataset):
    """Paired samples read from one .npz / parquet / CSV file, mapped by the options."""

    name = "arrays"

    def __init__(
        self,
        path: str,
        modalities: dict[str, Any],
        labels: str,
        seed: int = 0,
        domains: str | None = None,
        classes: list[str] | None = None,
        split: str | None = None,
        test_fraction: float = 0.2,
        public_fraction: float = 0.2,
        standardize: bool = False,
    ) -> None:
        if not isinstance(modalities, dict):
            raise FedkdError(f"modalities={modalities!r}: expected a mapping of modality name to array")
        source, _ = open_source(Path(path).expanduser())
        self._build(source, modalities=modalities, labels=labels, domains=domains, classes=classes, split=split,
                    test_fraction=test_fraction, public_fraction=public_fraction, standardize_inputs=standardize,
                    seed=seed, meta={"path": str(path)})
