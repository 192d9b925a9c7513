"""Named arrays (an ``.npz``, a parquet table, a Hugging Face dataset) to a fedkd
dataset: modalities, labels, domains and splits as the options say.

Shared by :mod:`fedkd.data.arrays` and :mod:`fedkd.data.huggingface`; each only
says how to read a named array (``source(name) -> np.ndarray``, one row per
sample). Errors are :class:`DatasetOptionError` naming the option's key, so a
scenario error reads ``data.options.modalities.accel.channels: ...``.

How one modality is built from ``{array | columns, shape, channels_last, channels, kind}``:

1. ``array: X`` takes one array; ``columns: [a, b, c]`` stacks several as
   channels (each a scalar or a sequence per sample);
2. ``shape`` reshapes each sample (a flat 196-vector to ``[1, 14, 14]``);
3. ``channels_last`` moves the last axis first (``(T, C)`` -> ``(C, T)``,
   ``(H, W, C)`` -> ``(C, H, W)``);
4. a flat feature vector of length F becomes a one-channel series ``(1, F)``;
5. ``channels: [0, 1, 2]`` keeps those channels, so one ``(N, 6, T)``
   recording can feed two 3-channel modalities;
6. ``kind`` is ``series`` for ``(C, T)`` samples and ``image`` for ``(C, H, W)``
   unless given; values become float32.
"""
from __future__ import annotations

from collections.abc import Callable
from typing import Annotated, Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from ..seeding import rng_for
from .base import SPLIT_NAMES, Dataset, DatasetOptionError, ModalitySpec, Split, SplitName
from .splits import check_fractions, stratified_split_indices

# source(array or column name, option key for errors) -> one row per sample
Source = Callable[[str, str], np.ndarray]
KIND_OF_DIMS = {2: "series", 3: "image"}
_STD_FLOOR = 1e-6  # keeps a constant channel from dividing by zero


