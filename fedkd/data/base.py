"""The one dataset interface every fedkd dataset implements.

A dataset has named modalities, class names, and three splits:

- ``train``: what devices hold (a partitioner decides which samples and which
  modalities each device sees);
- ``test``: held-out samples for evaluation, all modalities present;
- ``public``: the shared proxy set on which logit-exchange strategies compare
  predictions; every sample carries every modality, so it also serves
  cross-modal distillation.

Samples are *paired*: index ``i`` of a split has one input per modality, all
showing the same class (and, where the dataset has them, the same domain).
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Literal

import numpy as np

from ..errors import FedkdError

SplitName = Literal["train", "test", "public"]
SPLIT_NAMES: tuple[SplitName, ...] = ("train", "test", "public")


@dataclass(frozen=True)
class ModalitySpec:
    """One modality: its name, the shape of one sample, and its encoder family.

    ``kind`` picks the encoder: ``"image"`` samples are ``(channels, height,
    width)``; ``"series"`` samples are ``(channels, length)``.
    """

    name: str
    shape: tuple[int, ...]
    kind: Literal["image", "series"]


@dataclass
class Split:
    """Paired samples: one float32 array per modality, int64 labels, optional domains."""

    inputs: dict[str, np.ndarray]
    labels: np.ndarray
    # Domain of each sample (e.g. which camera saw it); None when the dataset has none.
    domains: np.ndarray | None = None
    meta: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        n = len(self.labels)
        for name, arr in self.inputs.items():
            if len(arr) != n:
                raise ValueError(f"modality {name!r} has {len(arr)} samples, labels have {n}")
        if self.domains is not None and len(self.domains) != n:
            raise ValueError(f"domains has {len(self.domains)} entries, labels have {n}")

    def __len__(self) -> int:
        return len(self.labels)

    def subset(self, indices: np.ndarray) -> "Split":
        idx = np.asarray(indices, dtype=np.int64)
        return Split(
            inputs={k: v[idx] for k, v in self.inputs.items()},
            labels=self.labels[idx],
            domains=None if self.domains is None else self.domains[idx],
            meta=self.meta,
        )


class Dataset(ABC):
    """A multimodal classification dataset with train / test / public splits."""

    name: str
    modalities: tuple[ModalitySpec, ...]
    classes: tuple[str, ...]

    @abstractmethod
    def split(self, which: SplitName) -> Split:
        """Return one split. Implementations cache it: this is called often."""

    @property
    def modality_names(self) -> tuple[str, ...]:
        return tuple(m.name for m in self.modalities)

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def modality(self, name: str) -> ModalitySpec:
        for m in self.modalities:
            if m.name == name:
                return m
        raise KeyError(f"dataset {self.name!r} has no modality {name!r}; it has {self.modality_names}")


class DatasetOptionError(FedkdError):
    """An option a dataset cannot use. ``key`` is its path under ``data.options``
    (``modalities.accel.channels``), so the scenario error names the exact key."""

    def __init__(self, key: str, message: str):
        self.key = key
        super().__init__(message)
