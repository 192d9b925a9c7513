"""The device-state store: exact bytes, a bounded cache, round-tagged rows that roll back,
and one-line refusals (corrupt, another run, full disk, absurd sizes)."""
from __future__ import annotations

import copy
import sqlite3

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord

from fedkd.checkpoint import CheckpointStore
from fedkd.cli import main
from fedkd.sim.state_store import DeviceStateStore, StateStoreError, decode_state, encode_state, mapped_view

from .conftest import TINY
from .test_ray_cluster import ray_cluster  # noqa: F401 - the fixture: a Ray head of the test's own


def state(value: float, key: str = "small|image", size: int = 256) -> ArrayRecord:
    """A device state: one model ``key`` whose weight is ``size`` float32s equal to ``value``."""
    return ArrayRecord({f"{key}|w": Array(np.full(size, value, dtype=np.float32)),
                        f"{key}|b": Array(np.arange(3, dtype=np.int64))})


def value_of(record: ArrayRecord) -> float:
    return float(next(iter(record.values())).numpy()[0])


def test_a_state_comes_back_byte_for_byte():
    # Prepare: two models, several dtypes and shapes, an empty array.
    record = ArrayRecord({"small|image|w": Array(np.arange(12, dtype=np.float32).reshape(3, 4)),
                          "small|image|n": Array(np.array(7, dtype=np.int64)),
                          "tiny|audio+image|e": Array(np.zeros((0, 2), dtype=np.float64))})
    # Execute
    back = decode_state(encode_state(record))
    # Assert
    assert list(back.keys()) == list(record.keys())
    for key in record.keys():
        a, b = record[key], back[key]
        assert (a.dtype, a.shape, a.stype, a.data) == (b.dtype, b.shape, b.stype, b.data)
    with pytest.raises(TypeError, match="must be an ArrayRecord"):
        encode_state({"w": 1})


def test_reads_writes_membership_and_holders(tmp_path):
    # Prepare: devices 7 and 2 hold an image model, device 5 an audio model.
    store = DeviceStateStore(tmp_path / "s.sqlite", cache_mb=0)
    store.round = 1
    store.put(7, state(7.0))
    store.put(np.int64(2), state(2.0))
    store.put(5, state(5.0, key="small|audio"))
    # Execute / Assert
    assert value_of(store.get(7)) == 7.0 and value_of(store[np.int64(2)]) == 2.0
    assert store.get(3) is None and store.get(3, "none") == "none"
    with pytest.raises(KeyError):
        store[3]
    assert 5 in store and np.int64(7) in store and 3 not in store and "5" not in store
    assert len(store) == 3 and list(store) == [2, 5, 7] and sorted(store.keys()) == [2, 5, 7]
    assert [(d, value_of(s)) for d, s in store.items()] == [(2, 2.0), (5, 5.0), (7, 7.0)]
    assert store.holders("small|image") == [2, 7] and store.holders("small|audio") == [5]
    assert store.holders("big|image") == []
    view = mapped_view(store, value_of)
    assert view.get(7) == 7.0 and view.get(3) is None and 5 in view
    store.remove()
    assert not (tmp_path / "s.sqlite").exists()


def test_the_cache_is_bounded_by_bytes_and_the_rest_is_read_back_from_disk(tmp_path):
    # Prepare: a cache of 8 KiB (8,192 bytes). Flower keeps each array in .npy format (a 128-byte
    # header), so a state holds (128 + 1,024) + (128 + 24) = 1,304 bytes: 6 fit (7,824), not 7 (9,128).
    store = DeviceStateStore(tmp_path / "s.sqlite", cache_mb=8 / 1024)
    # Execute
    for device in range(20):
        store.put(device, state(float(device), size=256))
    # Assert: the 6 newest are cached, the others still readable, exactly.
    assert store._cached_bytes == 6 * 1304 and list(store._cache) == list(range(14, 20))
    assert [value_of(store.get(d)) for d in range(20)] == [float(d) for d in range(20)]
    assert store._cached_bytes <= 8 * 1024
    store.remove()


