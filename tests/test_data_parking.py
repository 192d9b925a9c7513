"""Tests for the synthetic parking world (fedkd.data.parking)."""
from __future__ import annotations

import numpy as np
import pytest

from fedkd.data.base import Split
from fedkd.data.parking import ParkingWorld


@pytest.fixture(scope="module")
def world() -> ParkingWorld:
    return ParkingWorld(seed=0, train_size=1500, test_size=600, public_size=300)


def _ridge_errors(train: Split, test: Split, modality: str) -> np.ndarray:
    """Errors of a ridge least-squares classifier on raw values (plus squares for images)."""
    def feats(s: Split) -> np.ndarray:
        x = s.inputs[modality].reshape(len(s), -1).astype(np.float64)
        if modality == "camera":  # bright and dark cars both differ from asphalt
            x = np.concatenate([x, x**2], axis=1)
        return np.concatenate([x, np.ones((len(s), 1))], axis=1)

    x = feats(train)
    w = np.linalg.solve(x.T @ x + np.eye(x.shape[1]), x.T @ (2.0 * train.labels - 1.0))
    return (feats(test) @ w > 0) != test.labels.astype(bool)


def test_shapes_dtypes_and_ranges(world: ParkingWorld) -> None:
    # Execute
    split = world.split("train")
    # Assert
    assert world.modality("camera").shape == (1, 16, 16) and world.modality("camera").kind == "image"
    assert world.modality("sensor").shape == (2, 32) and world.modality("sensor").kind == "series"
    assert world.classes == ("free", "occupied")
    assert len(split) == 1500 and len(world.split("test")) == 600 and len(world.split("public")) == 300
    cam, sen = split.inputs["camera"], split.inputs["sensor"]
    assert cam.shape == (1500, 1, 16, 16) and cam.dtype == np.float32
    assert sen.shape == (1500, 2, 32) and sen.dtype == np.float32
    assert split.labels.dtype == np.int64 and set(np.unique(split.labels)) == {0, 1}
    assert cam.min() >= 0.0 and cam.max() <= 1.0 and np.isfinite(sen).all()
    assert split.domains is not None and split.domains.min() >= 0 and split.domains.max() < world.num_cameras
    assert len(np.unique(split.domains)) == world.num_cameras


def test_constructor_sizes_are_used() -> None:
    # Prepare
    w = ParkingWorld(seed=3, num_cameras=3, patch_px=12, sensor_steps=20, train_size=40)
    # Execute
    split = w.split("train")
    # Assert
    assert split.inputs["camera"].shape == (40, 1, 12, 12) and split.inputs["sensor"].shape == (40, 2, 20)
    assert split.domains.max() < 3
    assert w.split("train") is split  # cached


def test_same_seed_is_deterministic_and_seeds_differ() -> None:
    # Prepare
    a, b, c = (ParkingWorld(seed=s, train_size=200) for s in (7, 7, 8))
    # Execute
    sa, sb, sc = a.split("train"), b.split("train"), c.split("train")
    # Assert
    for m in ("camera", "sensor"):
        np.testing.assert_array_equal(sa.inputs[m], sb.inputs[m])
        assert not np.allclose(sa.inputs[m], sc.inputs[m])
    np.testing.assert_array_equal(sa.labels, sb.labels)
    np.testing.assert_array_equal(sa.domains, sb.domains)
    assert not np.array_equal(sa.domains, sc.domains)


def test_splits_differ(world: ParkingWorld) -> None:
    # Execute
    train, test = world.split("train"), world.split("test")
    # Assert
    assert not np.allclose(train.inputs["camera"][:100], test.inputs["camera"][:100])


def test_generate_is_lazy_and_matches_full_split(world: ParkingWorld) -> None:
    # Prepare: a world with a smaller train split must give the same sample i
    small = ParkingWorld(seed=0, train_size=1000)
    full = world.split("train")
    idx = [5, 17, 600, 5]
    # Execute
    part, part_small = world.generate("train", idx), small.generate("train", idx)
    # Assert
    for got in (part, part_small):
        for m in ("camera", "sensor"):
            np.testing.assert_array_equal(got.inputs[m], full.inputs[m][idx])
        np.testing.assert_array_equal(got.labels, full.labels[idx])
        np.testing.assert_array_equal(got.domains, full.domains[idx])
    assert len(world.generate("test", [])) == 0


def test_bad_split_or_index_raises(world: ParkingWorld) -> None:
    # Execute / Assert
    with pytest.raises(ValueError):
        world.generate("validation", [0])
    with pytest.raises(IndexError):
        world.generate("test", [600])
    with pytest.raises(ValueError):
        world.camera_indices("train", world.num_cameras)


@pytest.mark.parametrize("rate", [0.5, 0.2])
def test_class_balance_follows_occupancy_rate(rate: float) -> None:
    # Prepare
    w = ParkingWorld(seed=1, train_size=3000, occupancy_rate=rate)
    # Execute
    labels = w.generate("train", np.arange(0, 3000, 2)).labels
    # Assert
    assert abs(labels.mean() - rate) < 0.04


def test_camera_ids_are_cheap_and_selectable(world: ParkingWorld) -> None:
    # Prepare
    full = world.split("public")
    # Execute
    domains = world.sample_domain("public", np.arange(300))
    idx = world.camera_indices("public", 2)
    only2 = world.generate_for_camera("public", 2)
    # Assert
    np.testing.assert_array_equal(domains, full.domains)
    np.testing.assert_array_equal(idx, np.flatnonzero(full.domains == 2))
    assert len(only2) == len(idx) > 0 and (only2.domains == 2).all()
    np.testing.assert_array_equal(only2.inputs["camera"], full.inputs["camera"][idx])


def test_camera_domain_shift_is_real(world: ParkingWorld) -> None:
    # Prepare
    split = world.split("train")
    brightness = split.inputs["camera"].mean(axis=(1, 2, 3))
    # Execute
    per_camera = [brightness[split.domains == c] for c in range(world.num_cameras)]
    means = np.array([b.mean() for b in per_camera])
    stderr = max(b.std() / np.sqrt(len(b)) for b in per_camera)
    # Assert: cameras differ by far more than sampling noise
    assert means.max() - means.min() > 0.05
    assert means.max() - means.min() > 10 * stderr


def test_modalities_err_on_different_samples(world: ParkingWorld) -> None:
    # Execute
    train, test = world.split("train"), world.split("test")
    cam_err, sen_err = (_ridge_errors(train, test, m) for m in ("camera", "sensor"))
    # Assert: both learn something, neither is trivial, and their mistakes mostly differ
    for err in (cam_err, sen_err):
        assert 0.05 < err.mean() < 0.45
    assert (cam_err & ~sen_err).sum() > 20 and (sen_err & ~cam_err).sum() > 20
    assert (cam_err & sen_err).sum() / (cam_err | sen_err).sum() < 0.35


def test_difficulty_zero_makes_the_sensor_easy() -> None:
    # Prepare
    easy, hard = ParkingWorld(seed=2, test_size=500, difficulty=0.0), ParkingWorld(seed=2, test_size=500)

    def threshold_accuracy(w: ParkingWorld) -> float:
        s = w.split("test")
        dist_end_m = s.inputs["sensor"][:, 1, -4:].mean(axis=1)  # ultrasonic echo at the window's end
        return float(((dist_end_m < 1.0) == s.labels).mean())

    # Execute / Assert
    assert threshold_accuracy(easy) > 0.99
    assert threshold_accuracy(hard) < 0.9
