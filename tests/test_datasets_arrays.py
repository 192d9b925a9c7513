"""The `arrays` dataset: .npz / parquet / CSV mapped to modalities, labels, domains and splits."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from fedkd.cli import main
from fedkd.data import load_dataset
from fedkd.data.base import DatasetOptionError
from fedkd.data.checks import check_dataset

N, T = 40, 8  # 4 classes x 10 samples


def recording() -> tuple[np.ndarray, np.ndarray]:
    """(N, 6, T) with value = 1000 * sample + 100 * channel + step, so every slice is recognisable."""
    imu = (1000 * np.arange(N)[:, None, None] + 100 * np.arange(6)[None, :, None]
           + np.arange(T)[None, None, :]).astype(np.float64)
    return imu, np.arange(N) % 4


@pytest.fixture
def npz(tmp_path):
    imu, labels = recording()
    path = tmp_path / "watch.npz"
    split = np.where(np.arange(N) < 30, "train", np.where(np.arange(N) < 35, "test", "public"))
    np.savez(path, imu=imu, label=labels, wearer=np.arange(N) % 2 * 7, split=split,
             flat=np.arange(N * 16, dtype=np.float64).reshape(N, 16), hwc=np.zeros((N, 4, 4, 3)))
    return path


def build(file, **options):
    options.setdefault("labels", "label")
    options.setdefault("modalities", {"accel": {"array": "imu", "channels": [0, 1, 2]},
                                      "gyro": {"array": "imu", "channels": [3, 4, 5]}})
    return load_dataset("arrays", {"path": str(file), **options}, seed=0)


def test_one_six_channel_recording_becomes_two_three_channel_modalities(npz):
    dataset = build(npz)
    check_dataset(dataset)
    train = dataset.split("train")

    assert [(m.name, m.shape, m.kind) for m in dataset.modalities] == [("accel", (3, T), "series"),
                                                                          ("gyro", (3, T), "series")]
    assert dataset.classes == ("0", "1", "2", "3")
    sample = train.inputs["gyro"][0]
    row = int(sample[0, 0]) // 1000  # which recording this training sample is
    assert sample.dtype == np.float32 and sample[:, 0].tolist() == [1000 * row + 300, 1000 * row + 400, 1000 * row + 500]
    assert train.inputs["accel"][0][:, 0].tolist() == [1000 * row, 1000 * row + 100, 1000 * row + 200]
    assert train.labels[0] == row % 4
    # Stratified by label: each class of 10 gives 2 test, 2 public, 6 train samples.
    assert [len(dataset.split(s)) for s in ("train", "test", "public")] == [24, 8, 8]
    rows = [set((dataset.split(s).inputs["accel"][:, 0, 0] // 1000).astype(int)) for s in ("train", "test", "public")]
    assert set.union(*rows) == set(range(N)) and sum(len(r) for r in rows) == N  # disjoint, complete


def test_the_split_array_places_every_row_and_domains_are_dense(npz):
    dataset = build(npz, split="split", domains="wearer")

    for which, rows in [("train", range(0, 30)), ("test", range(30, 35)), ("public", range(35, 40))]:
        split = dataset.split(which)
        assert (split.inputs["accel"][:, 0, 0] // 1000).astype(int).tolist() == list(rows)
        assert split.domains.tolist() == [r % 2 for r in rows]  # wearer 0 and 7 -> domains 0 and 1
    assert dataset.domain_names == ("0", "7")


def test_a_split_left_empty_is_cut_from_train(tmp_path):
    imu, labels = recording()
    path = tmp_path / "two.npz"
    np.savez(path, imu=imu, label=labels, split=np.where(np.arange(N) < 32, "train", "test"))

    dataset = build(path, split="split", public_fraction=0.25)

    # 32 train rows, 8 per class; a quarter of each class (2) goes to public.
    assert [len(dataset.split(s)) for s in ("train", "test", "public")] == [24, 8, 8]
    assert np.bincount(dataset.split("public").labels).tolist() == [2, 2, 2, 2]


def test_names_as_labels_shape_and_channels_last(tmp_path):
    names = np.array(["walk", "run", "sit", "bike"])[np.arange(N) % 4]
    path = tmp_path / "named.npz"
    np.savez(path, flat=np.arange(N * 16, dtype=np.float64).reshape(N, 16), hwc=np.ones((N, 4, 4, 3)),
             vec=np.ones((N, 5)), label=names)

    dataset = build(path, classes=["sit", "walk", "run", "bike"], modalities={
        "grey": {"array": "flat", "shape": [1, 4, 4]},
        "colour": {"array": "hwc", "channels_last": True},
        "features": "vec"})

    assert [(m.name, m.shape, m.kind) for m in dataset.modalities] == [
        ("grey", (1, 4, 4), "image"), ("colour", (3, 4, 4), "image"), ("features", (1, 5), "series")]
    train = dataset.split("train")
    assert dataset.classes == ("sit", "walk", "run", "bike")
    first = int(train.inputs["grey"][0, 0, 0, 0]) // 16  # row of the first train sample
    assert train.labels[0] == ["sit", "walk", "run", "bike"].index(names[first])


def test_standardize_uses_train_statistics_only(npz):
    dataset = build(npz, standardize=True)
    train, test = dataset.split("train").inputs["accel"], dataset.split("test").inputs["accel"]

    assert np.allclose(train.mean(axis=(0, 2)), 0, atol=1e-4) and np.allclose(train.std(axis=(0, 2)), 1, atol=1e-4)
    assert not np.allclose(test.mean(axis=(0, 2)), 0, atol=1e-2)  # test rows are other recordings


def test_parquet_list_and_scalar_columns_and_csv(tmp_path):
    imu, labels = recording()
    frame = pd.DataFrame({"accel": [row[:3].tolist() for row in imu], "ax": imu[:, 0, 0], "ay": imu[:, 1, 0],
                          "label": labels})
    frame.to_parquet(tmp_path / "watch.parquet")
    frame[["ax", "ay", "label"]].to_csv(tmp_path / "watch.csv", index=False)

    from_parquet = build(tmp_path / "watch.parquet", modalities={"accel": "accel", "point": {"columns": ["ax", "ay"]}})
    from_csv = build(tmp_path / "watch.csv", modalities={"point": {"columns": ["ax", "ay"]}})

    assert from_parquet.modality("accel").shape == (3, T) and from_parquet.modality("point").shape == (1, 2)
    train = from_parquet.split("train")
    assert np.array_equal(train.inputs["point"][:, 0, 0], train.inputs["accel"][:, 0, 0])  # ax = channel 0, step 0
    assert np.array_equal(from_csv.split("test").inputs["point"], from_parquet.split("test").inputs["point"])


@pytest.mark.parametrize("options, key, text", [
    ({"path": "nowhere.npz"}, "path", "nowhere.npz: no such file"),
    ({"modalities": {"accel": {"array": "imu2"}}}, "modalities.accel.array", "has no array 'imu2'; it has"),
    ({"modalities": {"accel": {"array": "imu", "channels": [5, 6]}}}, "modalities.accel.channels",
     "channels [6] out of range: samples have 6 channels (0-5)"),
    ({"modalities": {"accel": {"array": "imu", "chanels": [0]}}}, "modalities.accel.chanels", "unknown key"),
    ({"modalities": {"accel": {"array": "imu", "columns": ["imu"]}}}, "modalities.accel", "exactly one of"),
    ({"modalities": {"accel": {"array": "imu", "shape": [5, 5]}}}, "modalities.accel.shape", "cannot be reshaped"),
    ({"modalities": {"accel": {"array": "imu", "kind": "image"}}}, "modalities.accel.kind", "image expected"),
    ({"classes": ["a", "b"]}, "classes", "2 class names, but labels go up to 3"),
    ({"split": "label"}, "split", "expected 'train', 'test' or 'public'"),
])
def test_bad_options_name_their_key(npz, options, key, text):
    with pytest.raises(DatasetOptionError) as info:
        build(npz, **options)

    assert info.value.key == key and text in str(info.value), (info.value.key, str(info.value))


def test_a_malformed_npz_gives_exit_2_and_one_line_with_file_and_key(npz, tiny_scenario, write_scenario, capsys):
    tiny_scenario["data"]["dataset"] = "arrays"
    tiny_scenario["data"]["options"] = {"path": str(npz), "labels": "label",
                                        "modalities": {"audio": {"array": "imu", "channels": [0, 9]}}}
    tiny_scenario["population"]["classes"][1]["modalities"] = ["audio"]
    path = write_scenario(tiny_scenario)

    code = main(["validate", str(path)])
    lines = capsys.readouterr().err.strip().splitlines()

    assert code == 2 and len(lines) == 1
    assert lines[0].startswith(f"fedkd: error: {path}: data.options.modalities.audio.channels: channels [9]")
