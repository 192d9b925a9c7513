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

os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")

EXIT_USAGE = 2

# Modules that add a subcommand: each has `register(subparsers)`, which adds a
# parser whose `func(args) -> int` runs it. Listed explicitly, imported lazily.
SUBCOMMAND_MODULES: tuple[str, ...] = ("fedkd.dataview", "fedkd.compare")


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


def cmd_validate(args) -> int:
    from .scenario import load_scenario

    scenario = load_scenario(args.scenario)
    print(f"{args.scenario}: ok ({scenario.name}: {scenario.population.devices:,} devices, "
          f"{scenario.rounds} rounds, strategies {[s.run_label for s in scenario.strategies]})")
    return 0


def cmd_strategies(args) -> int:
    from .registry import registered_strategies, resolve_strategy

    for name in registered_strategies():
        ref = resolve_strategy(name)
        print(f"{name:<12} {ref.description}")
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


def cmd_simulate(args) -> int:
    from .scenario import load_scenario

    scenario = load_scenario(args.scenario)  # first: a malformed file is refused before torch loads
    from .checkpoint import CheckpointStore
    from .runner import simulate, with_overrides

    scenario = with_overrides(scenario, args.scenario, seed=args.seed, rounds=args.rounds,
                              strategies=args.strategy, backend=args.backend)
    out_dir = Path(args.out) if args.out else Path("results") / scenario.name
    if out_dir.exists() and not out_dir.is_dir():
        from .errors import FedkdError

        raise FedkdError(f"--out {out_dir} exists and is not a folder")
    _announce_checkpoint(CheckpointStore(out_dir, scenario), args.resume)
    runs, written = simulate(scenario, args.scenario, out_dir, _progress_printer(sys.stderr), resume=args.resume)
    for run in runs:
        last = run.rounds[-1] if run.rounds else None
        note = f"  (stopped early: {run.stopped_early})" if run.stopped_early else ""
        if last is not None:
            print(f"{run.label:>12}: accuracy {last.accuracy:.3f} after {last.round} rounds, "
                  f"{last.sim_time_s:,.0f} s simulated, {run.wall_time_s:.1f} s wall{note}")
    print(f"results in {out_dir}/ ({', '.join(p.name for p in written)})")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fedkd", description="Simulate federated and decentralized knowledge distillation on edge devices.")
    parser.add_argument("-v", "--verbose", action="store_true", help="show Flower's log")
    sub = parser.add_subparsers(dest="command", required=True)

    sim = sub.add_parser("simulate", help="run a scenario and write its results")
    sim.add_argument("scenario", help="scenario YAML file")
    sim.add_argument("--out", help="results folder (default: results/<scenario name>/)")
    sim.add_argument("--seed", type=int, help="override the scenario's seed")
    sim.add_argument("--rounds", type=_positive_int, help="override the number of rounds")
    sim.add_argument("--strategy", action="append", metavar="NAME",
                     help="run this strategy instead of the scenario's list (repeatable); "
                          "a registry name, module:Class or path/to/file.py:Class")
    sim.add_argument("--backend", choices=["inprocess", "ray"], help="override the execution backend")
    sim.add_argument("--resume", action="store_true",
                     help="continue the run checkpointed in the results folder from its last completed round")
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


def _positive_int(text: str) -> int:
    value = int(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text}")
    return value


def error_line(exc: Exception) -> str:
    """The error as one line, whatever it quotes (a YAML key may hold a line break)."""
    return str(exc).replace("\r", "\\r").replace("\n", "\\n")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    import flwr.supercore.logger  # noqa: F401 - Flower sets its logger's level on import; override it after

    logging.getLogger("flwr").setLevel(logging.INFO if args.verbose else logging.ERROR)
    from .errors import FedkdError

    try:
        return args.func(args)
    except FedkdError as exc:
        print(f"fedkd: error: {error_line(exc)}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("fedkd: interrupted; results already written are intact", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