def test_a_device_trained_in_two_rounds_comes_back_as_of_the_checkpoint(tmp_path):
    # Prepare: device 1 trains in rounds 1 and 2, device 2 only in round 2. The store of
    # round 2 is committed but its checkpoint never written (a kill between the two).
    path = tmp_path / "s.sqlite"
    store = DeviceStateStore(path, cache_mb=1, identity={"run": "a"})
    store.round = 1
    store.put(1, state(1.0))
    store.flush(1)
    store.checkpointed(1)
    store.round = 2
    store.put(1, state(21.0))
    store.put(2, state(22.0))
    store.flush(2)
    store.close()
    # Execute: resume from round 1's checkpoint.
    again = DeviceStateStore(path, cache_mb=1, identity={"run": "a"}, resume=True)
    again.rollback(1)
    # Assert
    assert value_of(again.get(1)) == 1.0 and again.get(2) is None and list(again) == [1]
    again.close()


def test_a_checkpoint_prunes_older_versions_and_an_unflushed_round_is_lost(tmp_path):
    # Prepare / Execute: three rounds of device 4; round 3 is never flushed (killed mid-round).
    path = tmp_path / "s.sqlite"
    store = DeviceStateStore(path, cache_mb=1, identity="x")
    for r in (1, 2):
        store.round = r
        store.put(4, state(float(r)))
        store.flush(r)
        store.checkpointed(r)
    store.round = 3
    store.put(4, state(3.0))
    store.close()  # uncommitted: rolled back, as a kill would
    # Assert: one row, round 2's.
    rows = sqlite3.connect(path).execute("SELECT device, round FROM state").fetchall()
    assert rows == [(4, 2)]
    again = DeviceStateStore(path, cache_mb=1, identity="x", resume=True)
    again.rollback(2)
    assert value_of(again.get(4)) == 2.0
    again.close()


def test_a_store_of_another_run_a_corrupt_one_a_missing_one_are_refused_in_one_line(tmp_path):
    # Prepare
    path = tmp_path / "s.sqlite"
    store = DeviceStateStore(path, identity={"seed": 1})
    store.round = 1
    store.put(3, state(3.0))
    store.flush(1)
    store.close()
    # Execute / Assert: another run's identity.
    with pytest.raises(StateStoreError, match="from another run") as other:
        DeviceStateStore(path, identity={"seed": 2}, resume=True)
    assert "\n" not in str(other.value) and str(path) in str(other.value)
    # A checkpoint newer than what the store committed.
    with pytest.raises(StateStoreError, match="up to round 1, but the checkpoint is of round 2"):
        DeviceStateStore(path, identity={"seed": 1}, resume=True).rollback(2)
    # A damaged row: its bytes no longer match their checksum.
    db = sqlite3.connect(path)
    db.execute("UPDATE state SET blob = CAST(zeroblob(length(blob)) AS BLOB)")
    db.commit()
    db.close()
    with pytest.raises(StateStoreError, match="device 3's state \\(round 1\\) is damaged"):
        DeviceStateStore(path, identity={"seed": 1}, resume=True, cache_mb=0).get(3)
    # Not a database at all.
    garbage = tmp_path / "g.sqlite"
    garbage.write_bytes(b"not sqlite" * 1000)
    with pytest.raises(StateStoreError, match="not a readable fedkd state store"):
        DeviceStateStore(garbage, resume=True)
    with pytest.raises(StateStoreError, match="is missing"):
        DeviceStateStore(tmp_path / "none.sqlite", resume=True)


def test_a_full_disk_fails_in_one_line_and_leaves_the_last_round_whole(tmp_path):
    # Prepare: a store whose file may not grow past a few pages (as a full disk would stop it).
    path = tmp_path / "s.sqlite"
    store = DeviceStateStore(path, cache_mb=0, identity="x")
    store.round = 1
    store.put(1, state(1.0))
    store.flush(1)
    store.checkpointed(1)
    pages = store._db.execute("PRAGMA page_count").fetchone()[0]
    store._db.execute(f"PRAGMA max_page_count = {pages + 2}")
    # Execute
    store.round = 2
    with pytest.raises(StateStoreError, match="disk full") as full:
        for device in range(2, 50):
            store.put(device, state(float(device), size=4096))
        store.flush(2)
    store.close()
    # Assert: one line; round 1's state intact.
    assert "\n" not in str(full.value)
    again = DeviceStateStore(path, identity="x", resume=True)
    again.rollback(1)
    assert list(again) == [1] and value_of(again.get(1)) == 1.0
    again.close()


