"""Hugging Face datasets on local disk (`huggingface`) and Flower Datasets partitioners
(`data.partition.partitioner`), offline, on files each test writes itself."""
from __future__ import annotations

import os

import numpy as np
import pandas as pd
import pytest

os.environ["HF_DATASETS_OFFLINE"] = "1"  # never the Hub: everything here is local files
os.environ["HF_HUB_OFFLINE"] = "1"
datasets = pytest.importorskip("datasets")
partitioners = pytest.importorskip("flwr_datasets.partitioner")

from fedkd.cli import main  # noqa: E402
from fedkd.data import load_dataset  # noqa: E402
from fedkd.data.base import DatasetOptionError  # noqa: E402
from fedkd.data.checks import check_dataset  # noqa: E402
from fedkd.data.flower_partition import FlowerPartitioner  # noqa: E402
from fedkd.errors import FedkdError  # noqa: E402
from fedkd.scenario import PartitionSpec  # noqa: E402

N, T = 60, 8
NAMES = ["walk", "run", "sit"]


def table() -> dict:
    imu = (1000 * np.arange(N)[:, None, None] + 100 * np.arange(6)[None, :, None]
           + np.arange(T)[None, None, :]).astype(np.float32)
    return {"imu": imu, "label": np.arange(N) % 3, "wearer": np.arange(N) % 2}


@pytest.fixture
def saved(tmp_path):
    """A DatasetDict saved to disk: rows 0-47 in "train", 48-59 in "test"; labels a ClassLabel."""
    features = datasets.Features({"imu": datasets.Array2D((6, T), "float32"),
                                  "label": datasets.ClassLabel(names=NAMES), "wearer": datasets.Value("int64")})
    full = datasets.Dataset.from_dict(table(), features=features)
    datasets.DatasetDict({"train": full.select(range(48)), "test": full.select(range(48, N))}).save_to_disk(
        tmp_path / "watch_hf")
    return tmp_path / "watch_hf"


MODALITIES = {"accel": {"array": "imu", "channels": [0, 1, 2]}, "gyro": {"array": "imu", "channels": [3, 4, 5]}}


