"""The devices' own state (their models), on disk with a bounded cache in memory.

In the strategies whose devices keep a model between rounds (FedMD, DS-FL,
gossip distillation, ...), every device that has trained holds state; a
population where a million devices have trained holds tens of GB of it. The
simulated grid therefore keeps device state here: one SQLite file per
(seed, strategy) run in the run's output folder (``<out>/.state/``), with a
least-recently-used cache of decoded states bounded by bytes
(``backend.state_cache_mb``) in front of it.

Why SQLite: it is in the standard library (no new dependency), transactional
(a kill at any moment leaves the last committed round whole) and a device's
row is found through a B-tree, so reading one costs the same at a thousand
and a million stored devices, give or take a deeper tree (measured:
benchmarks/README.md, "Device state at scale"). Memory-mapped fixed-size rows
per architecture were the other candidate: a raw row copy is faster (tens of
microseconds against 0.1-1 ms, much of which is building the Flower record,
paid either way), but they need their own crash safety (a torn row on kill),
a file per architecture and a free list; SQLite gives all three, and a round
of 100 devices spends well under a second in it. 64 KiB pages: a state of
tens of KB sits in one page instead of a chain of overflow pages.

Exact, incremental checkpoints: every row is tagged with the round that wrote
it, ``(device, round)`` being the key. :meth:`flush` commits a round's rows
(before the round's checkpoint file is written); once that file is written,
:meth:`checkpointed` deletes the versions those rows supersede. So at any
moment the store holds, for every device, its version as of the last
checkpoint, plus newer ones; :meth:`rollback` (on ``--resume``) drops the
newer ones. A round's checkpoint thus writes what the round changed, and a
device that trained in round r and again in r + 1, killed in r + 1, comes
back with its round-r model. Each row carries a CRC-32 of its bytes: a
damaged row is refused with one line, not loaded as wrong weights.

Streaming: :meth:`items` reads rows in device order a batch at a time, never
all at once; :meth:`holders` answers "which devices hold model ``key``"
from a column, without reading the weights.
"""
from __future__ import annotations

import json
import numbers
import shutil
import sqlite3
import struct
import tempfile
import weakref
import zlib
from collections import OrderedDict
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from flwr.app import Array, ArrayRecord

from ..errors import FedkdError

FOLDER = ".state"
SUFFIX = ".sqlite"
DEFAULT_CACHE_MB = 256.0
_BATCH = 256  # rows a streaming read fetches at a time
_FORMAT = "1"  # this module's layout: a store of another layout is refused


class StateStoreError(FedkdError):
    """A store that cannot be used (corrupt, from another run) or a disk that is full: one line."""


def encode_state(state: ArrayRecord) -> bytes:
    """An ArrayRecord as bytes that :func:`decode_state` turns back into an equal record, byte for byte."""
    if not isinstance(state, ArrayRecord):
        raise TypeError(f"device state must be an ArrayRecord, not {type(state).__name__}")
    items = list(state.items())
    header = json.dumps([[key, a.dtype, list(a.shape), a.stype, len(a.data)] for key, a in items],
                        separators=(",", ":")).encode()
    return b"".join([struct.pack("<I", len(header)), header, *(a.data for _, a in items)])


def decode_state(blob: bytes) -> ArrayRecord:
    (size,) = struct.unpack_from("<I", blob)
    offset, arrays = 4 + size, {}
    view = memoryview(blob)
    for key, dtype, shape, stype, nbytes in json.loads(bytes(view[4:offset])):
        arrays[key] = Array(dtype=dtype, shape=tuple(shape), stype=stype, data=bytes(view[offset:offset + nbytes]))
        offset += nbytes
    return ArrayRecord(array_dict=arrays)


def state_bytes(state: ArrayRecord) -> int:
    """What a decoded state holds in memory (its arrays' bytes)."""
    return sum(len(a.data) for a in state.values())


def model_keys_of(state: ArrayRecord) -> list[str]:
    """The models a state holds (``"<tier>|<modalities>"``, see fedkd.device_models), sorted."""
    return sorted({"|".join(name.split("|")[:2]) for name in state.keys() if name.count("|") >= 2})


