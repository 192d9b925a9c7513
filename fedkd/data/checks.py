"""Checks of ``data:`` before anything runs: the dataset reference, its options,
and every split against the :class:`~fedkd.data.base.Dataset` interface.

A dataset written by a user can break the interface in ways that would only
surface deep inside training (a float64 array, a shape that is not its spec's,
a label past the last class). Here each becomes one :class:`ScenarioError`
naming the scenario file and the key (``data.dataset`` or ``data.options.X``).
"""
from __future__ import annotations

import typing
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import FedkdError, ScenarioError
from .base import SPLIT_NAMES, Dataset, DatasetOptionError, ModalitySpec, Split

# The encoders pool by 2 once (fedkd.models.multimodal), so a sample must be at least this long / wide.
MIN_SERIES_LENGTH = 2
MIN_IMAGE_SIDE = 2
SAMPLE_DIMS = {"image": 3, "series": 2}


def check_data(scenario, path: str) -> Dataset:
    """Resolve, build and check the scenario's dataset; the dataset, or a ScenarioError."""
    from . import dataset_class, dataset_options, load_dataset

    spec = scenario.data
    try:
        cls = dataset_class(spec.dataset)
        options = dataset_options(spec.dataset)
    except FedkdError as exc:
        raise ScenarioError(path, "data.dataset", str(exc)) from None
    if options is not None:
        for key in spec.options:
            if key not in options:
                raise ScenarioError(path, f"data.options.{key}",
                                    f"unknown option for dataset {spec.dataset!r}; expected one of {sorted(options)}")
    _check_option_types(cls, spec.options, path)
    try:
        dataset = load_dataset(spec.dataset, spec.options, scenario.seed)
    except DatasetOptionError as exc:
        raise ScenarioError(path, f"data.options.{exc.key}", str(exc)) from None
    except Exception as exc:  # noqa: BLE001 - the user's constructor, whatever it raises, in one line
        # A dataset that checks its options less politely than ours: still one line, with a key.
        key = _option_named(spec.options, str(exc)) or ("data.options" if spec.options else "data.dataset")
        text = str(exc) if isinstance(exc, FedkdError) else \
            f"dataset {spec.dataset!r} refused its options: {type(exc).__name__}: {exc}"
        raise ScenarioError(path, key, text) from None
    try:
        check_dataset(dataset)
    except FedkdError as exc:
        raise ScenarioError(path, "data.dataset", f"{spec.dataset}: {exc}") from None
    return dataset


def _check_option_types(cls: type, options: dict[str, Any], path: str) -> None:
    """Each ``data.options`` value against the type the dataset's constructor declares."""
    from pydantic import TypeAdapter, ValidationError

    try:
        hints = typing.get_type_hints(cls.__init__)
    except Exception:  # noqa: BLE001 - unreadable hints (a third-party class): nothing to check against
        return
    for key, value in options.items():
        if key in hints:
            try:
                TypeAdapter(hints[key]).validate_python(value, strict=True)
            except ValidationError:
                expected = getattr(hints[key], "__name__", None) or str(hints[key]).replace("typing.", "")
                raise ScenarioError(path, f"data.options.{key}", f"expected {expected} (got {value!r})") from None
            except Exception:  # noqa: BLE001 - an annotation pydantic cannot check
                continue


def _option_named(options: dict[str, Any], message: str) -> str | None:
    """The ``data.options`` key a dataset's error message is about, if it names one."""
    for key, value in options.items():
        named = message.startswith(f"{key}=")
        if isinstance(value, str) and value:
            named = named or message.startswith((value, str(Path(value))))
        if named:
            return f"data.options.{key}"
    return None


def check_dataset(dataset: Dataset) -> None:
    """A FedkdError saying what is wrong if ``dataset`` breaks the interface.

    Reads every split once: O(samples) for the label, domain and finiteness
    checks, which is what loading them costs anyway.
    """
    specs = _check_declarations(dataset)
    for which in SPLIT_NAMES:
        try:
            split = dataset.split(which)
        except FedkdError as exc:
            raise FedkdError(f"split({which!r}): {exc}") from None
        except Exception as exc:  # noqa: BLE001 - the user's split(), reported in one line
            raise FedkdError(f"split({which!r}) failed: {type(exc).__name__}: {exc}") from None
        _check_split(which, split, specs, dataset.num_classes)