class ModalityOption(BaseModel):
    """One entry of ``options.modalities``."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    array: str | None = Field(None, description="the array (or column) holding this modality")
    columns: list[str] | None = Field(None, min_length=1, description="several, stacked as channels")
    shape: list[Annotated[int, Field(gt=0)]] | None = Field(None, description="reshape each sample to this")
    channels_last: bool = False
    channels: list[Annotated[int, Field(ge=0)]] | None = Field(None, min_length=1)
    kind: Literal["image", "series"] | None = None

    @model_validator(mode="after")
    def _one_source(self) -> "ModalityOption":
        if (self.array is None) == (self.columns is None):
            raise ValueError("expected exactly one of `array` (one array or column) or `columns` (a list)")
        return self


def parse_modalities(raw: dict[str, Any]) -> dict[str, ModalityOption]:
    if not raw:
        raise DatasetOptionError("modalities", "expected at least one modality, e.g. "
                                 "{accel: {array: imu, channels: [0, 1, 2]}}")
    parsed = {}
    for name, value in raw.items():
        if not name or "+" in name:
            raise DatasetOptionError(f"modalities.{name}", "expected a modality name without '+'")
        if isinstance(value, str):  # `accel: imu` is shorthand for `accel: {array: imu}`
            value = {"array": value}
        try:
            parsed[name] = ModalityOption.model_validate(value)
        except ValidationError as exc:
            err = exc.errors()[0]
            loc = ".".join(str(p) for p in err["loc"])
            key = f"modalities.{name}" + (f".{loc}" if loc else "")
            msg = "unknown key" if err["type"] == "extra_forbidden" else err["msg"].removeprefix("Value error, ")
            raise DatasetOptionError(key, msg) from None
    return parsed


def as_rows(values: Any, key: str, what: str) -> np.ndarray:
    """One row per sample as a numeric array; object columns of equal-length sequences are stacked."""
    arr = np.asarray(values)
    if arr.dtype == object:
        try:
            arr = np.stack([_dense(v) for v in arr])
        except (ValueError, TypeError) as exc:
            raise DatasetOptionError(key, f"{what}: rows are not equal-length numbers ({exc})") from None
    if not (np.issubdtype(arr.dtype, np.number) or arr.dtype == bool):
        raise DatasetOptionError(key, f"{what} holds {arr.dtype} values, expected numbers")
    return arr


def _dense(value: Any) -> np.ndarray:
    """A cell as a float array; parquet gives nested lists as object arrays of arrays."""
    arr = np.asarray(value)
    if arr.dtype == object:
        arr = np.stack([_dense(v) for v in arr]) if len(arr) else arr.astype(np.float64)
    return arr.astype(np.float64)


def build_modality(name: str, opt: ModalityOption, source: Source, num_rows: int) -> tuple[np.ndarray, ModalitySpec]:
    key = f"modalities.{name}"
    if opt.array is not None:
        x = as_rows(source(opt.array, f"{key}.array"), f"{key}.array", f"array {opt.array!r}")
    else:
        parts = [as_rows(source(c, f"{key}.columns"), f"{key}.columns", f"column {c!r}") for c in opt.columns]
        shapes = {p.shape for p in parts}
        if len(shapes) > 1:
            raise DatasetOptionError(f"{key}.columns", f"the columns have different shapes {sorted(shapes)}; "
                                     "stacking them as channels needs one shape")
        x = np.stack(parts, axis=1)
    if len(x) != num_rows:
        raise DatasetOptionError(key, f"has {len(x)} samples, the labels have {num_rows}")
    if opt.shape is not None:
        if int(np.prod(x.shape[1:])) != int(np.prod(opt.shape)):
            raise DatasetOptionError(f"{key}.shape", f"a sample of shape {x.shape[1:]} ({int(np.prod(x.shape[1:]))} "
                                     f"values) cannot be reshaped to {tuple(opt.shape)}")
        x = x.reshape(len(x), *opt.shape)
    if opt.channels_last and x.ndim >= 3:
        x = np.moveaxis(x, -1, 1)
    if x.ndim == 2:  # a flat feature vector: one channel
        x = x[:, None, :]
    if x.ndim not in (3, 4):
        raise DatasetOptionError(key, f"samples of shape {x.shape[1:]}; expected (channels, length) for a series "
                                 "or (channels, height, width) for an image (see `shape`, `channels_last`)")
    if opt.channels is not None:
        bad = [c for c in opt.channels if c >= x.shape[1]]
        if bad:
            raise DatasetOptionError(f"{key}.channels", f"channels {bad} out of range: samples have "
                                     f"{x.shape[1]} channels (0-{x.shape[1] - 1}), shape {x.shape[1:]}")
        x = x[:, opt.channels]
    kind = KIND_OF_DIMS[x.ndim - 1]
    if opt.kind is not None and opt.kind != kind:
        raise DatasetOptionError(f"{key}.kind", f"{opt.kind} expected, but samples have shape {x.shape[1:]} "
                                 f"({'(C, H, W)' if opt.kind == 'image' else '(C, T)'} expected)")
    x = np.ascontiguousarray(x, dtype=np.float32)
    if not np.isfinite(x).all():
        raise DatasetOptionError(key, "holds NaN or infinite values")
    return x, ModalitySpec(name, tuple(int(d) for d in x.shape[1:]), kind)


def encode_labels(values: np.ndarray, classes: list[str] | None, key: str = "labels") -> tuple[np.ndarray, tuple[str, ...]]:
    """Class index per sample and the class names.

    Integer labels are indices (``classes`` names them, else ``"0".."K-1"``);
    any other labels (strings) are names, indexed in ``classes`` order, else sorted.
    """
    values = np.asarray(values)
    if values.ndim != 1:
        raise DatasetOptionError(key, f"expected one label per sample, got shape {values.shape}")
    if np.issubdtype(values.dtype, np.floating) and np.all(np.mod(values, 1) == 0):
        values = values.astype(np.int64)  # parquet stores integer columns with nulls as float
    if np.issubdtype(values.dtype, np.integer):
        labels = values.astype(np.int64)
        if len(labels) and labels.min() < 0:
            raise DatasetOptionError(key, f"label {labels.min()} is negative; integer labels are class indices")
        count = int(labels.max()) + 1 if len(labels) else 0
        if classes is None:
            return labels, tuple(str(i) for i in range(count))
        if count > len(classes):
            raise DatasetOptionError("classes", f"{len(classes)} class names, but labels go up to {count - 1}")
        return labels, tuple(classes)
    names = np.array([v.decode() if isinstance(v, bytes) else str(v) for v in values])
    order = list(classes) if classes is not None else sorted(set(names.tolist()))
    index = {c: i for i, c in enumerate(order)}
    unknown = sorted(set(names.tolist()) - set(index))
    if unknown:
        raise DatasetOptionError("classes", f"labels {unknown[:5]} are not among the classes {order}")
    return np.array([index[v] for v in names], dtype=np.int64), tuple(order)


def dense_domains(values: np.ndarray) -> tuple[np.ndarray, tuple[str, ...]]:
    """Domain index per sample (0..D-1, in sorted order of the values) and the domain names."""
    uniques, inverse = np.unique(np.asarray(values), return_inverse=True)
    return inverse.astype(np.int64).reshape(-1), tuple(str(u) for u in uniques)


def assign_splits(labels: np.ndarray, domains: np.ndarray | None, given: np.ndarray | None,
                  test_fraction: float, public_fraction: float, *rng_parts: object) -> dict[SplitName, np.ndarray]:
    """Rows of each split, sorted.

    ``given`` (one of "train" / "test" / "public" per row) fixes a row's split;
    a split it leaves empty (or all three, without ``given``) is cut from the
    train rows, stratified by label (and domain, so every domain is tested).
    """
    check_fractions(test_fraction, public_fraction)
    strata = labels if domains is None else domains * (int(labels.max()) + 1) + labels
    if given is None:
        return stratified_split_indices(strata, test_fraction, public_fraction, *rng_parts)
    given = np.array([v.decode() if isinstance(v, bytes) else str(v) for v in np.asarray(given)])
    unknown = sorted(set(given.tolist()) - set(SPLIT_NAMES))
    if unknown:
        raise DatasetOptionError("split", f"values {unknown[:5]}; expected 'train', 'test' or 'public' per sample")
    rows = {s: np.flatnonzero(given == s) for s in SPLIT_NAMES}
    missing = [s for s in ("test", "public") if len(rows[s]) == 0]
    train = rows["train"]
    if len(missing) == 2:
        cut = stratified_split_indices(strata[train], test_fraction, public_fraction, *rng_parts)
        return {s: np.sort(train[cut[s]]) for s in SPLIT_NAMES}
    if missing:
        fraction = test_fraction if missing[0] == "test" else public_fraction
        kept, taken = _cut_one(strata[train], fraction, *rng_parts, missing[0])
        rows["train"], rows[missing[0]] = train[kept], train[taken]
    return {s: np.sort(rows[s]).astype(np.int64) for s in SPLIT_NAMES}


def _cut_one(strata: np.ndarray, fraction: float, *rng_parts: object) -> tuple[np.ndarray, np.ndarray]:
    """(kept, taken) positions: ``fraction`` of each stratum taken (at least one of any stratum
    of 2 or more, never all of it), each stratum shuffled by its own seed."""
    kept, taken = [], []
    for stratum in np.unique(strata):
        members = rng_for(*rng_parts, "split", stratum.item()).permutation(np.flatnonzero(strata == stratum))
        k = int(round(len(members) * fraction))
        if len(members) >= 2:
            k = min(max(k, 1), len(members) - 1)
        taken.append(members[:k])
        kept.append(members[k:])
    return np.sort(np.concatenate(kept)), np.sort(np.concatenate(taken))


def standardize(inputs: dict[str, np.ndarray], train_rows: np.ndarray) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Scale each modality's channels to zero mean, unit std, with statistics of the train
    rows only (nothing leaks from test or public); in place. Returns the (mean, std) used."""
    stats = {}
    for name, x in inputs.items():
        axes = (0,) + tuple(range(2, x.ndim))
        mean = x[train_rows].mean(axis=axes, keepdims=True)
        std = np.maximum(x[train_rows].std(axis=axes, keepdims=True), _STD_FLOOR)
        x -= mean
        x /= std
        stats[name] = (mean[0].astype(np.float32), std[0].astype(np.float32))
    return stats