class DeviceStateStore:
    """Device id -> its state (an ArrayRecord), mapping-like: ``get``, ``put``, ``in``,
    ``keys``/``devices``/``iter`` (ascending ids), ``items`` (streamed), ``holders``.

    ``path`` None: a private temporary file, removed with the store (tests, tools).
    ``identity``: what the run is (any JSON value); a store opened with ``resume``
    must have been written by the same identity.
    """

    def __init__(self, path: str | Path | None = None, *, cache_mb: float = DEFAULT_CACHE_MB,
                 identity: Any = None, resume: bool = False):
        self._tmpdir = None
        if path is None:
            self._tmpdir = tempfile.mkdtemp(prefix="fedkd-state-")
            path, resume = Path(self._tmpdir) / f"state{SUFFIX}", False
        self.path = Path(path)
        self.cache_bytes = int(cache_mb * 2**20)
        self.round = 0  # the round whose puts are being written
        self.flushed_round = -1  # the last round :meth:`flush` committed
        self._identity = json.dumps(identity, sort_keys=True)
        self._cache: OrderedDict[int, tuple[ArrayRecord, int]] = OrderedDict()
        self._cached_bytes = 0
        self._written: set[int] = set()  # devices written since the last checkpoint
        if not resume:
            remove_store(self.path)
        elif not self.path.is_file():
            raise StateStoreError(f"{self.path}: the devices' state store of this checkpoint is missing; "
                                  "run without --resume to start over")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._db = self._open(resume)
        self._finalizer = weakref.finalize(self, _close, self._db, self._tmpdir)

    # -- mapping-like reads ----------------------------------------------------------
    def get(self, device: int, default: Any = None) -> ArrayRecord | Any:
        device = int(device)
        hit = self._cache.get(device)
        if hit is not None:
            self._cache.move_to_end(device)
            return hit[0]
        row = self._sql("SELECT round, crc, blob FROM state WHERE device = ? ORDER BY round DESC LIMIT 1",
                        (device,)).fetchone()
        if row is None:
            return default
        state = self._decode(device, *row)
        self._remember(device, state)
        return state

    def __getitem__(self, device: int) -> ArrayRecord:
        state = self.get(device)
        if state is None:
            raise KeyError(device)
        return state

    def __contains__(self, device: object) -> bool:
        if not isinstance(device, numbers.Integral) or isinstance(device, bool):
            return False
        device = int(device)
        return device in self._cache or self._sql(
            "SELECT 1 FROM state WHERE device = ? LIMIT 1", (device,)).fetchone() is not None

    def __len__(self) -> int:
        return self._sql("SELECT COUNT(DISTINCT device) FROM state").fetchone()[0]

    def __iter__(self) -> Iterator[int]:
        return self.devices()

    def keys(self) -> Iterator[int]:
        return self.devices()

    def devices(self) -> Iterator[int]:
        """Ids of the devices with state, ascending, streamed."""
        for (device,) in self._stream("SELECT DISTINCT device FROM state ORDER BY device"):
            yield device

    def items(self) -> Iterator[tuple[int, ArrayRecord]]:
        """(device, state) in ascending ids, read a batch at a time (never all in memory),
        bypassing the cache so a full pass does not evict the devices in use."""
        query = ("SELECT device, round, crc, blob FROM state AS s WHERE round = "
                 "(SELECT MAX(round) FROM state WHERE device = s.device) ORDER BY device")
        for device, round_, crc, blob in self._stream(query):
            hit = self._cache.get(device)
            yield device, hit[0] if hit is not None else self._decode(device, round_, crc, blob)

    def holders(self, model_key: str) -> list[int]:
        """Devices whose current state holds model ``model_key`` (``"<tier>|<modalities>"``)."""
        query = ("SELECT device, models FROM state AS s WHERE round = "
                 "(SELECT MAX(round) FROM state WHERE device = s.device) ORDER BY device")
        return [device for device, models in self._stream(query) if model_key in models.split(",")]

    def bytes_on_disk(self) -> int:
        """The store's files (database and write-ahead log)."""
        return sum(p.stat().st_size for p in (self.path, Path(f"{self.path}-wal")) if p.exists())

    # -- writes and checkpoints --------------------------------------------------------
    def put(self, device: int, state: ArrayRecord) -> None:
        """``device``'s new state, tagged with :attr:`round`; durable at the next :meth:`flush`."""
        device = int(device)
        blob = encode_state(state)
        self._write("INSERT OR REPLACE INTO state (device, round, crc, models, blob) VALUES (?, ?, ?, ?, ?)",
                    (device, self.round, zlib.crc32(blob), ",".join(model_keys_of(state)), blob))
        self._written.add(device)
        self._remember(device, state)

    def __setitem__(self, device: int, state: ArrayRecord) -> None:
        self.put(device, state)

    def flush(self, round_: int) -> None:
        """Commit every put so far, as of round ``round_``: call before that round's checkpoint."""
        self._write("INSERT OR REPLACE INTO meta (key, value) VALUES ('flushed_round', ?)", (str(round_),))
        self._commit()
        self.flushed_round = round_

    def checkpointed(self, round_: int) -> None:
        """Round ``round_``'s checkpoint is written: drop the versions its rows supersede."""
        written, self._written = sorted(self._written), set()
        try:
            for start in range(0, len(written), _BATCH):
                self._db.executemany("DELETE FROM state WHERE device = ? AND round < "
                                     "(SELECT MAX(round) FROM state WHERE device = ? AND round <= ?)",
                                     [(d, d, round_) for d in written[start:start + _BATCH]])
        except sqlite3.DatabaseError as exc:
            raise self._failure(exc) from None
        self._write("INSERT OR REPLACE INTO meta (key, value) VALUES ('checkpoint_round', ?)", (str(round_),))
        self._commit()

    def rollback(self, round_: int) -> None:
        """Back to the state of round ``round_``'s checkpoint (on resume): newer rows go."""
        flushed = int(self._meta("flushed_round", "-1"))
        if flushed < round_:
            raise StateStoreError(f"{self.path}: holds the devices' state up to round {flushed}, but the "
                                  f"checkpoint is of round {round_}; run without --resume to start over")
        self._write("DELETE FROM state WHERE round > ?", (round_,))
        self._write("DELETE FROM state WHERE round < (SELECT MAX(round) FROM state AS n WHERE n.device = state.device)")
        self._write("INSERT OR REPLACE INTO meta (key, value) VALUES ('flushed_round', ?)", (str(round_),))
        self._commit()
        self.flushed_round = round_
        self._cache.clear()
        self._cached_bytes, self._written = 0, set()

    def close(self) -> None:
        self._finalizer()

    def remove(self) -> None:
        """Close the store and delete its files."""
        self.close()
        remove_store(self.path)

    # -- internals ---------------------------------------------------------------------
    def _open(self, resume: bool) -> sqlite3.Connection:
        try:
            # One thread at a time uses the store, but not always the one that opened it (Ray's driver).
            db = sqlite3.connect(self.path, isolation_level="DEFERRED", check_same_thread=False)
            # A new file only: 64 KiB pages hold a typical state (tens of KB) in one page instead of a
            # chain of 4 KiB overflow pages; measured 2x faster writes, 3x faster reads (benchmarks/README.md).
            db.execute("PRAGMA page_size=65536")
            # WAL: a commit appends, a kill mid-write leaves the last commit whole; NORMAL sync is
            # durable against a killed process (the OS keeps what was written), fsyncs at WAL checkpoints.
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=NORMAL")
            db.execute("PRAGMA journal_size_limit=67108864")  # keep the log from staying at its peak
            db.execute("PRAGMA cache_size=-8192")  # SQLite's own page cache: 8 MiB
            db.execute("CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)")
            db.execute("CREATE TABLE IF NOT EXISTS state (device INTEGER NOT NULL, round INTEGER NOT NULL, "
                       "crc INTEGER NOT NULL, models TEXT NOT NULL, blob BLOB NOT NULL, "
                       "PRIMARY KEY (device, round))")
            found = dict(db.execute("SELECT key, value FROM meta").fetchall())
        except sqlite3.DatabaseError as exc:
            raise StateStoreError(f"{self.path}: not a readable fedkd state store ({_first_line(exc)}); "
                                  "run without --resume to start over") from None
        if not resume:
            db.executemany("INSERT INTO meta (key, value) VALUES (?, ?)",
                           [("format", _FORMAT), ("identity", self._identity), ("flushed_round", "-1")])
            db.commit()
        elif found.get("format") != _FORMAT or found.get("identity") != self._identity:
            db.close()
            what = "another layout" if found.get("format") != _FORMAT else "another run"
            raise StateStoreError(f"{self.path}: the devices' state store is from {what}; "
                                  "run without --resume to start over")
        return db

    def _meta(self, key: str, default: str) -> str:
        row = self._sql("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return default if row is None else row[0]

    def _decode(self, device: int, round_: int, crc: int, blob: bytes) -> ArrayRecord:
        if zlib.crc32(blob) != crc:
            raise StateStoreError(f"{self.path}: device {device}'s state (round {round_}) is damaged; "
                                  "run without --resume to start over")
        return decode_state(blob)

    def _remember(self, device: int, state: ArrayRecord) -> None:
        old = self._cache.pop(device, None)
        if old is not None:
            self._cached_bytes -= old[1]
        size = state_bytes(state)
        if size > self.cache_bytes:
            return
        self._cache[device] = (state, size)
        self._cached_bytes += size
        while self._cached_bytes > self.cache_bytes:
            _, (_, evicted) = self._cache.popitem(last=False)
            self._cached_bytes -= evicted

    def _stream(self, query: str, args: tuple = ()) -> Iterator[tuple]:
        cursor = self._sql(query, args)
        while rows := cursor.fetchmany(_BATCH):
            yield from rows

    def _sql(self, query: str, args: tuple = ()) -> sqlite3.Cursor:
        try:
            return self._db.execute(query, args)
        except sqlite3.DatabaseError as exc:
            raise self._failure(exc) from None

    def _write(self, query: str, args: tuple = ()) -> None:
        self._sql(query, args)

    def _commit(self) -> None:
        try:
            self._db.commit()
        except sqlite3.DatabaseError as exc:
            raise self._failure(exc) from None

    def _failure(self, exc: sqlite3.DatabaseError) -> StateStoreError:
        text = _first_line(exc)
        if "full" in text or getattr(exc, "sqlite_errorcode", None) == 13:  # SQLITE_FULL
            return StateStoreError(f"{self.path}: disk full while saving the devices' state ({text}); "
                                   "the last checkpoint is whole: free space, then --resume")
        return StateStoreError(f"{self.path}: the devices' state store failed ({text}); "
                               "run without --resume to start over")


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _close(db: sqlite3.Connection, tmpdir: str | None) -> None:
    try:
        db.close()  # an uncommitted round is rolled back, as a kill would
    except sqlite3.Error:
        pass
    if tmpdir is not None:
        shutil.rmtree(tmpdir, ignore_errors=True)


def remove_store(path: Path) -> None:
    for p in (path, Path(f"{path}-wal"), Path(f"{path}-shm"), Path(f"{path}-journal")):
        p.unlink(missing_ok=True)


class MappedView:
    """``fn(state)`` of each device's state, read on demand with ``get``: for hooks that look
    at a few devices of a store that may hold millions (never a dict of them all)."""

    def __init__(self, states: Any, fn: Any):
        self._states, self._fn = states, fn

    def get(self, device: int, default: Any = None) -> Any:
        state = self._states.get(device)
        return default if state is None else self._fn(state)

    def __contains__(self, device: object) -> bool:
        return device in self._states


def mapped_view(states: Any, fn: Any) -> MappedView:
    return MappedView(states, fn)


def holds_no_state(path: Path) -> bool:
    """True if the store at ``path`` is missing or has no device's state (a stateless strategy's)."""
    if not Path(path).is_file():
        return True
    try:
        db = sqlite3.connect(path)
        try:
            return db.execute("SELECT 1 FROM state LIMIT 1").fetchone() is None
        finally:
            db.close()
    except sqlite3.DatabaseError:
        return False  # not ours to judge: leave it
