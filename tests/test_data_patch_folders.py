"""PatchFolderDataset on tiny generated fixtures in the CNRPark-EXT and PKLot layouts.

Free patches are dark and occupied ones bright, so a label can be checked
from the pixels alone.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import fedkd.data.patch_folders as patch_folders
from fedkd.data.base import SPLIT_NAMES
from fedkd.data.partition import Partitioner
from fedkd.data.patch_folders import PatchFolderDataset
from fedkd.errors import FedkdError
from fedkd.scenario import PartitionSpec

PER_GROUP = 5  # patches per (camera or lot, class)
DARK, BRIGHT = 30, 220


def write_patch(path: Path, occupied: bool, variant: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    level = (BRIGHT if occupied else DARK) + variant
    Image.new("RGB", (24, 20), (level, level, level)).save(path, "JPEG")


def make_cnrpark(root: Path, single_label_file: bool = False) -> dict[str, tuple[int, str]]:
    """Two cameras, two weathers; returns {relative path: (label, camera)}."""
    truth: dict[str, tuple[int, str]] = {}
    for camera_no, weather, date in ((1, "SUNNY", "2015-11-12"), (2, "RAINY", "2015-11-21")):
        for label in (0, 1):
            for k in range(PER_GROUP):
                rel = f"{weather}/{date}/camera{camera_no}/{weather[0]}_{date}_07.09_C0{camera_no}_{label}{k}.jpg"
                write_patch(root / "PATCHES" / rel, occupied=label == 1, variant=k)
                truth[rel] = (label, f"camera{camera_no}")
    (root / "LABELS").mkdir()
    if single_label_file:
        # Also exercise the accepted "PATCHES/" prefix on paths.
        lines = [f"PATCHES/{rel} {label}" for rel, (label, _) in truth.items()]
        (root / "LABELS" / "all.txt").write_text("\n".join(lines) + "\n")
    else:
        for camera in ("camera1", "camera2"):
            lines = [f"{rel} {label}" for rel, (label, cam) in truth.items() if cam == camera]
            (root / "LABELS" / f"{camera}.txt").write_text("\n".join(lines) + "\n")
    return truth


def make_pklot(root: Path) -> dict[str, tuple[int, str]]:
    """Two lots; returns {path relative to root: (label, lot)}."""
    truth: dict[str, tuple[int, str]] = {}
    for lot, weather, date in (("UFPR04", "Sunny", "2012-12-07"), ("PUCPR", "Cloudy", "2012-09-16")):
        for label, class_dir in ((0, "Empty"), (1, "Occupied")):
            for k in range(PER_GROUP):
                rel = f"{lot}/{weather}/{date}/{class_dir}/{date}_06_05_1{k}#00{label}.jpg"
                write_patch(root / rel, occupied=label == 1, variant=k)
                truth[rel] = (label, lot)
    return truth


def check_loaded(data: PatchFolderDataset, truth: dict[str, tuple[int, str]], base: Path) -> None:
    """Labels, domains, pixels and splits agree with the fixture's ground truth."""
    seen: list[str] = []
    for which in SPLIT_NAMES:
        split = data.split(which)
        rels = [p.relative_to(base).as_posix() for p in data.source_paths(which)]
        seen += rels
        assert split.inputs["camera"].shape == (len(rels), 1, 16, 16)
        assert split.inputs["camera"].dtype == np.float32 and split.labels.dtype == np.int64
        assert split.domains is not None and split.domains.dtype == np.int64
        assert split.labels.tolist() == [truth[r][0] for r in rels]
        names = split.meta["domain_names"]
        assert [names[d] for d in split.domains] == [truth[r][1] for r in rels]
        brightness = split.inputs["camera"].mean(axis=(1, 2, 3))
        assert np.array_equal(brightness > 0.5, split.labels == 1)
        # Stratified by (domain, class): every group of 5 gives 3 / 1 / 1.
        per_group = np.bincount(split.domains * 2 + split.labels, minlength=4)
        assert per_group.tolist() == [3 if which == "train" else 1] * 4
    assert sorted(seen) == sorted(truth)  # disjoint and complete


def test_cnrpark_per_camera_label_files(tmp_path: Path) -> None:
    # Prepare
    truth = make_cnrpark(tmp_path)
    # Execute
    data = PatchFolderDataset(tmp_path)
    # Assert
    assert data.layout == "cnrpark"
    assert data.domain_names == ("camera1", "camera2")
    assert data.modality("camera").shape == (1, 16, 16) and data.classes == ("free", "occupied")
    check_loaded(data, truth, tmp_path / "PATCHES")


def test_cnrpark_single_all_txt_with_patches_prefix(tmp_path: Path) -> None:
    # Prepare
    truth = make_cnrpark(tmp_path, single_label_file=True)
    # Execute
    data = PatchFolderDataset(tmp_path, layout="cnrpark")
    # Assert
    check_loaded(data, truth, tmp_path / "PATCHES")


def test_pklot_segmented(tmp_path: Path) -> None:
    # Prepare
    truth = make_pklot(tmp_path)
    # Execute
    data = PatchFolderDataset(tmp_path)
    # Assert
    assert data.layout == "pklot"
    assert data.domain_names == ("PUCPR", "UFPR04")
    check_loaded(data, truth, tmp_path)


def test_pklot_archive_top_folder_is_accepted(tmp_path: Path) -> None:
    # Prepare: the PKLot archive nests the patches in PKLotSegmented/.
    truth = make_pklot(tmp_path / "PKLotSegmented")
    # Execute
    data = PatchFolderDataset(tmp_path, layout="pklot")
    # Assert
    check_loaded(data, truth, tmp_path / "PKLotSegmented")


