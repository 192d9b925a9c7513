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
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only; no display on servers and CI
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from .results import StrategyRun  # noqa: E402
from .stats import paired_difference, ratio, summarize_values, t_halfwidth  # noqa: E402

ROUND_COLUMNS = ["strategy", "seed", "round", "sim_time_s", "accuracy", "bytes_up", "bytes_down", "energy_j",
                 "participants", "dropped", "cum_bytes", "cum_energy_j", "available_devices", "dead_devices",
                 "total_bytes", "cum_total_bytes"]
DEVICE_COLUMNS = ["strategy", "seed", "round", "phase", "device_id", "device_class", "status", "reason",
                  "start_s", "end_s", "bytes_down", "bytes_up", "energy_j", "battery_j"]
# Per-round traffic that counts towards total_bytes besides bytes_up + bytes_down (absent = 0).
EXTRA_TRAFFIC_COLUMNS = ("backhaul_bytes", "d2d_bytes")
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
    """One row per (run, round), in the order of ``runs``, with running totals per run."""
    rows = []
    for run in runs:
        cum_bytes, cum_total_bytes, cum_energy = 0, 0, 0.0
        for r in run.rounds:
            # Everything the devices' radios carried: server links and device-to-device links.
            cum_bytes += r.bytes_up + r.bytes_down + int(r.metrics.get("d2d_bytes", 0))
            # Everything any link carried, the fogs' backhaul included: what a run costs the network.
            total_bytes = r.bytes_up + r.bytes_down + sum(int(r.metrics.get(c, 0)) for c in EXTRA_TRAFFIC_COLUMNS)
            cum_total_bytes += total_bytes
            cum_energy += r.energy_j
            row = {k: v for k, v in asdict(r).items() if k != "metrics"}
            row.update(seed=run.seed, cum_bytes=cum_bytes, cum_energy_j=cum_energy, total_bytes=total_bytes,
                       cum_total_bytes=cum_total_bytes, **r.metrics)
            rows.append(row)
    frame = pd.DataFrame(rows)
    extra = sorted(c for c in frame.columns if c not in ROUND_COLUMNS) if rows else []
    return frame.reindex(columns=ROUND_COLUMNS + extra)


def devices_frame(runs: list[StrategyRun]) -> pd.DataFrame:
    rows = [{**asdict(d), "seed": run.seed} for run in runs for d in run.devices]
    return pd.DataFrame(rows).reindex(columns=DEVICE_COLUMNS)


# Per-strategy statistics over seeds (summary.json "stats"); see results/README.md.
STAT_FIELDS = ("final_accuracy", "time_to_target_s", "energy_to_target_j", "bytes_to_target",
               "total_bytes", "energy_j", "sim_time_s")
# Each to-target field: the rounds.csv column read at the first round reaching the target accuracy.
TO_TARGET_COLUMNS = {"time_to_target_s": "sim_time_s", "energy_to_target_j": "cum_energy_j",
                     "bytes_to_target": "cum_total_bytes"}
PAIRED_FIELDS = ("final_accuracy", "time_to_target_s", "energy_to_target_j", "total_bytes")
RATIO_FIELDS = ("time_to_target_s", "energy_to_target_j", "total_bytes")


def default_baseline(strategies: list[tuple[str, str]]) -> str | None:
    """Of (run label, strategy reference) pairs: the first whose strategy shares weights, else
    the first that is no reference line (REFERENCE_STRATEGIES), else the first."""
    from .errors import FedkdError
    from .registry import resolve_strategy

    for label, name in strategies:
        try:
            if resolve_strategy(name).shares_weights:
                return label
        except FedkdError:
            continue  # a strategy this process cannot load is no default; the others may be
    plain = [label for label, name in strategies if name not in REFERENCE_STRATEGIES]
    return (plain or [label for label, _ in strategies] or [None])[0]


