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
         "accuracy_vs_bytes.png": ("cum_bytes", "bytes devices moved: up + down + device-to-device (cumulative)"),
         "accuracy_vs_energy.png": ("cum_energy_j", "device energy (J, cumulative)")}


def atomic_write_bytes(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        # mkstemp creates the file owner-only; results are ordinary files, so apply the umask as open() would.
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
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
            # Everything the devices' radios carried: server links and device-to-device links.
            cum_bytes += r.bytes_up + r.bytes_down + int(r.metrics.get("d2d_bytes", 0))
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


# Strategies drawn as a dashed horizontal line at their final accuracy: references that
# move no bytes and take no simulated time, so as points they would pile up at x = 0.
REFERENCE_STRATEGIES = ("centralized",)


def _plot(rounds: pd.DataFrame, x: str, xlabel: str, title: str, references: frozenset[str] = frozenset()) -> bytes:
    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=100)
    for i, (label, group) in enumerate(rounds.groupby("strategy", sort=False)):
        color = f"C{i % 10}"  # matplotlib's default cycle, given explicitly: axhline does not advance it
        if label in references:
            ax.axhline(group["accuracy"].iloc[-1], linestyle="--", linewidth=1.2, color=color,
                       label=f"{label} (reference)")
        else:
            ax.plot(group[x], group["accuracy"], marker="o", markersize=3, color=color, label=label)
    ax.set_xlabel(xlabel)
    ax.set_ylabel("test accuracy")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    return _png(fig)


FAILURE_REASONS = ("deadline", "offline", "battery", "timeout", "invalid", "error")  # stacking order of the dropout bars


def _png(fig) -> bytes:
    fig.tight_layout()
    with tempfile.SpooledTemporaryFile() as buf:
        fig.savefig(buf, format="png")
        plt.close(fig)
        buf.seek(0)
        return buf.read()


def _battery_per_round(rounds: pd.DataFrame, devices: pd.DataFrame) -> tuple[pd.DataFrame, str]:
    """Per (device class, strategy, round): mean and lowest battery_j, and what they cover.

    From the population snapshot in rounds.csv (``battery_mean_j_<class>``) when the
    run recorded one, else from the tasks in devices.csv (only the devices chosen).
    """
    snapshot = [c for c in rounds.columns if c.startswith("battery_mean_j_")]
    if snapshot:
        rows = [{"device_class": c.removeprefix("battery_mean_j_"), "strategy": r["strategy"],
                 "round": r["round"], "sim_time_s": r["sim_time_s"], "mean": r[c],
                 "min": r.get(c.replace("_mean_", "_min_"), math.nan)}
                for c in snapshot for _, r in rounds.iterrows() if pd.notna(r[c])]
        return pd.DataFrame(rows), "all devices of the class, at each round's end"
    tasks = devices[devices["battery_j"].astype(float).map(math.isfinite)] if len(devices) else devices
    if not len(tasks):
        return pd.DataFrame(), ""
    per_round = (tasks.groupby(["device_class", "strategy", "round"], sort=False)["battery_j"]
                 .agg(["mean", "min"]).reset_index()
                 .merge(rounds[["strategy", "round", "sim_time_s"]], on=["strategy", "round"]))
    return per_round, "charge left after each task, devices chosen that round"


def _battery_plot(rounds: pd.DataFrame, devices: pd.DataFrame, title: str) -> bytes | None:
    """Mean and lowest battery over simulated time, one panel per battery-powered class."""
    per_round, covers = _battery_per_round(rounds, devices)
    if not len(per_round):
        return None
    classes = list(dict.fromkeys(per_round["device_class"]))
    fig, axes = plt.subplots(len(classes), 1, figsize=(8.5, 2.6 * len(classes) + 0.8), dpi=100,
                             sharex=True, squeeze=False)
    colors = {label: f"C{i}" for i, label in enumerate(rounds["strategy"].unique())}
    for ax, name in zip(axes[:, 0], classes):
        for label, group in per_round[per_round["device_class"] == name].groupby("strategy", sort=False):
            ax.plot(group["sim_time_s"], group["mean"], marker="o", markersize=3, color=colors[label],
                    label=f"{label} mean")
            ax.plot(group["sim_time_s"], group["min"], linestyle="--", color=colors[label], label=f"{label} lowest")
        ax.set_ylabel(f"{name}\nbattery (J)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small", loc="upper left", bbox_to_anchor=(1.01, 1.0))
    axes[-1, 0].set_xlabel("simulated time (s)")
    axes[0, 0].set_title(f"{title}: battery, {covers}", fontsize="medium")
    return _png(fig)


def _dropouts_plot(rounds: pd.DataFrame, devices: pd.DataFrame, title: str) -> bytes | None:
    """Failed tasks per round, stacked by reason, one panel per strategy."""
    if not len(rounds):
        return None
    labels = list(rounds["strategy"].unique())
    failed = devices[devices["status"] == "failed"] if len(devices) else devices
    fig, axes = plt.subplots(len(labels), 1, figsize=(8.5, 2.4 * len(labels) + 0.8), dpi=100,
                             sharex=True, squeeze=False)
    for ax, label in zip(axes[:, 0], labels):
        round_numbers = rounds.loc[rounds["strategy"] == label, "round"].to_numpy()
        mine = failed[failed["strategy"] == label] if len(failed) else failed
        bottom = pd.Series(0, index=round_numbers)
        for i, reason in enumerate(FAILURE_REASONS):
            counts = (mine[mine["reason"] == reason].groupby("round").size() if len(mine) else pd.Series(dtype=int))
            counts = counts.reindex(round_numbers, fill_value=0)
            ax.bar(round_numbers, counts.to_numpy(), bottom=bottom.to_numpy(), color=f"C{i}", label=reason)
            bottom += counts.to_numpy()
        ax.set_ylabel(f"{label}\nfailed tasks")
        ax.grid(alpha=0.3, axis="y")
        ax.legend(fontsize="small", loc="upper left", bbox_to_anchor=(1.01, 1.0))
    axes[-1, 0].set_xlabel("round")
    axes[0, 0].set_title(f"{title}: dropouts per round by reason")
    return _png(fig)


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
    references = frozenset(r.label for r in runs if r.strategy in REFERENCE_STRATEGIES)
    for name, (x, xlabel) in PLOTS.items():
        if len(rounds):
            put(name, _plot(rounds, x, xlabel, f"{header.get('scenario', '')}: accuracy vs {xlabel.split(' (')[0]}",
                            references))
    for name, plot in (("battery.png", _battery_plot), ("dropouts.png", _dropouts_plot)):
        png = plot(rounds, devices, header.get("scenario", ""))
        if png is not None:
            put(name, png)
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
