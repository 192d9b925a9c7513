"""Checkpoints: a run killed at any moment continues from its last completed round.

After every round a strategy completes, the server saves everything the rest
of the run depends on to ``<out>/.checkpoint/<n>-<label>.pt``: the global
arrays, the strategy's own state (``fedkd_state()``), the simulated world
(clock, draw counter, batteries, availability, quality states, telemetry),
the grid (message counters, the round its device-state store was committed at) and the recorder
(the rounds and device rows so far). A strategy that has finished is saved
once more, as its results only. The devices' own state (their models) is not
in the file: it lives in a store beside it, ``<out>/.state/<n>-<label>.sqlite``
(:mod:`fedkd.sim.state_store`), which commits each round's rows before the
round's file is written; the file names that round, and a resumed run rolls the
store back to it. So a round's checkpoint writes what the round changed, not
every device's model. The stores are removed with the checkpoints unless the
run keeps them (``--keep-state``). ``fedkd simulate ... --resume`` skips the
finished strategies and restarts the others from their last round; every
draw in fedkd is keyed by (seed, round, device, ...), never by call order, so
the resumed run writes the same ``rounds.csv`` as one that was never stopped.
The folder is removed once the results are written. A run with several
seeds keeps one file per (seed, strategy), ``seed<s>-<n>-<label>.pt``, and
resumes each where it stopped; with one seed the names are as above.

Safety: a checkpoint holds only tensors, numbers, strings and lists, tuples
and dicts of them (numpy arrays, bytes and Flower's Array-, Config- and
MetricRecords are turned into those and tagged), written with ``torch.save``
and read with ``torch.load(..., weights_only=True)``, which refuses anything
else: opening a checkpoint never runs code. Each file is written to a temporary name and
renamed into place (:func:`fedkd.report.atomic_write_bytes`), so a kill
leaves the previous checkpoint whole; so does a full disk (one line, exit 2).
"""
from __future__ import annotations

import errno
import hashlib
import io
import re
from pathlib import Path
from typing import Any

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, MetricRecord

from .errors import FedkdError
from .report import atomic_write_bytes
from .scenario import Scenario
from .sim.state_store import FOLDER as STATE_FOLDER
from .sim.state_store import SUFFIX as STATE_SUFFIX
from .sim.state_store import holds_no_state, remove_store

FOLDER = ".checkpoint"
FORMAT = 1
_NDARRAY, _BYTES, _ARRAY_RECORD = "__fedkd_ndarray__", "__fedkd_bytes__", "__fedkd_arrayrecord__"
_CONFIG_RECORD, _METRIC_RECORD = "__fedkd_configrecord__", "__fedkd_metricrecord__"


class CheckpointError(FedkdError):
    """A checkpoint that cannot be used: unreadable, or written by a different run."""


def scenario_seeds(scenario: Scenario) -> list[int]:
    """The seeds a scenario runs: its ``seeds`` list, else its one ``seed``."""
    return list(scenario.seeds) if scenario.seeds else [scenario.seed]


def run_identity(scenario: Scenario, seed: int | None = None) -> dict[str, Any]:
    """What a checkpoint of ``seed`` (default: the scenario's seed) must match to be resumed:
    the scenario's settings, the seed, the strategies and, with several seeds, the seed list.

    The backend is left out: it says how the run executes, not what it computes. The seeds
    are left out of the settings' hash because they are compared one by one, for a clear message.
    """
    settings = scenario.model_dump_json(exclude={"backend", "seed", "seeds"})
    seeds = scenario_seeds(scenario)
    identity = {"scenario": scenario.name, "seed": seeds[0] if seed is None else seed,
                "strategies": [s.run_label for s in scenario.strategies],
                "settings_sha256": hashlib.sha256(settings.encode()).hexdigest()}
    if len(seeds) > 1:  # a one-seed identity is as it always was
        identity["seeds"] = seeds
    return identity