def _seed_values(rows: pd.DataFrame, target: float | None) -> dict[str, Any]:
    """One run's (strategy, seed) numbers: its last round's, its sums, and where it first reached
    ``target`` (None there if it never did)."""
    if not len(rows):
        return {"rounds_completed": 0, "final_accuracy": None, "best_accuracy": None, "sim_time_s": 0.0,
                "bytes_up": 0, "bytes_down": 0, "total_bytes": 0, "energy_j": 0.0, "devices_dead_at_end": 0,
                **{f: None for f in TO_TARGET_COLUMNS}, "cum_bytes_to_target": None, "reached": False}
    last = rows.iloc[-1]
    hit = rows[rows["accuracy"] >= target] if target is not None else rows.iloc[:0]
    first = hit.iloc[0] if len(hit) else None
    at_target = {f: (None if first is None else _number(first[c])) for f, c in TO_TARGET_COLUMNS.items()}
    return {"rounds_completed": int(last["round"]), "final_accuracy": float(last["accuracy"]),
            "best_accuracy": float(rows["accuracy"].max()), "sim_time_s": float(last["sim_time_s"]),
            "bytes_up": int(rows["bytes_up"].sum()), "bytes_down": int(rows["bytes_down"].sum()),
            "total_bytes": int(last["cum_total_bytes"]), "energy_j": float(rows["energy_j"].sum()),
            "devices_dead_at_end": int(last["dead_devices"]), **at_target,
            "cum_bytes_to_target": None if first is None else float(first["cum_bytes"]),
            "reached": first is not None}


def _number(value: Any) -> int | float:
    return int(value) if isinstance(value, (int, np.integer)) else float(value)


def _combined(values: list[Any]) -> Any:
    """The backward-compatible scalar: one seed's own value; with several, the mean of those not None."""
    if len(values) == 1:
        return values[0]
    kept = [v for v in values if v is not None]
    return float(np.mean(kept)) if kept else None


def _stats(per_seed: dict[int, dict[str, Any]], name: str) -> dict[str, Any]:
    """summary.json's statistic of field ``name`` over seeds (None values: seeds that never reached)."""
    values = {seed: v[name] for seed, v in per_seed.items()}
    out = summarize_values(list(values.values()))
    out = {"mean": out["mean"], "std": out["std"], "ci95": out["ci95"],
           "per_seed": {str(seed): v for seed, v in values.items()}, "n": out["n"]}
    if name in TO_TARGET_COLUMNS:
        out["reached"] = f"{out['n']}/{len(values)}"
    return out


def _versus_baseline(mine: dict[int, dict[str, Any]], base: dict[int, dict[str, Any]]) -> dict[str, Any]:
    """Paired differences (mine - baseline) over the seeds both ran, and ratios of the means."""
    common = [seed for seed in mine if seed in base]
    out: dict[str, Any] = {
        name: paired_difference([mine[s][name] for s in common], [base[s][name] for s in common])
        for name in PAIRED_FIELDS}
    out["ratio"] = {name: ratio(summarize_values([v[name] for v in mine.values()])["mean"],
                                summarize_values([v[name] for v in base.values()])["mean"])
                    for name in RATIO_FIELDS}
    return out


def _labelled_public(runs: list[StrategyRun]) -> dict[str, Any]:
    """The label budget: distinct labelled public samples read, in total and by purpose."""
    if len(runs) == 1:
        return {"total": runs[0].labelled_public_total, "by_purpose": dict(sorted(runs[0].labelled_public.items()))}
    purposes = sorted({p for run in runs for p in run.labelled_public})
    return {"total": max(run.labelled_public_total for run in runs),
            "by_purpose": {p: max(run.labelled_public.get(p, 0) for run in runs) for p in purposes},
            "per_seed": [{"seed": run.seed, "total": run.labelled_public_total,
                          "by_purpose": dict(sorted(run.labelled_public.items()))} for run in runs]}