def build_splits(inputs: dict[str, np.ndarray], labels: np.ndarray, domains: np.ndarray | None,
                 rows: dict[SplitName, np.ndarray], meta: dict) -> dict[SplitName, Split]:
    for which in SPLIT_NAMES:
        if len(rows[which]) == 0:
            raise DatasetOptionError("split", f"the {which} split is empty; give it rows or more samples")
    return {s: Split({m: x[idx] for m, x in inputs.items()}, labels[idx],
                     None if domains is None else domains[idx], {**meta, "split": s})
            for s, idx in rows.items()}


class TableDataset(Dataset):
    """A dataset built from named arrays by the options above; subclasses say how to read them."""

    def _build(self, source: Source, *, modalities: dict[str, Any], labels: str, domains: str | None,
               classes: list[str] | None, split: str | None, test_fraction: float, public_fraction: float,
               standardize_inputs: bool, seed: int, meta: dict) -> None:
        options = parse_modalities(modalities)
        check_fractions(test_fraction, public_fraction)
        label_idx, self.classes = encode_labels(source(labels, "labels"), classes)
        if len(self.classes) < 2:
            raise DatasetOptionError("labels", f"{len(self.classes)} class found; a classifier needs at least 2")
        n = len(label_idx)
        dom = None
        self.domain_names: tuple[str, ...] = ()
        if domains is not None:
            dom, self.domain_names = dense_domains(source(domains, "domains"))
            if len(dom) != n:
                raise DatasetOptionError("domains", f"{len(dom)} values, the labels have {n}")
        given = None
        if split is not None:
            given = source(split, "split")
            if len(given) != n:
                raise DatasetOptionError("split", f"{len(given)} values, the labels have {n}")
        inputs, specs = {}, []
        for name, opt in options.items():
            inputs[name], spec = build_modality(name, opt, source, n)
            specs.append(spec)
        self.modalities = tuple(specs)
        rows = assign_splits(label_idx, dom, given, test_fraction, public_fraction, seed, self.name)
        if standardize_inputs:
            meta = {**meta, "standardize": standardize(inputs, rows["train"])}
        self._splits = build_splits(inputs, label_idx, dom, rows, meta)

    def split(self, which: SplitName) -> Split:
        if which not in SPLIT_NAMES:
            raise KeyError(f"unknown split {which!r}; expected one of {SPLIT_NAMES}")
        return self._splits[which]
