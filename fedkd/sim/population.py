"""The device population as columns, not objects.

Each device's class is a pure function of (seed, device id); per-class numbers
are looked up by index. A million devices cost a few numpy arrays, and no
Python object exists for a device that is never chosen.
"""
from __future__ import annotations

import numpy as np

from ..scenario import DeviceClassSpec, PopulationSpec
from ..seeding import hashed_uniform


class Population:
    def __init__(self, spec: PopulationSpec, seed: int):
        self.spec, self.seed = spec, seed
        self.size = spec.devices
        self.classes: list[DeviceClassSpec] = list(spec.classes)
        self._cum_share = np.cumsum([c.share for c in self.classes])
        self._cum_share[-1] = 1.0  # shares sum to 1 up to float error

    def class_index(self, device_ids: np.ndarray) -> np.ndarray:
        u = hashed_uniform(device_ids, self.seed, "device-class")
        return np.searchsorted(self._cum_share, u, side="right").astype(np.int16)

    def class_of(self, device_id: int) -> DeviceClassSpec:
        return self.classes[int(self.class_index(np.array([device_id]))[0])]

    def column(self, attribute: str, class_index: np.ndarray, missing: float = np.inf) -> np.ndarray:
        """Per-device values of a class attribute (``None`` becomes ``missing``)."""
        values = np.array([missing if getattr(c, attribute) is None else getattr(c, attribute)
                           for c in self.classes], dtype=np.float64)
        return values[class_index]