class CheckpointStore:
    """The checkpoint files of one results folder, for one scenario.

    With several seeds the store saves and loads the files of one seed (the
    first; :meth:`for_seed` gives the others), while :meth:`inspect`,
    :meth:`exists` and :meth:`clear` cover every seed's files.
    """

    def __init__(self, out_dir: str | Path, scenario: Scenario, seed: int | None = None, *,
                 keep_state: bool = False):
        self.folder = Path(out_dir) / FOLDER
        self.state_folder = Path(out_dir) / STATE_FOLDER
        self.keep_state = keep_state  # leave the devices' state stores when the run is done
        self.seeds = scenario_seeds(scenario)
        self.seed = self.seeds[0] if seed is None else seed
        self.identity = run_identity(scenario, self.seed)
        self._scenario = scenario

    def for_seed(self, seed: int) -> CheckpointStore:
        """The store of the same run that saves and loads ``seed``'s files."""
        return CheckpointStore(self.folder.parent, self._scenario, seed, keep_state=self.keep_state)

    def path(self, index: int, label: str) -> Path:
        safe = re.sub(r"[^A-Za-z0-9_.-]", "_", label)
        tag = f"seed{self.seed}-" if len(self.seeds) > 1 else ""
        return self.folder / f"{tag}{index}-{safe}.pt"

    def state_path(self, index: int, label: str) -> Path:
        """Where strategy ``index`` keeps its devices' state (:mod:`fedkd.sim.state_store`)."""
        return self.state_folder / self.path(index, label).with_suffix(STATE_SUFFIX).name

    def state_identity(self, label: str) -> dict[str, Any]:
        """What a state store must have been written by to be resumed: this run, this strategy."""
        return {**self.identity, "label": label}

    def finished(self, index: int, label: str) -> None:
        """Strategy ``index`` is saved as complete: its state store is no longer needed (kept with
        ``keep_state`` if it holds any device's state)."""
        path = self.state_path(index, label)
        if not self.keep_state or holds_no_state(path):
            remove_store(path)

    def exists(self) -> bool:
        return self.folder.is_dir() and any(self.folder.glob("*.pt"))

    def save(self, index: int, label: str, *, complete: bool, run: dict[str, Any],
             state: dict[str, Any] | None = None) -> None:
        """Write strategy ``index``'s checkpoint: its results so far and, while it runs, its state."""
        payload = {"format": FORMAT, "identity": self.identity, "label": label, "complete": complete,
                   "run": run, "state": state}
        buffer = io.BytesIO()
        torch.save(encode(payload), buffer)
        try:
            atomic_write_bytes(self.path(index, label), buffer.getvalue())
        except OSError as exc:
            if exc.errno != errno.ENOSPC:
                raise
            raise CheckpointError(f"{self.path(index, label)}: disk full while writing the checkpoint "
                                  f"({len(buffer.getvalue()):,} bytes); the last checkpoint is whole: "
                                  "free space, then --resume") from None

    def load(self, index: int, label: str) -> dict[str, Any] | None:
        """Strategy ``index``'s checkpoint, checked against this run; None if there is none."""
        path = self.path(index, label)
        if not path.is_file():
            return None
        payload = self._read(path)
        if payload.get("label") != label:
            raise CheckpointError(f"{path}: holds strategy {payload.get('label')!r}, not {label!r}; "
                                  "run without --resume to start over")
        return payload

    def inspect(self) -> dict[str, dict[str, Any]]:
        """Every checkpoint in the folder, by label (``"<label> seed <s>"`` with several seeds):
        ``complete`` and ``rounds`` closed so far, in the order the run goes.

        A CheckpointError (one line) if any was written by a different scenario,
        seed or strategy list.
        """
        found = []
        for path in sorted(self.folder.glob("*.pt")) if self.folder.is_dir() else []:
            payload = self._read(path, any_seed=True)
            label, seed, labels = payload["label"], payload["identity"]["seed"], payload["identity"]["strategies"]
            key = label if len(self.seeds) == 1 else f"{label} seed {seed}"
            rounds = len(payload["run"]["rounds"]) - 1  # round 0 is the initial model
            order = (self.seeds.index(seed), labels.index(label) if label in labels else len(labels))
            found.append((order, key, {"complete": bool(payload["complete"]), "rounds": max(rounds, 0)}))
        return {key: value for _, key, value in sorted(found, key=lambda item: item[0])}

    def clear(self, keep_state: bool = False) -> None:
        """Remove the checkpoint files (and temporaries a kill left behind), then the folder;
        the devices' state stores too, unless ``keep_state``."""
        if not keep_state and self.state_folder.is_dir():
            for path in self.state_folder.glob(f"*{STATE_SUFFIX}"):
                remove_store(path)
            try:
                self.state_folder.rmdir()
            except OSError:
                pass  # a file fedkd did not write
        if not self.folder.is_dir():
            return
        for path in list(self.folder.glob("*.pt")) + list(self.folder.glob(".*.pt.*.tmp")):
            path.unlink(missing_ok=True)
        try:
            self.folder.rmdir()
        except OSError:
            pass  # a file fedkd did not write: leave the folder to its owner

    def _read(self, path: Path, any_seed: bool = False) -> dict[str, Any]:
        """The checkpoint at ``path``, checked against this run (``any_seed``: any of its seeds)."""
        try:
            raw = torch.load(io.BytesIO(path.read_bytes()), map_location="cpu", weights_only=True)
        except Exception as exc:  # noqa: BLE001 - any failure to read is the same problem for the user
            first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise CheckpointError(f"{path}: not a readable fedkd checkpoint ({first_line}); "
                                  "run without --resume to start over") from None
        if (not isinstance(raw, dict) or raw.get("format") != FORMAT
                or not {"label", "complete", "run", "state"} <= set(raw)
                or not isinstance(raw["run"], dict) or "rounds" not in raw["run"]):
            raise CheckpointError(f"{path}: not a fedkd checkpoint of format {FORMAT}; "
                                  "run without --resume to start over")
        self._check_identity(path, raw.get("identity"), any_seed)
        return decode(raw)

    def _check_identity(self, path: Path, identity: Any, any_seed: bool) -> None:
        mine = self.identity
        if any_seed and isinstance(identity, dict) and identity.get("seed") in self.seeds:
            mine = {**mine, "seed": identity["seed"]}  # another seed's file of this same run
        if identity == mine:
            return
        if not isinstance(identity, dict):
            problem = "it names no run"
        elif identity.get("scenario") != mine["scenario"]:
            problem = f"it is from scenario {identity.get('scenario')!r}, not {mine['scenario']!r}"
        elif identity.get("seeds") != mine.get("seeds"):
            problem = f"it is for {_seeds_text(identity)}, not {_seeds_text(mine)}"
        elif identity.get("seed") != mine["seed"]:
            problem = f"it is for seed {identity.get('seed')}, not {mine['seed']}"
        elif identity.get("strategies") != mine["strategies"]:
            problem = f"it is for strategies {identity.get('strategies')}, not {mine['strategies']}"
        else:
            problem = f"scenario {mine['scenario']!r} has changed since it was written"
        raise CheckpointError(f"{path}: cannot resume: {problem}; run without --resume to start over")