def rows_of(split) -> list[int]:
    return (split.inputs["accel"][:, 0, 0] // 1000).astype(int).tolist()


def test_a_saved_dataset_dict_maps_its_splits_and_class_names(saved):
    dataset = load_dataset("huggingface", {"path": str(saved), "modalities": MODALITIES, "test_split": "test",
                                           "public_fraction": 0.25}, seed=0)
    check_dataset(dataset)

    assert dataset.classes == tuple(NAMES)  # from the ClassLabel
    assert rows_of(dataset.split("test")) == list(range(48, N))  # the Hugging Face test split, as it is
    # public: a quarter of each class of the 48 train rows (16 per class -> 4), cut from train.
    assert len(dataset.split("public")) == 12 and len(dataset.split("train")) == 36
    assert sorted(rows_of(dataset.split("train")) + rows_of(dataset.split("public"))) == list(range(48))
    gyro = dataset.split("test").inputs["gyro"]
    assert gyro.shape == (12, 3, T) and gyro[0, :, 1].tolist() == [48301, 48401, 48501]


def test_a_parquet_file_read_by_load_dataset(tmp_path):
    data = table()
    pd.DataFrame({"imu": [x.tolist() for x in data["imu"]], "label": data["label"]}).to_parquet(
        tmp_path / "watch.parquet")

    dataset = load_dataset("huggingface", {"path": str(tmp_path / "watch.parquet"), "modalities": MODALITIES},
                           seed=0)

    assert dataset.classes == ("0", "1", "2")
    assert [len(dataset.split(s)) for s in ("train", "test", "public")] == [36, 12, 12]  # 20 per class: 12/4/4


def test_a_missing_split_names_its_key(saved):
    with pytest.raises(DatasetOptionError) as info:
        load_dataset("huggingface", {"path": str(saved), "modalities": MODALITIES, "test_split": "validation"},
                     seed=0)

    assert info.value.key == "test_split" and "has no split 'validation'; it has ['test', 'train']" in str(info.value)


def flower(partitioner: str, labels: np.ndarray, devices: int, domains=None, **params) -> FlowerPartitioner:
    spec = PartitionSpec(partitioner=partitioner, params=params)
    return FlowerPartitioner(spec, labels, domains, int(labels.max()) + 1, seed=4, num_devices=devices)


def test_iid_partitioner_deals_every_row_once():
    dealt = flower("IidPartitioner", np.arange(100) % 5, devices=10)
    shards = [dealt.shard(i).indices for i in range(10)]

    assert [len(s) for s in shards] == [10] * 10
    assert sorted(np.concatenate(shards).tolist()) == list(range(100))


def test_pathological_partitioner_gives_each_device_one_class():
    labels = np.repeat(np.arange(4), 25)
    dealt = flower("PathologicalPartitioner", labels, devices=8, num_classes_per_partition=1)

    for i in range(8):
        assert len(set(labels[dealt.shard(i).indices].tolist())) == 1


def test_shards_are_flowers_own_partitions():
    labels = np.arange(300) % 3
    dealt = flower("DirichletPartitioner", labels, devices=6, alpha=0.5, min_partition_size=5, seed=11)
    reference = partitioners.DirichletPartitioner(num_partitions=6, partition_by="label", alpha=0.5,
                                                  min_partition_size=5, seed=11)
    reference.dataset = datasets.Dataset.from_dict({"row": np.arange(300), "label": labels})

    for i in range(6):
        assert dealt.shard(i).indices.tolist() == sorted(reference.load_partition(i)["row"])


def watch_scenario(tiny_scenario, saved, partition: dict) -> dict:
    tiny_scenario["data"] = {"dataset": "huggingface",
                             "options": {"path": str(saved), "modalities": MODALITIES, "test_split": "test"},
                             "partition": partition}
    tiny_scenario["population"]["devices"] = 6
    tiny_scenario["population"]["classes"][0]["modalities"] = ["accel"]
    tiny_scenario["population"]["classes"][1]["modalities"] = ["gyro"]
    tiny_scenario["strategy_defaults"]["min_available_nodes"] = 1
    return tiny_scenario


def test_a_flower_partitioner_deals_the_shards_of_a_run(saved, tiny_scenario, write_scenario, tmp_path):
    partition = {"partitioner": "ShardPartitioner", "params": {"num_shards_per_partition": 2, "shard_size": 3}}
    path = write_scenario(watch_scenario(tiny_scenario, saved, partition))

    assert main(["data", str(path), "--out", str(tmp_path / "view"), "--devices", "6"]) == 0
    assert main(["simulate", str(path), "--out", str(tmp_path / "run"), "--rounds", "1",
                 "--strategy", "fedavg"]) == 0

    held = pd.read_csv(tmp_path / "view" / "device_labels.csv")
    assert held["samples"].tolist() == [6] * 6  # 2 shards of 3 rows each, as the partitioner deals them
    rounds = pd.read_csv(tmp_path / "run" / "rounds.csv")
    assert rounds["round"].tolist() == [0, 1] and rounds["participants"].iloc[1] > 0


@pytest.mark.parametrize("partition, key, text", [
    ({"partitioner": "DirichletPartitoner"}, "data.partition.partitioner", "unknown partitioner 'DirichletPartitoner'"),
    ({"partitioner": "DirichletPartitioner", "params": {"alpha": 0.5, "beta": 1}}, "data.partition.params",
     "does not accept these params: got an unexpected keyword argument 'beta'"),
    ({"partitioner": "DirichletPartitioner", "params": {"alpha": 0.01, "min_partition_size": 40}},
     "data.partition.params", "DirichletPartitioner failed to deal the partitions"),
    ({"partitioner": "NaturalIdPartitioner", "params": {"partition_by": "domain"}}, "data.partition.params",
     "makes 2 partitions for 6 devices"),
    ({"partitioner": "IidPartitioner", "label_alpha": 0.1}, "data.partition",
     "label_alpha belongs to fedkd's own partitioner"),
    ({"params": {"alpha": 0.5}}, "data.partition", "name it in `partitioner`"),
])
def test_a_bad_partitioner_is_one_line_naming_the_key(saved, tiny_scenario, write_scenario, capsys,
                                                      partition, key, text):
    scenario = watch_scenario(tiny_scenario, saved, partition)
    scenario["data"]["options"]["domains"] = "wearer"
    path = write_scenario(scenario)

    code = main(["validate", str(path)])
    lines = capsys.readouterr().err.strip().splitlines()

    assert code == 2 and len(lines) == 1, lines
    assert lines[0].startswith(f"fedkd: error: {path}: {key}: ") and text in lines[0], lines[0]


def test_more_devices_than_train_samples_is_refused():
    dealt = flower("IidPartitioner", np.arange(5) % 2, devices=8)

    with pytest.raises(FedkdError, match="8 devices need at least as many train samples; the train split has 5"):
        dealt.check()
