"""What reading and writing one device's state costs as the store grows.

usage: python benchmarks/state_store.py --stored N [--blob-kb K] [--reads R] [--folder DIR]

Fills a store with N devices' states of K KB each (one transaction per 10,000
rows, as rounds would), then times R reads of random stored devices with the
cache off (every read goes to the file) and R writes (a round's worth, then a
flush). Does the same for the alternative considered, fixed-size rows in one
memory-mapped file (numpy.memmap, one row per device). Prints, as its last
line, JSON with microseconds per read and per write for each, and the
process's peak resident memory after the SQLite part (``sqlite_peak_rss_mb``:
the store's cache is its default, so this is what holding N states costs).
"""
from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import numpy as np

os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")


def state_of(kb: int, value: int):
    from flwr.app import Array, ArrayRecord

    return ArrayRecord({"small|camera|w": Array(np.full(kb * 256, value, dtype=np.float32))})


def sqlite_figures(folder: Path, stored: int, kb: int, reads: int, rng) -> dict:
    import zlib

    from fedkd.sim.state_store import DeviceStateStore, encode_state

    store = DeviceStateStore(folder / "bench.sqlite")  # the default cache, filled by the writes below
    blob = encode_state(state_of(kb, 1))
    crc = zlib.crc32(blob)
    started = time.perf_counter()
    for start in range(0, stored, 10_000):  # bulk fill: the same rows puts would write
        store._db.executemany("INSERT INTO state (device, round, crc, models, blob) VALUES (?, 1, ?, ?, ?)",
                              [(d, crc, "small|camera", blob) for d in range(start, min(stored, start + 10_000))])
        store._db.commit()
    fill_s = time.perf_counter() - started
    ids = rng.integers(0, stored, reads)
    started = time.perf_counter()
    for d in ids:
        store._cache.pop(int(d), None)  # a read from the file, not the cache
        store.get(int(d))
    read_us = (time.perf_counter() - started) / reads * 1e6
    new = state_of(kb, 2)
    store.round = 2
    started = time.perf_counter()
    for d in ids:
        store.put(int(d), new)
    store.flush(2)
    store.checkpointed(2)
    write_us = (time.perf_counter() - started) / reads * 1e6
    for d in range(0, stored, max(1, stored // 20_000)):  # read up to 20,000 devices: the cache fills, no more
        store.get(d)
    disk = store.bytes_on_disk()
    store.remove()
    import resource

    return {"read_us": round(read_us, 1), "write_us": round(write_us, 1), "fill_s": round(fill_s, 1),
            "bytes_on_disk": disk,
            "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)}


def memmap_figures(folder: Path, stored: int, kb: int, reads: int, rng) -> dict:
    row = kb * 1024
    path = folder / "bench.rows"
    rows = np.memmap(path, dtype=np.uint8, mode="w+", shape=(stored, row))
    started = time.perf_counter()
    one = np.frombuffer(np.full(kb * 256, 1, dtype=np.float32).tobytes(), dtype=np.uint8)
    for start in range(0, stored, 10_000):
        rows[start:min(stored, start + 10_000)] = one
        rows.flush()
    fill_s = time.perf_counter() - started
    ids = rng.integers(0, stored, reads)
    started = time.perf_counter()
    for d in ids:
        np.array(rows[int(d)]).view(np.float32)
    read_us = (time.perf_counter() - started) / reads * 1e6
    two = np.frombuffer(np.full(kb * 256, 2, dtype=np.float32).tobytes(), dtype=np.uint8)
    started = time.perf_counter()
    for d in ids:
        rows[int(d)] = two
    rows.flush()
    write_us = (time.perf_counter() - started) / reads * 1e6
    del rows
    disk = path.stat().st_size
    path.unlink()
    return {"read_us": round(read_us, 1), "write_us": round(write_us, 1), "fill_s": round(fill_s, 1),
            "bytes_on_disk": disk}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--stored", type=int, required=True)
    parser.add_argument("--blob-kb", type=int, default=4)
    parser.add_argument("--reads", type=int, default=2000)
    parser.add_argument("--folder", default=None, help="where the files go (default: a temporary folder)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(dir=args.folder) as tmp:
        folder = Path(tmp)
        result = {"stored": args.stored, "blob_kb": args.blob_kb, "reads": args.reads,
                  "sqlite": sqlite_figures(folder, args.stored, args.blob_kb, args.reads, np.random.default_rng(0)),
                  "memmap": memmap_figures(folder, args.stored, args.blob_kb, args.reads, np.random.default_rng(0))}
    print(json.dumps(result))


if __name__ == "__main__":
    main()
