"""The one writer of results: CSV tables, a JSON summary and PNG plots.

Every file is written to a temporary name in the same folder and renamed into
place, so a run interrupted at any moment never leaves a truncated file, and
files from an earlier run stay whole until their replacements are complete.
"""
from __future__ import annotations

import json
import math
import os
import platform
import tempfile
from dataclasses import asdict
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only; no display on servers and CI
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402

from .results import StrategyRun  # noqa: E402

ROUND_COLUMNS = ["strategy", "round", "sim_time_s", "accuracy", "bytes_up", "bytes_down", "energy_j",
                 "participants", "dropped", "cum_bytes", "cum_energy_j", "available_devices", "dead_devices"]
DEVICE_COLUMNS = ["strategy", "round", "phase", "device_id", "device_class", "status", "reason", "start_s",
                  "end_s", "bytes_down", "bytes_up", "energy_j", "battery_j"]
PLOTS = {"accuracy_vs_time.png": ("sim_time_s", "simulated time (s)"),
         "accuracy_vs_bytes.png": ("cum_bytes", "bytes moved, up + down (cumulative)"),
         "accuracy_vs_energy.png": ("cum_energy_j", "device energy (J, cumulative)")}


def atomic_write_bytes(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def rounds_frame(runs: list[StrategyRun]) -> pd.DataFrame:
    rows = []
    for run in runs:
        cum_bytes, cum_energy = 0, 0.0
        for r in run.rounds:
            cum_bytes += r.bytes_up + r.bytes_down
            cum_energy += r.energy_j
            row = {k: v for k, v in asdict(r).items() if k != "metrics"}
            row.update(cum_bytes=cum_bytes, cum_energy_j=cum_energy, **r.metrics)
            rows.append(row)
    frame = pd.DataFrame(rows)
    extra = sorted(c for c in frame.columns if c not in ROUND_COLUMNS) if rows else []
    return frame.reindex(columns=ROUND_COLUMNS + extra)


def devices_frame(runs: list[StrategyRun]) -> pd.DataFrame:
    return pd.DataFrame([asdict(d) for run in runs for d in run.devices]).reindex(columns=DEVICE_COLUMNS)


def _first_reaching(frame: pd.DataFrame, target: float) -> dict[str, float | None]:
    hit = frame[frame["accuracy"] >= target]
    if hit.empty:
        return {"sim_time_s": None, "cum_energy_j": None, "cum_bytes": None}
    first = hit.iloc[0]
    return {"sim_time_s": float(first["sim_time_s"]), "cum_energy_j": float(first["cum_energy_j"]),
            "cum_bytes": float(first["cum_bytes"])}


def summarize(runs: list[StrategyRun], rounds: pd.DataFrame, devices: pd.DataFrame,
              header: dict[str, Any]) -> dict[str, Any]:
    reference = next((r.label for r in runs if r.strategy == "fedavg"), runs[0].label if runs else None)
    ref_rows = rounds[rounds["strategy"] == reference]
    reference_accuracy = float(ref_rows["accuracy"].iloc[-1]) if len(ref_rows) else None
    strategies = {}
    for run in runs:
        mine = rounds[rounds["strategy"] == run.label]
        tasks = devices[devices["strategy"] == run.label] if len(devices) else devices
        failures = tasks[tasks["status"] == "failed"]["reason"].value_counts().sort_index() if len(tasks) else {}
        last = mine.iloc[-1] if len(mine) else None
        strategies[run.label] = {
            "strategy": run.strategy,
            "rounds_completed": int(last["round"]) if last is not None else 0,
            "final_accuracy": float(last["accuracy"]) if last is not None else None,
            "best_accuracy": float(mine["accuracy"].max()) if len(mine) else None,
            "sim_time_s": float(last["sim_time_s"]) if last is not None else 0.0,
            "bytes_up": int(mine["bytes_up"].sum()), "bytes_down": int(mine["bytes_down"].sum()),
            "energy_j": float(mine["energy_j"].sum()),
            "failures": {str(k): int(v) for k, v in dict(failures).items()},
            "devices_dead_at_end": int(last["dead_devices"]) if last is not None else 0,
            "to_reference_accuracy": _first_reaching(mine, reference_accuracy) if reference_accuracy is not None else None,
            "stopped_early": run.stopped_early,
            "wall_time_s": round(run.wall_time_s, 3),
        }
    return {**header, "reference": {"strategy": reference, "final_accuracy": reference_accuracy},
            "strategies": strategies}


def _plot(rounds: pd.DataFrame, x: str, xlabel: str, title: str) -> bytes:
    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=100)
    for label, group in rounds.groupby("strategy", sort=False):
        ax.plot(group[x], group["accuracy"], marker="o", markersize=3, label=label)
    ax.set_xlabel(xlabel)
    ax.set_ylabel("test accuracy")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    with tempfile.SpooledTemporaryFile() as buf:
        fig.savefig(buf, format="png")
        plt.close(fig)
        buf.seek(0)
        return buf.read()


def versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {"python": platform.python_version()}
    for pkg in ("fedkd", "flwr", "torch", "numpy", "simpy", "pandas"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            out[pkg] = "not installed"
    return out


def write_results(out_dir: Path, runs: list[StrategyRun], header: dict[str, Any]) -> list[Path]:
    """Write rounds.csv, devices.csv, summary.json and the plots; return their paths."""
    out_dir = Path(out_dir)
    rounds, devices = rounds_frame(runs), devices_frame(runs)
    written = []

    def put(name: str, data: bytes) -> None:
        atomic_write_bytes(out_dir / name, data)
        written.append(out_dir / name)

    put("rounds.csv", rounds.to_csv(index=False, lineterminator="\n").encode())
    put("devices.csv", devices.to_csv(index=False, lineterminator="\n").encode())
    summary = summarize(runs, rounds, devices, header)
    put("summary.json", json.dumps(_finite(summary), indent=2, allow_nan=False).encode() + b"\n")
    for name, (x, xlabel) in PLOTS.items():
        if len(rounds):
            put(name, _plot(rounds, x, xlabel, f"{header.get('scenario', '')}: accuracy vs {xlabel.split(' (')[0]}"))
    return written


def _finite(value: Any) -> Any:
    """JSON has no NaN or infinity: they become null."""
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value