def _check_declarations(dataset: Dataset) -> dict[str, ModalitySpec]:
    modalities = getattr(dataset, "modalities", None)
    if not isinstance(modalities, (tuple, list)) or not modalities:
        raise FedkdError(f"`modalities` must be a non-empty tuple of ModalitySpec, got {modalities!r}")
    specs: dict[str, ModalitySpec] = {}
    for m in modalities:
        if not isinstance(m, ModalitySpec):
            raise FedkdError(f"`modalities` holds {m!r}; expected ModalitySpec(name, shape, kind)")
        if not isinstance(m.name, str) or not m.name or "+" in m.name:
            raise FedkdError(f"modality name {m.name!r}: expected a non-empty string without '+'")
        if m.name in specs:
            raise FedkdError(f"modality {m.name!r} is declared twice")
        if m.kind not in SAMPLE_DIMS:
            raise FedkdError(f"modality {m.name!r}: kind {m.kind!r}, expected 'image' or 'series'")
        shape = tuple(m.shape)
        if len(shape) != SAMPLE_DIMS[m.kind] or not all(isinstance(d, (int, np.integer)) and d > 0 for d in shape):
            expected = "(channels, height, width)" if m.kind == "image" else "(channels, length)"
            raise FedkdError(f"modality {m.name!r}: shape {shape}, expected positive {expected} for kind {m.kind!r}")
        smallest = MIN_IMAGE_SIDE if m.kind == "image" else MIN_SERIES_LENGTH
        if min(shape[1:]) < smallest:
            raise FedkdError(f"modality {m.name!r}: shape {shape} is too small; the {m.kind} encoder needs "
                             f"at least {smallest} along each axis after the channels")
        specs[m.name] = m
    classes = getattr(dataset, "classes", None)
    if not isinstance(classes, (tuple, list)) or len(classes) < 2:
        raise FedkdError(f"`classes` must name at least 2 classes, got {classes!r}")
    return specs


def _check_split(which: str, split: Any, specs: dict[str, ModalitySpec], num_classes: int) -> None:
    where = f"split {which!r}"
    if not isinstance(split, Split):
        raise FedkdError(f"{where}: split() returned {type(split).__name__}, expected fedkd.data.Split")
    labels = np.asarray(split.labels)
    n = len(labels)
    if n == 0:
        raise FedkdError(f"{where} is empty")
    if labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer):
        raise FedkdError(f"{where}: labels must be a 1-D integer array, got {labels.dtype} of shape {labels.shape}")
    if labels.min() < 0 or labels.max() >= num_classes:
        raise FedkdError(f"{where}: labels range over [{labels.min()}, {labels.max()}], expected "
                         f"[0, {num_classes - 1}] for {num_classes} classes")
    if set(split.inputs) != set(specs):
        missing, extra = sorted(set(specs) - set(split.inputs)), sorted(set(split.inputs) - set(specs))
        raise FedkdError(f"{where}: inputs have modalities {sorted(split.inputs)}, the dataset declares "
                         f"{list(specs)}" + (f" (missing {missing})" if missing else "")
                         + (f" (undeclared {extra})" if extra else ""))
    for name, spec in specs.items():
        arr = split.inputs[name]
        if not isinstance(arr, np.ndarray):
            raise FedkdError(f"{where}: modality {name!r} is a {type(arr).__name__}, expected a numpy array")
        if len(arr) != n:
            raise FedkdError(f"{where}: modality {name!r} has {len(arr)} samples, labels have {n}")
        if arr.shape[1:] != tuple(spec.shape):
            raise FedkdError(f"{where}: modality {name!r} has samples of shape {arr.shape[1:]}; "
                             f"its ModalitySpec says {tuple(spec.shape)}")
        if arr.dtype != np.float32:
            raise FedkdError(f"{where}: modality {name!r} is {arr.dtype}, expected float32")
        if not np.isfinite(arr).all():
            raise FedkdError(f"{where}: modality {name!r} holds NaN or infinite values")
    if split.domains is not None:
        domains = np.asarray(split.domains)
        if domains.shape != (n,) or not np.issubdtype(domains.dtype, np.integer) or domains.min() < 0:
            raise FedkdError(f"{where}: domains must be None or {n} non-negative integers, "
                             f"got {domains.dtype} of shape {domains.shape}")


def describe_data(scenario) -> str:
    """One line on the (already checked) dataset: modalities, classes, split sizes, partitioner."""
    from . import load_dataset

    ds = load_dataset(scenario.data.dataset, scenario.data.options, scenario.seed)
    modalities = ", ".join(f"{m.name} {m.kind} {tuple(m.shape)}" for m in ds.modalities)
    sizes = "/".join(f"{len(ds.split(s)):,}" for s in SPLIT_NAMES)
    dealt = scenario.data.partition.partitioner or "fedkd's lazy partitioner"
    return (f"  data {scenario.data.dataset}: {modalities}; {ds.num_classes} classes; "
            f"train/test/public {sizes} samples; dealt by {dealt}")
