"""``fedkd compare RUN_DIR...``: several runs in one table and one set of plots.

Each RUN_DIR is a folder written by ``fedkd simulate``. Their ``rounds.csv``
rows are merged into ``comparison.csv`` (one row per run, strategy, seed and
round) and drawn on the three accuracy plots of :mod:`fedkd.report`: a
strategy run with several seeds as the mean over seeds and its 95 % band.
A folder written before rounds.csv had a ``seed`` column is one seed: the
``seed`` of its summary.json, or empty without one. A curve is labelled by its strategy when that is
unambiguous, by ``<scenario>/<strategy>`` when the runs come from different
scenarios, and by ``<folder>/<strategy>`` (then the path as given) when labels
would still collide. Every input is read and checked before anything is written.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from .errors import FedkdError

if TYPE_CHECKING:  # pandas is imported when a comparison runs, not whenever the CLI starts
    import pandas as pd

NEEDED_COLUMNS = ["strategy", "round", "sim_time_s", "accuracy", "cum_bytes", "cum_energy_j"]
LEAD_COLUMNS = ["label", "scenario", "source"]  # source: the run folder as given
TABLE = "comparison.csv"


@dataclass(frozen=True)
class RunFolder:
    path: Path  # as the user gave it
    scenario: str
    rounds: pd.DataFrame  # always with a seed column (nullable integers)


def read_run(path: Path) -> RunFolder:
    import pandas as pd

    csv = path / "rounds.csv"
    if not path.is_dir():
        raise FedkdError(f"{path} is not a folder; expected a run folder written by `fedkd simulate`")
    if not csv.is_file():
        raise FedkdError(f"{path} has no rounds.csv; expected a run folder written by `fedkd simulate`")
    try:
        rounds = pd.read_csv(csv, keep_default_na=False, na_values=[""])
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as exc:
        raise FedkdError(f"{csv} cannot be read: {' '.join(str(exc).split())}") from None
    missing = [c for c in NEEDED_COLUMNS if c not in rounds.columns]
    if missing:
        raise FedkdError(f"{csv} lacks columns {missing}; was it written by `fedkd simulate`?")
    if rounds.empty:
        raise FedkdError(f"{csv} has no rounds")
    rounds["strategy"] = rounds["strategy"].astype(str)  # a label such as "1" stays text
    summary = _summary(path)
    if "seed" not in rounds.columns:  # written before the column existed: the run's one seed
        seed = summary.get("seed")
        rounds.insert(1, "seed", seed if isinstance(seed, int) and not isinstance(seed, bool) else None)
    try:
        # Nullable integers: a seed reads "3", not "3.0", next to a folder that has none.
        rounds["seed"] = rounds["seed"].astype("Int64")
    except (TypeError, ValueError):
        raise FedkdError(f"{csv}: the seed column holds something other than integers") from None
    return RunFolder(path, str(summary.get("scenario") or path.resolve().name), rounds)


def _summary(path: Path) -> dict:
    """The folder's summary.json, or {} when it has none (an older or hand-made run)."""
    summary = path / "summary.json"
    if not summary.is_file():
        return {}
    try:
        content = json.loads(summary.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as exc:
        raise FedkdError(f"{summary} is not valid JSON: {' '.join(str(exc).split())}") from None
    if not isinstance(content, dict):
        raise FedkdError(f"{summary} holds a {type(content).__name__}; expected the summary of a fedkd run")
    return content


def run_labels(runs: list[RunFolder]) -> list[str]:
    """A prefix per run such that every (prefix, strategy) pair is unique; '' if none is needed."""
    schemes = [
        lambda run: "" if len({r.scenario for r in runs}) == 1 else f"{run.scenario}/",
        lambda run: f"{run.path.resolve().name}/",
        lambda run: f"{run.path}/",
    ]
    for scheme in schemes:
        prefixes = [scheme(run) for run in runs]
        labels = [p + s for p, run in zip(prefixes, runs) for s in run.rounds["strategy"].unique()]
        if len(set(labels)) == len(labels):
            return prefixes
    raise AssertionError("distinct folders always give distinct path prefixes")


def merge_runs(runs: list[RunFolder]) -> pd.DataFrame:
    import pandas as pd

    from .report import ROUND_COLUMNS

    frames = []
    for prefix, run in zip(run_labels(runs), runs):
        frame = run.rounds.copy()
        frame.insert(0, "source", str(run.path))
        frame.insert(0, "scenario", run.scenario)
        frame.insert(0, "label", prefix + frame["strategy"])
        frames.append(frame)
    merged = pd.concat(frames, ignore_index=True, sort=False)
    known = LEAD_COLUMNS + [c for c in ROUND_COLUMNS if c in merged.columns]
    return merged.reindex(columns=known + sorted(c for c in merged.columns if c not in known))


def write_comparison(out_dir: Path, merged: pd.DataFrame) -> list[Path]:
    """comparison.csv and the three plots, each written atomically; returns their paths."""
    from .report import PLOTS, _plot, atomic_write_bytes

    written = [out_dir / TABLE]
    atomic_write_bytes(written[0], merged.to_csv(index=False, lineterminator="\n").encode())
    curves = merged.assign(strategy=merged["label"])  # the plots draw one line per "strategy"
    for name, (x, xlabel) in PLOTS.items():
        atomic_write_bytes(out_dir / name, _plot(curves, x, xlabel, f"comparison: accuracy vs {xlabel.split(' (')[0]}"))
        written.append(out_dir / name)
    return written


def _check_inputs(paths: list[Path], out_dir: Path) -> None:
    seen: dict[Path, Path] = {}
    for path in paths:
        real = path.resolve()
        if real in seen:
            raise FedkdError(f"run folder {path} is given twice (also as {seen[real]})")
        seen[real] = path
    if out_dir.exists() and not out_dir.is_dir():
        raise FedkdError(f"--out {out_dir} exists and is not a folder")
    if out_dir.resolve() in seen:
        raise FedkdError(f"--out {out_dir} is one of the run folders; its plots would be overwritten")


def cmd_compare(args) -> int:
    paths, out_dir = [Path(p) for p in args.runs], Path(args.out)
    _check_inputs(paths, out_dir)
    merged = merge_runs([read_run(p) for p in paths])
    written = write_comparison(out_dir, merged)
    width = max(len(label) for label in merged["label"])
    for label, rows in merged.groupby("label", sort=False):
        print(f"{label:>{width}}: {_final_line(rows)}")
    print(f"comparison in {out_dir}/ ({', '.join(p.name for p in written)})")
    return 0


def _final_line(rows: pd.DataFrame) -> str:
    """One curve's last round; with several seeds the means over seeds (accuracy with its 95 % CI)."""
    from .stats import summarize_values

    finals = rows.groupby("seed", sort=False, dropna=False).tail(1)  # each seed's last round
    last = finals.mean(numeric_only=True)
    accuracy, note = f"{last['accuracy']:.3f}", ""
    stats = summarize_values(finals["accuracy"].tolist())
    if stats["ci95"] is not None:
        accuracy += f" ± {stats['ci95'][1] - stats['mean']:.3f}"
        note = f" (means over {stats['n']} seeds; accuracy ± 95 % CI)"
    return (f"accuracy {accuracy} after {int(finals['round'].max())} rounds, {last['sim_time_s']:,.0f} s simulated, "
            f"{last['cum_bytes']:,.0f} bytes, {last['cum_energy_j']:,.1f} J{note}")


def register(subparsers) -> None:
    parser = subparsers.add_parser("compare", help="merge runs into one table and one set of plots")
    parser.add_argument("runs", nargs="+", metavar="RUN_DIR", help="folders written by `fedkd simulate`")
    parser.add_argument("--out", default="comparison", help="where to write them (default: ./comparison/)")
    parser.set_defaults(func=cmd_compare)
