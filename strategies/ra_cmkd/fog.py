"""Cross-modal ensembles at the fog tier, and how the cloud merges fogs.

On the paired public set every sample has every modality, so a camera model's
prediction on sample i and a sensor model's prediction on the same sample i
are about the same stall at the same moment. A fog node therefore teaches
each modality's students with the *other* modalities' models (camera teaches
sensor and the other way round), each teacher counted by its confidence on
that sample, plus, at a lower weight, the student's own-modality peers. The
two modalities make different mistakes, so each covers the other's blind
spots. All functions here are numpy over (devices, samples, classes).
"""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from fedkd.distill import softmax


def confidence(probs: np.ndarray) -> np.ndarray:
    """A teacher's confidence per sample: 1 minus its normalised entropy, in [0, 1].

    Entropy rather than the max probability, so that with many classes a
    teacher torn between two is still trusted more than one that is uniform.
    """
    classes = probs.shape[-1]
    entropy = -(probs * np.log(np.clip(probs, 1e-12, 1.0))).sum(-1)
    return 1.0 - entropy / np.log(classes)


def reliability(logits: np.ndarray, modality: Sequence[str], labels: np.ndarray) -> dict[str, float]:
    """How far above chance each modality's mean prediction is on labelled public samples.

    0 for a modality no better than chance (its models have not learnt yet, or
    its sensor cannot tell the classes apart), 1 for a perfect one. A fog holds
    the public set with its labels, so it can check its teachers before
    trusting them: a collapsed model is confident, and confidence alone would
    let it teach its nonsense to the other modality.
    """
    classes = logits.shape[-1]
    probs = softmax(logits)
    mods = np.asarray(modality)
    out = {}
    for m in dict.fromkeys(modality):
        accuracy = float((probs[mods == m].mean(0).argmax(-1) == labels).mean())
        out[m] = max(0.0, (accuracy - 1.0 / classes) / (1.0 - 1.0 / classes))
    return out


def cross_modal_targets(logits: np.ndarray, modality: Sequence[str], weights: np.ndarray,
                        peer_weight: float = 0.25, temperature: float = 1.0,
                        trust: dict[str, float] | None = None) -> dict[str, np.ndarray]:
    """Targets for the students of each modality present.

    ``logits`` is (devices, samples, classes); ``modality[d]`` is the modality
    device d predicted with; ``weights[d]`` its sample count. For students of
    modality m, a teacher of another modality counts ``weights[d] *
    confidence``; a teacher of modality m counts ``peer_weight`` times that.
    With a single modality present, peers are all there is. ``trust`` (per
    modality, e.g. from :func:`reliability`) scales every teacher of that
    modality; missing modalities count 1.
    """
    probs = softmax(logits, temperature)
    mods = np.asarray(modality)
    per_teacher = np.array([1.0 if trust is None else trust.get(m, 1.0) for m in modality])
    trust = confidence(probs) * (np.asarray(weights, dtype=np.float64) * per_teacher)[:, None]  # (devices, samples)
    targets = {}
    for m in dict.fromkeys(modality):
        same = mods == m
        scale = np.where(same, peer_weight if (~same).any() else 1.0, 1.0)[:, None]
        w = trust * scale
        total = w.sum(0, keepdims=True)
        # A sample no teacher is confident about falls back to a plain mean.
        w = np.where(total > 0, w / np.where(total > 0, total, 1.0), 1.0 / len(w))
        targets[m] = np.einsum("ds,dsc->sc", w, probs)
    return targets


def merge_fog_targets(fog_targets: Sequence[dict[str, np.ndarray]], fog_weights: Sequence[float]
                      ) -> dict[str, np.ndarray]:
    """The cloud's view: per modality, the weighted mean of the fogs' targets."""
    merged: dict[str, list[tuple[float, np.ndarray]]] = {}
    for targets, weight in zip(fog_targets, fog_weights):
        for m, t in targets.items():
            merged.setdefault(m, []).append((float(weight), t))
    return {m: sum(w * t for w, t in items) / sum(w for w, _ in items) for m, items in merged.items()}


def blend(local: dict[str, np.ndarray], cloud: dict[str, np.ndarray], cloud_share: float) -> dict[str, np.ndarray]:
    """What a fog sends its devices: its own targets mixed with the cloud's."""
    out = {}
    for m in set(local) | set(cloud):
        if m in local and m in cloud:
            out[m] = (1 - cloud_share) * local[m] + cloud_share * cloud[m]
        else:
            out[m] = local.get(m, cloud.get(m))
    return out
