"""The ``fedkd`` command line.

Errors a user can fix (a bad scenario, an unknown strategy, a missing file)
print one line and exit with code 2; nothing is written in that case.
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

from .arguments import positive_int

os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")

EXIT_USAGE = 2

# Modules that add a subcommand: each has `register(subparsers)`, which adds a
# parser whose `func(args) -> int` runs it. Listed explicitly, imported lazily.
SUBCOMMAND_MODULES: tuple[str, ...] = ("fedkd.dataview", "fedkd.compare", "fedkd.sim.catalogue")


def _progress_printer(stream):
    """A one-line progress bar per strategy on a terminal; nothing otherwise."""
    if not stream.isatty():
        return None

    def show(label, record, total_rounds) -> None:
        width = 24
        done = int(width * record.round / max(total_rounds, 1))
        stream.write(f"\r{label:>12} [{'#' * done}{'.' * (width - done)}] round {record.round}/{total_rounds}"
                     f"  acc {record.accuracy:.3f}  t={record.sim_time_s:,.0f}s ")
        if record.round >= total_rounds:
            stream.write("\n")
        stream.flush()

    return show


def default_jobs(backend_kind: str = "inprocess") -> int:
    """``--jobs`` when not given: ``FEDKD_JOBS`` if set (the test suite sets 1), else the cores;
    on the ray backend no cap of ours (Ray runs as many runs at once as its cluster has CPUs)."""
    from .errors import FedkdError
    from .runtime.backends import default_executors

    text = os.environ.get("FEDKD_JOBS", "").strip()
    if not text:
        return sys.maxsize if backend_kind == "ray" else default_executors()
    if not text.isdigit() or int(text) < 1:
        raise FedkdError(f"FEDKD_JOBS={text!r}: expected a positive integer")
    return int(text)


def cmd_validate(args) -> int:
    from .checks import load_scenario

    scenario = load_scenario(args.scenario)
    from .sizes import check_sizes

    # Memory for the population and disk for the devices' state (in the default results folder).
    check_sizes(scenario, args.scenario, Path("results") / scenario.name)
    print(f"{args.scenario}: ok ({scenario.name}: {scenario.population.devices:,} devices, "
          f"{scenario.rounds} rounds, strategies {[s.run_label for s in scenario.strategies]})")
    from .data.checks import describe_data

    print(describe_data(scenario))  # what the dataset became: worth a look for arrays / huggingface mappings
    return 0


def cmd_strategies(args) -> int:
    from .registry import registered_strategies, resolve_strategy

    names = list(registered_strategies())
    width = max(map(len, names), default=0)
    for name in names:
        print(f"{name:<{width}}  {resolve_strategy(name).description}")
    return 0


def _announce_checkpoint(store, resume: bool) -> None:
    """Say on stderr what becomes of a checkpoint; refuse one from another run (CheckpointError)."""
    if resume:
        found = store.inspect()
        if not found:
            print(f"fedkd: no checkpoint in {store.folder}; starting from the first round", file=sys.stderr)
            return
        where = ", ".join(f"{label} {'done' if s['complete'] else 'after round ' + str(s['rounds'])}"
                          for label, s in found.items())
        print(f"fedkd: resuming from {store.folder}: {where}", file=sys.stderr)
    elif store.exists():
        print(f"fedkd: note: {store.folder} holds a checkpoint of an earlier run; starting over and "
              "overwriting it (--resume continues it instead)", file=sys.stderr)


def _seeds_option(args) -> list[int] | None:
    """``--seeds`` as a list; FedkdError (one line, exit 2) if malformed or given with ``--seed``."""
    from .errors import FedkdError
    from .stats import parse_seeds

    if args.seeds is None:
        return None
    if args.seed is not None:
        raise FedkdError("--seed and --seeds: expected one of them (--seed N is --seeds N)")
    try:
        return parse_seeds(args.seeds)
    except ValueError as exc:
        raise FedkdError(f"--seeds {args.seeds}: {exc}") from None


def cmd_simulate(args) -> int:
    from .checks import load_scenario

    seeds = _seeds_option(args)
    scenario = load_scenario(args.scenario)  # first: a malformed file is refused before anything runs
    from .checkpoint import CheckpointStore
    from .runner import baseline_label, simulate, with_overrides

    scenario = with_overrides(scenario, args.scenario, seed=args.seed, seeds=seeds, rounds=args.rounds,
                              strategies=args.strategy, backend=args.backend)
    baseline = baseline_label(scenario, args.baseline)
    out_dir = Path(args.out) if args.out else Path("results") / scenario.name
    if out_dir.exists() and not out_dir.is_dir():
        from .errors import FedkdError

        raise FedkdError(f"--out {out_dir} exists and is not a folder")
    _announce_checkpoint(CheckpointStore(out_dir, scenario), args.resume)
    jobs = args.jobs or default_jobs(scenario.backend.kind)
    runs, written = simulate(scenario, args.scenario, out_dir, _progress_printer(sys.stderr), resume=args.resume,
                             baseline=baseline, jobs=jobs, keep_state=args.keep_state)
    _print_runs(runs)
    print(f"results in {out_dir}/ ({', '.join(p.name for p in written)})")
    return 0


def _print_runs(runs) -> None:
    """A line per run (per strategy and seed); with several seeds then a line per strategy."""
    several = len({run.seed for run in runs}) > 1
    for run in runs:
        last = run.rounds[-1] if run.rounds else None
        note = f"  (stopped early: {run.stopped_early})" if run.stopped_early else ""
        name = f"{run.label} seed {run.seed}" if several else run.label
        if last is not None:
            print(f"{name:>12}: accuracy {last.accuracy:.3f} after {last.round} rounds, "
                  f"{last.sim_time_s:,.0f} s simulated, {run.wall_time_s:.1f} s wall{note}")
        if run.device_task_errors:
            # Counted as failed devices in the results; said here too, as it is most often a bug.
            print(f"fedkd: warning: {name}: {run.device_task_errors:,} of {len(run.devices):,} device tasks raised or replied "
                  f"invalid (reason error/invalid in devices.csv); the first: {run.first_device_task_error}",
                  file=sys.stderr)
    if several:
        for label in dict.fromkeys(run.label for run in runs):
            print(f"{label:>12}: {_accuracy_over_seeds([r for r in runs if r.label == label])}")


def _accuracy_over_seeds(runs) -> str:
    """``accuracy 0.512 ± 0.034 (mean ± 95 % CI over 3 seeds)``: the final accuracies' mean and t-interval."""
    from .stats import summarize_values

    finals = summarize_values([run.rounds[-1].accuracy for run in runs if run.rounds])
    if finals["mean"] is None:
        return "no rounds"
    if finals["ci95"] is None:
        return f"accuracy {finals['mean']:.3f} (1 seed with rounds)"
    half = finals["ci95"][1] - finals["mean"]
    return f"accuracy {finals['mean']:.3f} ± {half:.3f} (mean ± 95 % CI over {finals['n']} seeds)"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fedkd", description="Simulate federated and decentralized knowledge distillation on edge devices.")
    parser.add_argument("-v", "--verbose", action="store_true", help="show Flower's log")
    sub = parser.add_subparsers(dest="command", required=True)

    sim = sub.add_parser("simulate", help="run a scenario and write its results")
    sim.add_argument("scenario", help="scenario YAML file")
    sim.add_argument("--out", help="results folder (default: results/<scenario name>/)")
    sim.add_argument("--seed", type=int, help="override the scenario's seed (and run that one seed)")
    sim.add_argument("--seeds", metavar="LIST",
                     help="run every strategy once per seed: 0-4, 0,2,7 or 0-2,7 (overrides the scenario's seeds)")
    sim.add_argument("--baseline", metavar="LABEL",
                     help="the strategy summary.json compares the others with, and whose final accuracy is the "
                          "target (default: the first weight-sharing strategy, else the first)")
    sim.add_argument("--rounds", type=positive_int, help="override the number of rounds")
    sim.add_argument("--strategy", action="append", metavar="NAME",
                     help="run this strategy instead of the scenario's list (repeatable); "
                          "a registry name, module:Class or path/to/file.py:Class")
    sim.add_argument("--backend", choices=["inprocess", "processes", "ray"], help="override the execution backend")
    sim.add_argument("--jobs", type=positive_int, metavar="N",
                     help="(seed, strategy) runs side by side: in N worker processes on the in-process "
                          "backend (default: $FEDKD_JOBS, else the cores this process may use), as up to N "
                          "Ray tasks on the ray backend (default: as many as the Ray cluster has CPUs); "
                          "1 runs them one by one")
    sim.add_argument("--resume", action="store_true",
                     help="continue the run checkpointed in the results folder from its last completed round")
    sim.add_argument("--keep-state", action="store_true",
                     help="keep the devices' own models (<out>/.state/, one SQLite file per strategy and seed) "
                          "after the run, to inspect them; removed by default")
    sim.set_defaults(func=cmd_simulate)

    val = sub.add_parser("validate", help="check a scenario file without running it")
    val.add_argument("scenario")
    val.set_defaults(func=cmd_validate)

    strat = sub.add_parser("strategies", help="list the registered strategies")
    strat.set_defaults(func=cmd_strategies)

    import importlib

    for module in SUBCOMMAND_MODULES:
        importlib.import_module(module).register(sub)
    return parser



def error_line(exc: Exception) -> str:
    """The error as one line, whatever it quotes (a YAML key may hold a line break)."""
    return str(exc).replace("\r", "\\r").replace("\n", "\\n")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    import flwr.supercore.logger  # noqa: F401 - Flower sets its logger's level on import; override it after

    logging.getLogger("flwr").setLevel(logging.INFO if args.verbose else logging.ERROR)
    from .errors import FedkdError

    try:
        status = args.func(args)
        sys.stdout.flush()  # inside the try: a reader that went away is caught below
        return status
    except FedkdError as exc:
        if args.verbose and getattr(exc, "traceback_text", ""):
            print(exc.traceback_text, file=sys.stderr, end="")
        print(f"fedkd: error: {error_line(exc)}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("fedkd: interrupted; results already written are intact", file=sys.stderr)
        return 130
    except BrokenPipeError:
        # The reader went away (`fedkd devices | head`): stop quietly, as Unix tools do.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


if __name__ == "__main__":
    sys.exit(main())