def _stopped_early(runs: list[StrategyRun]) -> str | None:
    if len(runs) == 1:
        return runs[0].stopped_early
    reasons = [f"seed {run.seed}: {run.stopped_early}" for run in runs if run.stopped_early]
    return "; ".join(reasons) or None


def _strategy_summary(runs: list[StrategyRun], per_seed: dict[int, dict[str, Any]], failures: dict[str, int],
                      target: float | None) -> dict[str, Any]:
    """One strategy (run label) over its seeds: the fields of a one-seed summary, then the new ones."""
    values = list(per_seed.values())

    def combined(name: str) -> Any:
        return _combined([v[name] for v in values])

    reached = [v for v in values if v["reached"]]
    to_reference = None if target is None else {
        "sim_time_s": _combined([v["time_to_target_s"] for v in reached]) if reached else None,
        "cum_energy_j": _combined([v["energy_to_target_j"] for v in reached]) if reached else None,
        "cum_bytes": _combined([v["cum_bytes_to_target"] for v in reached]) if reached else None}
    return {
        "strategy": runs[0].strategy,
        "rounds_completed": min(v["rounds_completed"] for v in values),
        **{name: combined(name) for name in ("final_accuracy", "best_accuracy", "sim_time_s", "bytes_up",
                                             "bytes_down", "energy_j")},
        "failures": failures,
        # What the first device task that raised (or replied invalid) said: most often a bug.
        "first_device_task_error": next((f"seed {run.seed}, {run.first_device_task_error}" for run in runs
                                         if run.first_device_task_error), None),
        "devices_dead_at_end": combined("devices_dead_at_end"),
        "to_reference_accuracy": to_reference,
        "stopped_early": _stopped_early(runs),
        "wall_time_s": round(sum(run.wall_time_s for run in runs), 3),
        "seeds": [run.seed for run in runs],
        "total_bytes": combined("total_bytes"),
        "labelled_public": _labelled_public(runs),
        "stats": {name: _stats(per_seed, name) for name in STAT_FIELDS},
    }


def _failures(devices: pd.DataFrame, label: str) -> dict[str, int]:
    """Failed tasks by reason, summed over the strategy's seeds."""
    tasks = devices[devices["strategy"] == label] if len(devices) else devices
    counts = tasks[tasks["status"] == "failed"]["reason"].value_counts().sort_index() if len(tasks) else {}
    return {str(k): int(v) for k, v in dict(counts).items()}


def summarize(runs: list[StrategyRun], rounds: pd.DataFrame, devices: pd.DataFrame,
              header: dict[str, Any], baseline: str | None = None) -> dict[str, Any]:
    """summary.json: ``header``, the baseline and its target accuracy, and one entry per strategy."""
    by_label: dict[str, list[StrategyRun]] = {}
    for run in runs:
        by_label.setdefault(run.label, []).append(run)
    if baseline is None:
        baseline = default_baseline([(label, group[0].strategy) for label, group in by_label.items()])
    elif baseline not in by_label:
        raise ValueError(f"baseline {baseline!r} is none of the runs {list(by_label)}")
    groups = {key: rows for key, rows in rounds.groupby(["strategy", "seed"], sort=False)} if len(rounds) else {}

    def rows_of(run: StrategyRun) -> pd.DataFrame:
        return groups.get((run.label, run.seed), rounds.iloc[:0])

    # The target: the baseline's final accuracy, mean over its seeds.
    target = summarize_values([_seed_values(rows_of(run), None)["final_accuracy"]
                               for run in by_label.get(baseline, [])])["mean"]
    per_seed = {label: {run.seed: _seed_values(rows_of(run), target) for run in group}
                for label, group in by_label.items()}
    strategies = {}
    for label, group in by_label.items():
        strategies[label] = _strategy_summary(group, per_seed[label], _failures(devices, label), target)
        strategies[label]["vs_baseline"] = (None if label == baseline
                                            else _versus_baseline(per_seed[label], per_seed[baseline]))
    return {**header, "reference": {"strategy": baseline, "final_accuracy": target},
            "baseline": {"strategy": baseline, "target_accuracy": target}, "strategies": strategies}