def fedmd_scenario(rounds: int = 2) -> dict:
    raw = copy.deepcopy(TINY)
    raw["rounds"] = rounds
    raw["strategy_defaults"] = {"fraction_train": 0.5, "min_available_nodes": 2}
    raw["strategies"] = [{"name": "fedmd", "params": {"public_batch": 16}}]
    raw["backend"] = {"state_cache_mb": 0.01}  # smaller than one device's model: every read goes to disk
    return raw


def test_keep_state_leaves_the_devices_models_and_by_default_they_go(tmp_path, write_scenario):
    # Prepare
    path = write_scenario(fedmd_scenario())
    # Execute
    assert main(["simulate", str(path), "--out", str(tmp_path / "kept"), "--keep-state"]) == 0
    assert main(["simulate", str(path), "--out", str(tmp_path / "gone")]) == 0
    # Assert: the kept store holds the devices that trained (devices.csv), and their models.
    import pandas as pd

    from fedkd.scenario import parse_scenario

    devices = pd.read_csv(tmp_path / "kept" / "devices.csv")
    trained = sorted(set(devices[(devices.phase == "train") & (devices.status == "ok")].device_id))
    checkpoints = CheckpointStore(tmp_path / "kept", parse_scenario(fedmd_scenario()))
    kept = DeviceStateStore(checkpoints.state_path(0, "fedmd"), identity=checkpoints.state_identity("fedmd"),
                            resume=True)
    assert trained and list(kept) == trained
    assert sorted(kept.holders("small|audio") + kept.holders("small|image")) == trained
    kept.close()
    assert not (tmp_path / "gone" / ".state").exists() and not (tmp_path / "kept" / ".checkpoint").exists()
    assert (tmp_path / "kept" / "rounds.csv").read_bytes() == (tmp_path / "gone" / "rounds.csv").read_bytes()


def test_an_absurd_population_or_store_is_refused_at_validation_with_the_estimate(tmp_path, write_scenario, capsys,
                                                                                  monkeypatch):
    # Prepare: a machine with 8 GB of memory and 10 GB of free disk; a trillion devices; then
    # ten million FedMD devices, each keeping a model, half of them each round.
    import fedkd.sizes

    monkeypatch.setattr(fedkd.sizes, "available_memory_bytes", lambda: 8e9)
    monkeypatch.setattr(fedkd.sizes, "free_disk_bytes", lambda out_dir: 10e9)
    absurd = copy.deepcopy(TINY)
    absurd["population"]["devices"] = 10**12
    big = fedmd_scenario(rounds=2)
    big["population"]["devices"] = 10**7
    # Execute
    codes = [main(["validate", str(write_scenario(absurd, "absurd.yaml"))]),
             main(["validate", str(write_scenario(big, "big.yaml"))])]
    # Assert: exit 2, one line each, with the estimate.
    err = capsys.readouterr().err.strip().splitlines()
    assert codes == [2, 2] and len(err) == 2
    assert "population.devices: 1,000,000,000,000 devices need about" in err[0] and "of memory" in err[0]
    assert "but 8.0 GB is available" in err[0]
    assert "strategies[0]: fedmd: up to 10,000,000 devices keep a model" in err[1] and "but 10.0 GB is free" in err[1]


