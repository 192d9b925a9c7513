"""Cross-modal ensembles at the fog, worked by hand."""
from __future__ import annotations

import math

import numpy as np
import pytest

from fedkd.strategies.ra_cmkd.fog import blend, confidence, cross_modal_targets, merge_fog_targets, reliability


def logits_of(*rows) -> np.ndarray:
    return np.log(np.asarray(rows, dtype=np.float64))


def test_confidence_is_one_for_certain_and_zero_for_uniform():
    assert confidence(np.array([[1.0, 0.0], [0.5, 0.5]])) == pytest.approx([1.0, 0.0], abs=1e-9)


def test_camera_teaches_sensor_and_sensor_teaches_camera():
    # One sample, two devices: a camera sure of class 0 (p = [0.9, 0.1]) and a
    # sensor unsure (p = [0.4, 0.6]). Confidences: 1 - H/ln2 with
    # H(0.9, 0.1) = 0.3251 nats -> 0.5310; H(0.4, 0.6) = 0.6730 -> 0.0290.
    # Sensor students: camera weight 0.5310, own peer 0.25 * 0.0290 = 0.00725:
    # target_0 = (0.5310 * 0.9 + 0.00725 * 0.4) / (0.5310 + 0.00725) = 0.8933.
    logits = np.stack([logits_of([0.9, 0.1]), logits_of([0.4, 0.6])])
    targets = cross_modal_targets(logits, ["camera", "sensor"], np.ones(2), peer_weight=0.25)
    c_cam = 1 - (-(0.9 * math.log(0.9) + 0.1 * math.log(0.1))) / math.log(2)
    c_sen = 1 - (-(0.4 * math.log(0.4) + 0.6 * math.log(0.6))) / math.log(2)
    expected_sensor = (c_cam * 0.9 + 0.25 * c_sen * 0.4) / (c_cam + 0.25 * c_sen)
    expected_camera = (0.25 * c_cam * 0.9 + c_sen * 0.4) / (0.25 * c_cam + c_sen)
    assert targets["sensor"][0, 0] == pytest.approx(expected_sensor)
    assert targets["camera"][0, 0] == pytest.approx(expected_camera)
    assert expected_sensor == pytest.approx(0.8933, abs=1e-4)


def test_single_modality_uses_its_peers_at_full_weight():
    logits = np.stack([logits_of([0.9, 0.1]), logits_of([0.9, 0.1])])
    targets = cross_modal_targets(logits, ["sensor", "sensor"], np.ones(2))
    assert targets["sensor"][0] == pytest.approx([0.9, 0.1])


def test_cloud_merge_and_blend():
    fog_a = {"camera": np.array([[1.0, 0.0]])}
    fog_b = {"camera": np.array([[0.0, 1.0]]), "sensor": np.array([[0.5, 0.5]])}
    cloud = merge_fog_targets([fog_a, fog_b], [3.0, 1.0])
    assert cloud["camera"][0] == pytest.approx([0.75, 0.25])
    assert cloud["sensor"][0] == pytest.approx([0.5, 0.5])
    sent = blend(fog_b, cloud, cloud_share=0.5)
    assert sent["camera"][0] == pytest.approx([0.375, 0.625])


def test_reliability_is_accuracy_above_chance_and_silences_a_useless_modality():
    # Two samples with labels [0, 1]. The camera says class 0 for both (1 of 2 right:
    # chance for 2 classes -> 0); the sensor is right on both -> 1.
    logits = np.stack([logits_of([0.9, 0.1], [0.9, 0.1]), logits_of([0.8, 0.2], [0.3, 0.7])])
    trust = reliability(logits, ["camera", "sensor"], np.array([0, 1]))
    assert trust == {"camera": 0.0, "sensor": 1.0}
    # With the camera silenced, sensor students learn from their sensor peers alone.
    targets = cross_modal_targets(logits, ["camera", "sensor"], np.ones(2), trust=trust)
    assert targets["sensor"] == pytest.approx(np.array([[0.8, 0.2], [0.3, 0.7]]))