# Strategies drawn as a dashed horizontal line at their final accuracy: references that
# move no bytes and take no simulated time, so as points they would pile up at x = 0.
REFERENCE_STRATEGIES = ("centralized",)


def _seed_count(group: pd.DataFrame) -> int:
    """Seeds in one strategy's rows; a table without a seed column (an older run) has one."""
    return int(group["seed"].nunique()) if "seed" in group.columns else 1


def _mean_final_accuracy(group: pd.DataFrame) -> float:
    """The last round's accuracy, averaged over seeds when there are several."""
    if _seed_count(group) > 1:
        return float(group.groupby("seed", sort=False)["accuracy"].last().mean())
    return float(group["accuracy"].iloc[-1])


def mean_curve(group: pd.DataFrame, x: str) -> pd.DataFrame:
    """Per round over seeds: mean of ``x``, mean accuracy and its 95 % t-band (``lo``, ``hi``).

    A round only one seed reached has a band of zero width: no spread to show.
    """
    per_round = group.groupby("round", sort=True).agg(
        x=(x, "mean"), accuracy=("accuracy", "mean"), std=("accuracy", "std"), n=("accuracy", "count"))
    half = np.nan_to_num(t_halfwidth(per_round["std"].to_numpy(), per_round["n"].to_numpy()), nan=0.0)
    return per_round.assign(lo=per_round["accuracy"] - half, hi=per_round["accuracy"] + half).reset_index()


def _plot(rounds: pd.DataFrame, x: str, xlabel: str, title: str, references: frozenset[str] = frozenset()) -> bytes:
    """Accuracy against ``x``, a line per strategy; with several seeds the mean and its 95 % band."""
    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=100)
    for i, (label, group) in enumerate(rounds.groupby("strategy", sort=False)):
        color = f"C{i % 10}"  # matplotlib's default cycle, given explicitly: axhline does not advance it
        seeds = _seed_count(group)
        if label in references:
            ax.axhline(_mean_final_accuracy(group), linestyle="--", linewidth=1.2, color=color,
                       label=f"{label} (reference)")
        elif seeds > 1:
            curve = mean_curve(group, x)
            ax.plot(curve["x"], curve["accuracy"], marker="o", markersize=3, color=color,
                    label=f"{label} (mean of {seeds} seeds, 95 % CI)")
            ax.fill_between(curve["x"], curve["lo"], curve["hi"], color=color, alpha=0.2, linewidth=0)
        else:
            ax.plot(group[x], group["accuracy"], marker="o", markersize=3, color=color, label=label)
    ax.set_xlabel(xlabel)
    ax.set_ylabel("test accuracy")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    return png_bytes(fig)


FAILURE_REASONS = ("deadline", "offline", "battery", "timeout", "invalid", "error")  # stacking order of the dropout bars


def png_bytes(fig) -> bytes:
    """``fig`` laid out and rendered as PNG; a pyplot figure is closed (freed) after."""
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
                 "seed": r.get("seed", 0), "round": r["round"], "sim_time_s": r["sim_time_s"], "mean": r[c],
                 "min": r.get(c.replace("_mean_", "_min_"), math.nan)}
                for c in snapshot for _, r in rounds.iterrows() if pd.notna(r[c])]
        return _over_seeds(pd.DataFrame(rows)), "all devices of the class, at each round's end"
    tasks = devices[devices["battery_j"].astype(float).map(math.isfinite)] if len(devices) else devices
    if not len(tasks):
        return pd.DataFrame(), ""
    with_seed = "seed" in tasks.columns and "seed" in rounds.columns
    keys = ["strategy", "seed", "round"] if with_seed else ["strategy", "round"]
    per_round = (tasks.groupby(["device_class", *keys], sort=False)["battery_j"]
                 .agg(["mean", "min"]).reset_index()
                 .merge(rounds[[*keys, "sim_time_s"]], on=keys))
    return _over_seeds(per_round), "charge left after each task, devices chosen that round"


