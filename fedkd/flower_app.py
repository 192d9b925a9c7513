"""fedkd's ServerApp and ClientApp as a Flower app, for ``flwr run``.

The same apps the ``inprocess`` and ``ray`` backends run; here Flower's own
runtime (a SuperLink and SuperNodes, simulated or real) drives them. The run
config names the scenario file (``scenario``) and the results folder
(``out``); see ``flwr_app/pyproject.toml`` and the README.
"""
from __future__ import annotations

import os
from functools import lru_cache
from pathlib import Path

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from .errors import FedkdError
from .runner import for_seed
from .runtime.client import make_client_app
from .runtime.server import StrategyJob, run_job
from .scenario import Scenario
from .checks import load_scenario

os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")


@lru_cache(maxsize=4)
def _scenario(path: str) -> Scenario:
    """The scenario at ``path`` as one seed's run: server and clients must agree on the seed,
    and a Flower run is one run (``fedkd simulate --seeds`` runs several)."""
    scenario = load_scenario(path)
    if scenario.seeds and len(scenario.seeds) > 1:
        raise FedkdError(f"{path}: seeds: flwr run runs one seed, and this scenario lists {list(scenario.seeds)}; "
                         "keep one (seed: N), or run `fedkd simulate` for several")
    return for_seed(scenario, scenario.seeds[0]) if scenario.seeds else scenario


def scenario_of(context: Context) -> Scenario:
    return _scenario(str(Path(str(context.run_config["scenario"])).expanduser()))


client_app = make_client_app(scenario_of)
server_app = ServerApp()


@server_app.main()
def main(grid: Grid, context: Context) -> None:
    from .report import versions, write_results

    scenario = scenario_of(context)
    runs = [run_job(StrategyJob(scenario, spec), grid) for spec in scenario.strategies]
    out = Path(str(context.run_config.get("out", f"results/{scenario.name}-flwr"))).expanduser()
    write_results(out, runs, {"scenario": scenario.name, "scenario_file": str(context.run_config["scenario"]),
                              "seed": scenario.seed, "rounds": scenario.rounds, "backend": "flwr run",
                              "devices": scenario.population.devices, "dataset": scenario.data.dataset,
                              "versions": versions(), "scenario_config": scenario.model_dump(mode="json")})