@pytest.mark.ray
def test_on_ray_the_devices_state_reaches_the_executors_and_comes_back_from_disk(ray_cluster, write_scenario, tmp_path):
    # Prepare: FedMD (devices keep their models) with a cache smaller than one model, locally and
    # on a Ray cluster of two executors; the store stays in the driver, the state travels with the task.
    import pandas as pd

    raw = fedmd_scenario(rounds=3)
    local = write_scenario(raw, "local.yaml")
    raw["backend"] = {"kind": "ray", "address": ray_cluster, "executors": 2, "state_cache_mb": 0.01}
    cluster = write_scenario(raw, "cluster.yaml")
    # Execute
    assert main(["simulate", str(local), "--out", str(tmp_path / "local")]) == 0
    assert main(["simulate", str(cluster), "--out", str(tmp_path / "cluster"), "--keep-state"]) == 0
    # Assert: the same rounds (a device's round-1 model reached it again in rounds 2 and 3),
    # and the kept store holds every device that trained.
    a, b = (pd.read_csv(tmp_path / name / "rounds.csv") for name in ("local", "cluster"))
    assert b["accuracy"].tolist() == pytest.approx(a["accuracy"].tolist(), abs=1e-6)
    devices = pd.read_csv(tmp_path / "cluster" / "devices.csv")
    trained = sorted(set(devices[(devices.phase == "train") & (devices.status == "ok")].device_id))
    assert len(list((tmp_path / "cluster" / ".state").glob("*.sqlite"))) == 1
    from fedkd.scenario import parse_scenario

    checkpoints = CheckpointStore(tmp_path / "cluster", parse_scenario(raw))
    kept = DeviceStateStore(checkpoints.state_path(0, "fedmd"), identity=checkpoints.state_identity("fedmd"),
                            resume=True)
    assert list(kept) == trained
    kept.close()


class Stop(BaseException):  # a kill's stand-in: not an error the run reports
    pass


def _stop_after_round_1(label, record, total):
    if record.round == 1:
        raise Stop(label)


@pytest.mark.parametrize("damage, message", [
    ("garbage", "not a readable fedkd state store"),
    ("missing", "the devices' state store of this checkpoint is missing"),
])
def test_resume_refuses_a_corrupt_or_missing_store_in_one_line(tmp_path, write_scenario, capsys, damage, message):
    # Prepare: a FedMD run stopped after round 1 (checkpoint and store on disk); then damage the store.
    from fedkd.runner import run_scenario
    from fedkd.scenario import parse_scenario

    raw = fedmd_scenario(rounds=2)
    checkpoints = CheckpointStore(tmp_path / "out", parse_scenario(raw))
    with pytest.raises(Stop):
        run_scenario(parse_scenario(raw), _stop_after_round_1, checkpoints)
    path = checkpoints.state_path(0, "fedmd")
    for leftover in path.parent.glob("*.sqlite-*"):
        leftover.unlink()
    if damage == "garbage":
        path.write_bytes(b"\x00garbage" * 4096)
    else:
        path.unlink()
    # Execute
    code = main(["simulate", str(write_scenario(raw)), "--out", str(tmp_path / "out"), "--resume"])
    # Assert: exit 2, one line naming the store and what is wrong; the checkpoint left for another try.
    err = [line for line in capsys.readouterr().err.strip().splitlines() if line.startswith("fedkd: error")]
    assert code == 2 and len(err) == 1 and message in err[0] and str(path) in err[0]
    assert checkpoints.path(0, "fedmd").exists()


def test_a_full_disk_while_writing_a_checkpoint_is_one_line_and_the_last_checkpoint_stays(tmp_path, monkeypatch):
    # Prepare: a checkpoint of round 1 on disk; then the disk fills up.
    import errno

    import fedkd.checkpoint
    from fedkd.checkpoint import CheckpointError
    from fedkd.scenario import parse_scenario

    checkpoints = CheckpointStore(tmp_path, parse_scenario(fedmd_scenario()))
    checkpoints.save(0, "fedmd", complete=False, run={"rounds": [{"round": 0}, {"round": 1}]}, state={"x": 1})
    before = checkpoints.path(0, "fedmd").read_bytes()

    def full(path, data):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(fedkd.checkpoint, "atomic_write_bytes", full)
    # Execute
    with pytest.raises(CheckpointError, match="disk full while writing the checkpoint") as error:
        checkpoints.save(0, "fedmd", complete=False, run={"rounds": [{"round": 0}] * 3}, state={"x": 2})
    # Assert
    assert "\n" not in str(error.value) and checkpoints.path(0, "fedmd").read_bytes() == before