def test_other_image_size(tmp_path: Path) -> None:
    # Prepare
    make_pklot(tmp_path)
    # Execute
    split = PatchFolderDataset(tmp_path, image_size=8).split("test")
    # Assert
    assert split.inputs["camera"].shape[1:] == (1, 8, 8)


def test_seeded_splits(tmp_path: Path) -> None:
    # Prepare
    make_cnrpark(tmp_path)
    # Execute
    first, again, other = (PatchFolderDataset(tmp_path, seed=s) for s in (0, 0, 1))
    # Assert
    for which in SPLIT_NAMES:
        assert first.source_paths(which) == again.source_paths(which)
        assert np.array_equal(first.split(which).inputs["camera"], again.split(which).inputs["camera"])
    assert any(first.source_paths(w) != other.source_paths(w) for w in SPLIT_NAMES)


def test_images_are_read_once_on_first_split(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Prepare: count decodes.
    make_pklot(tmp_path)
    calls: list[Path] = []
    real_read = patch_folders.read_patch
    monkeypatch.setattr(patch_folders, "read_patch", lambda p, s: calls.append(p) or real_read(p, s))
    # Execute
    data = PatchFolderDataset(tmp_path)
    after_init = len(calls)
    for which in SPLIT_NAMES * 2:
        data.split(which)
    # Assert
    assert after_init == 0
    assert len(calls) == 4 * PER_GROUP
    assert data.split("train") is data.split("train")


def test_max_per_domain_class_subsamples_each_group(tmp_path: Path) -> None:
    # Prepare
    make_pklot(tmp_path)
    # Execute
    data = PatchFolderDataset(tmp_path, max_per_domain_class=3)
    # Assert
    groups = np.bincount(data.index.domains * 2 + data.index.labels, minlength=4)
    assert groups.tolist() == [3, 3, 3, 3]
    assert sum(len(data.split(w)) for w in SPLIT_NAMES) == 12


def _error_message(root: Path, **kwargs) -> str:
    with pytest.raises(FedkdError) as info:
        PatchFolderDataset(root, **kwargs)
    message = str(info.value)
    assert "\n" not in message
    return message


def test_missing_path_is_a_fedkd_error(tmp_path: Path) -> None:
    # Prepare
    root = tmp_path / "nowhere"
    # Execute
    message = _error_message(root)
    # Assert
    assert str(root) in message and "no such folder" in message


def test_empty_folder_is_a_fedkd_error(tmp_path: Path) -> None:
    # Prepare / Execute
    message = _error_message(tmp_path)
    # Assert
    assert str(tmp_path) in message and "empty" in message and "PATCHES" in message


def test_folder_in_neither_layout_is_a_fedkd_error(tmp_path: Path) -> None:
    # Prepare
    write_patch(tmp_path / "some" / "random.jpg", occupied=True, variant=0)
    # Execute
    message = _error_message(tmp_path)
    # Assert
    assert str(tmp_path) in message and "CNRPark-EXT" in message and "Empty|Occupied" in message


def test_forced_layout_that_does_not_match_is_a_fedkd_error(tmp_path: Path) -> None:
    # Prepare
    make_pklot(tmp_path)
    # Execute
    message = _error_message(tmp_path, layout="cnrpark")
    # Assert
    assert str(tmp_path) in message and "LABELS" in message


def test_bad_label_line_is_a_fedkd_error(tmp_path: Path) -> None:
    # Prepare
    make_cnrpark(tmp_path)
    with (tmp_path / "LABELS" / "camera1.txt").open("a") as f:
        f.write("SUNNY/2015-11-12/camera1/x.jpg busy\n")
    # Execute
    message = _error_message(tmp_path)
    # Assert
    assert "camera1.txt:" in message and "<0|1>" in message


def test_labelled_patch_missing_on_disk_is_a_fedkd_error(tmp_path: Path) -> None:
    # Prepare
    truth = make_cnrpark(tmp_path)
    (tmp_path / "PATCHES" / next(iter(truth))).unlink()
    # Execute
    message = _error_message(tmp_path)
    # Assert
    assert "1 labelled patches missing" in message


def test_unknown_layout_name_is_a_fedkd_error(tmp_path: Path) -> None:
    # Prepare
    make_pklot(tmp_path)
    # Execute / Assert
    assert "layout='parking'" in _error_message(tmp_path, layout="parking")


def test_partition_by_camera_deals_each_device_one_camera_without_overlap(tmp_path: Path) -> None:
    # Prepare: 12 train patches, 6 per camera; 4 devices of at least 2 patches each.
    make_cnrpark(tmp_path)
    train = PatchFolderDataset(tmp_path).split("train")
    spec = PartitionSpec(by_domain=True, disjoint=True, samples_per_device=3, quantity_sigma=0.0, min_samples=2)
    partitioner = Partitioner(spec, train.labels, train.domains, 2, seed=0, num_devices=4)
    # Execute
    shards = [partitioner.shard(i) for i in range(4)]
    # Assert
    for shard in shards:
        assert set(train.domains[shard.indices]) == {shard.domain}
    assert sorted(s.domain for s in shards) == [0, 0, 1, 1]  # two devices per camera: equal sizes
    flat = np.concatenate([s.indices for s in shards])
    assert len(flat) == len(set(flat.tolist())) == 12
