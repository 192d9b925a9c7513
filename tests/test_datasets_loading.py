"""Datasets load like strategies (name, module:Class, file.py:Class, entry point), and a
dataset that breaks the interface is refused before the run: exit 2, one line, file and key."""
from __future__ import annotations

import sys
import textwrap

import numpy as np
import pytest

from fedkd.cli import main
from fedkd.data import DATASETS, dataset_class, load_dataset, registered_datasets
from fedkd.data.arrays import ArraysDataset
from fedkd.data.checks import check_dataset
from fedkd.errors import FedkdError

# A small, valid dataset; each test breaks one thing in it by replacing a line.
TOY = '''\
"""A toy paired dataset for the loading tests."""
import numpy as np

from fedkd.data import Dataset, ModalitySpec, Split


class Toy(Dataset):
    """Two modalities, three classes, 30 samples per split."""

    name = "toy"
    classes = ("a", "b", "c")

    def __init__(self, seed: int = 0, length: int = 8):
        self.modalities = (ModalitySpec("left", (2, length), "series"), ModalitySpec("right", (1, 4, 4), "image"))
        rng = np.random.default_rng(seed)
        labels = np.arange(30) % 3
        left = rng.standard_normal((30, 2, length)).astype(np.float32)
        right = rng.standard_normal((30, 1, 4, 4)).astype(np.float32)
        self._split = Split({"left": left, "right": right}, labels)

    def split(self, which):
        return self._split


class NotADataset:
    pass
'''


def toy_file(tmp_path, name: str = "toy.py", replace: tuple[str, str] | None = None):
    source = TOY if replace is None else TOY.replace(*replace)
    assert replace is None or source != TOY, "the replacement must change the file"
    path = tmp_path / "elsewhere" / name
    path.parent.mkdir(exist_ok=True)
    path.write_text(source)
    return path


def toy_scenario(tiny_scenario, dataset: str, options: dict | None = None) -> dict:
    tiny_scenario["data"] = {"dataset": dataset, "options": options or {},
                             "partition": {"samples_per_device": 10}, "test_samples": 30}
    tiny_scenario["population"]["classes"][0]["modalities"] = ["left"]
    tiny_scenario["population"]["classes"][1]["modalities"] = ["right"]
    return tiny_scenario


def validate(capsys, path) -> tuple[int, list[str]]:
    code = main(["validate", str(path)])
    return code, capsys.readouterr().err.strip().splitlines()


def test_the_built_in_names_include_arrays_and_huggingface():
    assert list(registered_datasets())[:5] == list(DATASETS)
    assert {"parking", "av_digits", "patch_folders", "arrays", "huggingface"} <= set(DATASETS)
    assert dataset_class("arrays") is ArraysDataset


def test_a_dataset_file_outside_the_repo_validates_and_runs(tmp_path, tiny_scenario, write_scenario, capsys):
    path = write_scenario(toy_scenario(tiny_scenario, f"{toy_file(tmp_path)}:Toy", {"length": 6}))

    assert main(["simulate", str(path), "--out", str(tmp_path / "out"), "--rounds", "1",
                 "--strategy", "fedavg"]) == 0

    dataset = load_dataset(f"{toy_file(tmp_path)}:Toy", {"length": 6}, 3)
    assert dataset.modality("left").shape == (2, 6)  # the option reached the constructor
    assert "Traceback" not in capsys.readouterr().err


def test_module_class_and_entry_point_names(tmp_path, monkeypatch):
    site = tmp_path / "site"
    info = site / "watch_plugin-0.1.dist-info"
    info.mkdir(parents=True)
    (site / "fedkd_toy_dataset_mod.py").write_text(TOY)
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: watch_plugin\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text(textwrap.dedent("""\
        [fedkd.datasets]
        toy_from_plugin = fedkd_toy_dataset_mod:Toy
        arrays = fedkd_toy_dataset_mod:Toy
    """))
    monkeypatch.syspath_prepend(str(site))
    try:
        by_module = dataset_class("fedkd_toy_dataset_mod:Toy")
        by_entry_point = dataset_class("toy_from_plugin")

        assert by_module is by_entry_point and by_module.__name__ == "Toy"
        assert "toy_from_plugin" in registered_datasets()
        assert dataset_class("arrays") is ArraysDataset  # a built-in keeps its name
    finally:
        sys.modules.pop("fedkd_toy_dataset_mod", None)


