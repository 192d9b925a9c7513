"""`fedkd data SCENARIO`: per-device label histograms and the modality mix, written atomically."""
from __future__ import annotations

import numpy as np
import pandas as pd

from fedkd.cli import main
from fedkd.context import SimulationContext
from fedkd.scenario import parse_scenario

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
FILES = {"labels.png", "modality_mix.png", "device_labels.csv", "modality_mix.csv"}


def test_writes_histograms_mix_and_counts_that_match_the_shards(write_scenario, tiny_scenario, tmp_path, capsys):
    # Prepare: cameras take their modalities from the mix.
    tiny_scenario["population"]["classes"][1].pop("modalities")
    tiny_scenario["data"]["partition"]["modality_mix"] = {"image": 0.7, "audio+image": 0.3}
    out = tmp_path / "view"
    # Execute
    code = main(["data", str(write_scenario(tiny_scenario)), "--out", str(out), "--devices", "5"])
    # Assert
    assert code == 0
    assert {p.name for p in out.iterdir()} == FILES  # no temporary files left behind
    assert (out / "labels.png").read_bytes().startswith(PNG_MAGIC)
    assert (out / "modality_mix.png").read_bytes().startswith(PNG_MAGIC)
    table = pd.read_csv(out / "device_labels.csv")
    assert table["device_id"].tolist() == [0, 1, 2, 3, 4]
    counts = table[[f"class_{d}" for d in range(10)]].to_numpy()
    assert (counts.sum(axis=1) == table["samples"]).all()
    ctx = SimulationContext(parse_scenario(tiny_scenario))
    labels = ctx.dataset.split("train").labels
    for row, device_id in zip(counts, table["device_id"]):
        assert row.tolist() == np.bincount(labels[ctx.partitioner.shard(device_id).indices], minlength=10).tolist()
    mix = pd.read_csv(out / "modality_mix.csv")
    assert mix["devices"].sum() == 12  # the whole tiny population
    assert set(mix.loc[mix["device_class"] == "phone", "modalities"]) == {"audio"}
    assert set(mix.loc[mix["device_class"] == "camera", "modalities"]) <= {"image", "audio+image"}
    assert str(out) in capsys.readouterr().out


def test_default_folder_is_results_name_data(write_scenario, tiny_scenario, tmp_path, monkeypatch):
    # Prepare
    path = write_scenario(tiny_scenario)
    monkeypatch.chdir(tmp_path)
    # Execute
    code = main(["data", str(path)])
    # Assert: 20 devices asked, but the tiny population has only 12.
    assert code == 0
    assert len(pd.read_csv(tmp_path / "results" / "tiny" / "data" / "device_labels.csv")) == 12


def test_a_million_devices_cost_only_the_devices_shown(write_scenario, tiny_scenario, tmp_path):
    # Prepare: 20 shards and 1,000 modality draws are computed, whatever the population.
    tiny_scenario["population"]["devices"] = 1_000_000
    out = tmp_path / "view"
    # Execute
    code = main(["data", str(write_scenario(tiny_scenario)), "--out", str(out)])
    # Assert
    assert code == 0
    assert len(pd.read_csv(out / "device_labels.csv")) == 20
    assert pd.read_csv(out / "modality_mix.csv")["devices"].sum() == 1000


def test_bad_scenario_exits_2_and_writes_nothing(write_scenario, tiny_scenario, tmp_path, capsys):
    # Prepare
    tiny_scenario["data"]["partition"]["label_alpha"] = -1
    out = tmp_path / "view"
    # Execute
    code = main(["data", str(write_scenario(tiny_scenario)), "--out", str(out)])
    # Assert
    assert code == 2
    assert "data.partition.label_alpha" in capsys.readouterr().err
    assert not out.exists()
