"""Markov-modulated link and compute quality, vectorised over the population.

A device class may list quality states (say good / degraded / bad), each with
a mean duration and multipliers of the class's bandwidth and compute speed.
Each device sits in one state; it leaves it after an exponential time with
that state's mean and jumps to one of the other states with equal
probability. With such jumps the chain is reversible and spends a share of
time in each state proportional to its mean duration, which is how devices
start. Between tasks the chain evolves in closed form over the elapsed span
(the matrix exponential of its generator, one small matrix per class), so a
million devices cost a few numpy arrays. During a task its state holds.
"""
from __future__ import annotations

import numpy as np
from scipy.linalg import expm

from ..scenario import DeviceClassSpec
from ..seeding import hashed_uniform


class QualityChains:
    def __init__(self, classes: list[DeviceClassSpec], class_index: np.ndarray, seed: int):
        self.seed, self.class_index = seed, class_index
        states = [c.quality or [] for c in classes]
        self.size = max(1, max(len(s) for s in states))  # states per class, padded
        # Classes without states have one state with both factors 1.
        self.bandwidth = np.ones((len(classes), self.size))
        self.compute = np.ones((len(classes), self.size))
        self.generators = []
        stationary = np.zeros((len(classes), self.size))
        stationary[:, 0] = 1.0
        for k, spec in enumerate(states):
            n = len(spec)
            q = np.zeros((self.size, self.size))
            if n > 1:
                self.bandwidth[k, :n] = [s.bandwidth_factor for s in spec]
                self.compute[k, :n] = [s.compute_factor for s in spec]
                exit_rate = np.array([1 / s.mean_duration_s for s in spec])
                q[:n, :n] = exit_rate[:, None] / (n - 1)
                q[np.arange(n), np.arange(n)] = -exit_rate
                durations = np.array([s.mean_duration_s for s in spec])
                stationary[k] = 0.0
                stationary[k, :n] = durations / durations.sum()
            elif n == 1:
                self.bandwidth[k, 0] = spec[0].bandwidth_factor
                self.compute[k, 0] = spec[0].compute_factor
            self.generators.append(q)
        self.modulated = any(len(s) > 1 for s in states)
        ids = np.arange(len(class_index))
        self.state = self._draw(np.cumsum(stationary, axis=1)[class_index], hashed_uniform(ids, seed, "quality", 0))

    @staticmethod
    def _draw(cdf: np.ndarray, uniform: np.ndarray) -> np.ndarray:
        # Inverse CDF per row; the clip guards against cumulative sums just below 1.
        return np.minimum((uniform[:, None] >= cdf).sum(axis=1), cdf.shape[1] - 1).astype(np.int8)

    def evolve(self, span_s: float, who: np.ndarray, *draw_key: object) -> None:
        """Let ``span_s`` pass for the devices in mask ``who``."""
        if not self.modulated or span_s <= 0:
            return
        # CDF of the next state for each (class, state): a few numbers, gathered per device.
        cdf = np.cumsum(np.stack([expm(q * span_s) for q in self.generators]), axis=2)
        uniform = hashed_uniform(np.arange(len(self.state)), self.seed, "quality", *draw_key)
        self.state = np.where(who, self._draw(cdf[self.class_index, self.state], uniform), self.state)

    def bridge(self, before: np.ndarray, after: np.ndarray, into_s: float, span_s: float,
               *draw_key: object) -> np.ndarray:
        """States ``into_s`` into a span of ``span_s`` that went from ``before`` to ``after``.

        A Markov bridge: P(j | i, k) is proportional to P_ij(into) P_jk(rest). It lets
        telemetry look inside a span without drawing the span differently.
        """
        if not self.modulated or into_s <= 0:
            return before
        if into_s >= span_s:
            return after
        first = np.stack([expm(q * into_s) for q in self.generators])
        rest = np.stack([expm(q * (span_s - into_s)) for q in self.generators])
        weight = first[self.class_index, before] * rest[self.class_index, :, after]
        cdf = np.cumsum(weight / weight.sum(axis=1, keepdims=True), axis=1)
        uniform = hashed_uniform(np.arange(len(before)), self.seed, "quality-bridge", *draw_key)
        return self._draw(cdf, uniform)

    def get_state(self) -> dict:
        """Each device's current state, for checkpoints (the rest follows from the scenario)."""
        return {"state": self.state.copy()}

    def set_state(self, state: dict) -> None:
        self.state = np.array(state["state"], dtype=np.int8)

    def bandwidth_factor(self, ids: np.ndarray, state: np.ndarray | None = None) -> np.ndarray:
        return self.bandwidth[self.class_index[ids], (self.state if state is None else state)[ids]]

    def compute_factor(self, ids: np.ndarray, state: np.ndarray | None = None) -> np.ndarray:
        return self.compute[self.class_index[ids], (self.state if state is None else state)[ids]]