def test_a_dataset_without_a_seed_parameter_is_built_without_one(tmp_path):
    path = toy_file(tmp_path, "seedless.py", ("def __init__(self, seed: int = 0, length: int = 8):",
                                              "def __init__(self, length: int = 8):\n        seed = 0"))

    assert load_dataset(f"{path}:Toy", {}, seed=5).modality_names == ("left", "right")


# (replacement in TOY, dataset name suffix, options, key in the error, text in the error)
BROKEN = {
    "unknown name": (None, "parkin", {}, "data.dataset", "unknown dataset 'parkin'; expected one of ['arrays', "),
    "missing file": (None, "no_such.py:Toy", {}, "data.dataset", "dataset file"),
    "missing class": (None, ":Toys", {}, "data.dataset", "has no dataset class 'Toys'; it defines ['Toy']"),
    "not a dataset": (None, ":NotADataset", {}, "data.dataset", "is not a fedkd dataset"),
    "unknown option": (None, ":Toy", {"lenght": 6}, "data.options.lenght", "expected one of ['length']"),
    "option type": (None, ":Toy", {"length": "6"}, "data.options.length", "expected int (got '6')"),
    "constructor refuses": (("self.modalities =", "if length < 4:\n            raise ValueError(f'length={length}: "
                                                 "too short')\n        self.modalities ="),
                            ":Toy", {"length": 3}, "data.options.length", "length=3: too short"),
    "lengths differ": (("labels = np.arange(30) % 3", "labels = np.arange(29) % 3"), ":Toy", {},
                       "data.dataset", "ValueError: modality 'left' has 30 samples, labels have 29"),
    "missing modality": (('Split({"left": left, "right": right}', 'Split({"left": left}'), ":Toy", {},
                         "data.dataset", "the dataset declares ['left', 'right'] (missing ['right'])"),
    "wrong shape": (("(30, 2, length)", "(30, 2, length + 1)"), ":Toy", {}, "data.dataset",
                    "modality 'left' has samples of shape (2, 9); its ModalitySpec says (2, 8)"),
    "float64": (("(30, 1, 4, 4)).astype(np.float32)", "(30, 1, 4, 4))"), ":Toy", {}, "data.dataset",
                "modality 'right' is float64, expected float32"),
    "label past the classes": (("np.arange(30) % 3", "np.arange(30) % 4"), ":Toy", {}, "data.dataset",
                               "labels range over [0, 3], expected [0, 2] for 3 classes"),
    "bad kind": (('(1, 4, 4), "image"', '(1, 4, 4), "video"'), ":Toy", {}, "data.dataset",
                 "kind 'video', expected 'image' or 'series'"),
}


@pytest.mark.parametrize("case", list(BROKEN))
def test_a_broken_dataset_is_one_line_naming_file_and_key(case, tmp_path, tiny_scenario, write_scenario, capsys):
    replace, suffix, options, key, text = BROKEN[case]
    file = toy_file(tmp_path, replace=replace)
    name = (str(tmp_path / suffix) if suffix.endswith(".py:Toy") else
            f"{file}{suffix}" if suffix.startswith(":") else suffix)
    path = write_scenario(toy_scenario(tiny_scenario, name, options))

    code, lines = validate(capsys, path)

    assert code == 2 and len(lines) == 1, lines
    assert lines[0].startswith(f"fedkd: error: {path}: {key}: "), lines[0]
    assert text in lines[0], lines[0]


def test_check_dataset_accepts_every_built_in_it_can_build():
    for name, options in [("av_digits", {}), ("parking", {})]:
        check_dataset(load_dataset(name, options, seed=0))  # raises if a built-in broke the interface


def test_a_nan_is_refused(tmp_path):
    path = toy_file(tmp_path, "nan.py", ("self._split = Split(", "left[3, 0, 0] = np.nan\n        self._split = Split("))

    with pytest.raises(FedkdError, match="modality 'left' holds NaN or infinite values"):
        check_dataset(load_dataset(f"{path}:Toy", {}, seed=0))


def test_the_split_of_a_test_dataset_is_checked_as_it_is(tmp_path):
    dataset = load_dataset(f"{toy_file(tmp_path, 'ok.py')}:Toy", {}, seed=0)

    check_dataset(dataset)  # the valid toy passes as written
    assert dataset.num_classes == 3 and np.array_equal(np.bincount(dataset.split("train").labels), [10, 10, 10])