def _seeds_text(identity: dict[str, Any]) -> str:
    seeds = identity.get("seeds")
    return f"seeds {seeds}" if seeds is not None else f"seed {identity.get('seed')}"


# -- what may go into a checkpoint -------------------------------------------------

_RECORDS = {_CONFIG_RECORD: ConfigRecord, _METRIC_RECORD: MetricRecord}


def encode(value: Any) -> Any:
    """``value`` as tensors, numbers, strings and containers only (arrays, bytes, records tagged)."""
    if isinstance(value, torch.Tensor):
        return value.detach().cpu().clone()
    if isinstance(value, np.ndarray):
        if value.dtype.hasobject:
            raise TypeError("cannot checkpoint a numpy array of Python objects")
        return {_NDARRAY: torch.from_numpy(np.array(value, copy=True, order="C"))}
    if isinstance(value, np.generic):
        return value.item()
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, bytes):
        return {_BYTES: _byte_tensor(value)}
    for tag, record in _RECORDS.items():
        if isinstance(value, record):
            return {tag: [(key, encode(v)) for key, v in value.items()]}
    if isinstance(value, ArrayRecord):
        return {_ARRAY_RECORD: [(key, array.dtype, list(array.shape), array.stype, _byte_tensor(array.data))
                                for key, array in value.items()]}
    if isinstance(value, dict):
        return {_key(k): encode(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        items = [encode(v) for v in value]
        return items if isinstance(value, list) else tuple(items)
    raise TypeError(f"cannot checkpoint a {type(value).__name__}: only tensors, numpy arrays, bytes, "
                    "Flower records, numbers, strings and lists, tuples and dicts of them")


def decode(value: Any) -> Any:
    """The inverse of :func:`encode`: tagged values come back as what they were."""
    if isinstance(value, dict):
        if _NDARRAY in value:
            return value[_NDARRAY].numpy().copy()
        if _BYTES in value:
            return value[_BYTES].numpy().tobytes()
        for tag, record in _RECORDS.items():
            if tag in value:
                return record({key: decode(v) for key, v in value[tag]})
        if _ARRAY_RECORD in value:
            return ArrayRecord(array_dict={key: Array(dtype=dtype, shape=tuple(shape), stype=stype,
                                                      data=data.numpy().tobytes())
                                           for key, dtype, shape, stype, data in value[_ARRAY_RECORD]})
        return {k: decode(v) for k, v in value.items()}
    if isinstance(value, list):
        return [decode(v) for v in value]
    if isinstance(value, tuple):
        return tuple(decode(v) for v in value)
    return value


def _byte_tensor(data: bytes) -> torch.Tensor:
    # frombuffer refuses an empty buffer
    return torch.frombuffer(bytearray(data), dtype=torch.uint8) if data else torch.zeros(0, dtype=torch.uint8)


def _key(key: Any) -> str | int:
    if isinstance(key, np.integer):
        return int(key)
    if isinstance(key, (str, int)) and not isinstance(key, bool):
        return key
    raise TypeError(f"cannot checkpoint a dict keyed by {type(key).__name__}: use str or int keys")