def _over_seeds(per_round: pd.DataFrame) -> pd.DataFrame:
    """Battery rows of several seeds as one line per (class, strategy): each number's mean over seeds."""
    if "seed" not in per_round.columns or per_round["seed"].nunique() <= 1:
        return per_round.drop(columns=["seed"], errors="ignore")
    return (per_round.groupby(["device_class", "strategy", "round"], sort=False)[["sim_time_s", "mean", "min"]]
            .mean().reset_index())


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
    return png_bytes(fig)


def _dropouts_plot(rounds: pd.DataFrame, devices: pd.DataFrame, title: str) -> bytes | None:
    """Failed tasks per round, stacked by reason, one panel per strategy."""
    if not len(rounds):
        return None
    labels = list(rounds["strategy"].unique())
    failed = devices[devices["status"] == "failed"] if len(devices) else devices
    fig, axes = plt.subplots(len(labels), 1, figsize=(8.5, 2.4 * len(labels) + 0.8), dpi=100,
                             sharex=True, squeeze=False)
    for ax, label in zip(axes[:, 0], labels):
        own_rounds = rounds[rounds["strategy"] == label]
        round_numbers = np.sort(own_rounds["round"].unique())
        seeds = _seed_count(own_rounds)  # with several seeds a bar is the mean per seed
        mine = failed[failed["strategy"] == label] if len(failed) else failed
        bottom = pd.Series(0.0, index=round_numbers)
        for i, reason in enumerate(FAILURE_REASONS):
            counts = (mine[mine["reason"] == reason].groupby("round").size() if len(mine) else pd.Series(dtype=int))
            counts = counts.reindex(round_numbers, fill_value=0) / max(seeds, 1)
            ax.bar(round_numbers, counts.to_numpy(), bottom=bottom.to_numpy(), color=f"C{i}", label=reason)
            bottom += counts.to_numpy()
        ax.set_ylabel(f"{label}\nfailed tasks" + (f"\n(mean of {seeds} seeds)" if seeds > 1 else ""))
        ax.grid(alpha=0.3, axis="y")
        ax.legend(fontsize="small", loc="upper left", bbox_to_anchor=(1.01, 1.0))
    axes[-1, 0].set_xlabel("round")
    axes[0, 0].set_title(f"{title}: dropouts per round by reason")
    return png_bytes(fig)


def versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {"python": platform.python_version()}
    for pkg in ("fedkd", "flwr", "torch", "numpy", "simpy", "pandas"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            out[pkg] = "not installed"
    return out


def write_results(out_dir: Path, runs: list[StrategyRun], header: dict[str, Any],
                  baseline: str | None = None) -> list[Path]:
    """Write rounds.csv, devices.csv, summary.json and the plots; return their paths.

    ``runs`` are in the order rows are written (fedkd.runner: strategy, then seed).
    ``baseline``: the run label the others are compared with (default: :func:`default_baseline`).
    """
    out_dir = Path(out_dir)
    if "seeds" not in header and isinstance(header.get("seed"), int):
        # A one-seed caller that leaves StrategyRun.seed unset (fedkd.flower_app) names the seed here.
        runs = [replace(run, seed=header["seed"]) for run in runs]
    if "seeds" not in header:
        header = {**header, "seeds": list(dict.fromkeys(run.seed for run in runs))}
    rounds, devices = rounds_frame(runs), devices_frame(runs)
    written = []

    def put(name: str, data: bytes) -> None:
        atomic_write_bytes(out_dir / name, data)
        written.append(out_dir / name)

    put("rounds.csv", rounds.to_csv(index=False, lineterminator="\n").encode())
    put("devices.csv", devices.to_csv(index=False, lineterminator="\n").encode())
    summary = summarize(runs, rounds, devices, header, baseline)
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
