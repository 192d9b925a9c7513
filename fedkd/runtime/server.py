"""The ServerApp: runs one strategy through the simulated world.

The strategy's own round loop (``Strategy.start``) drives everything; fedkd
hands it the simulated grid and closes each round in ``evaluate_fn``, which
Flower calls after every round: the global model is scored on the test split
and the round's traffic, energy and failures become one ``RoundRecord``.
"""
from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

from flwr.app import ArrayRecord, Context, MetricRecord
from flwr.serverapp import Grid, ServerApp

from ..registry import resolve_strategy, strategy_params
from ..results import RoundRecord, StrategyRun
from ..scenario import Scenario, StrategySpec
from ..sim.grid import PopulationExhausted, SimulatedGrid
from ..sim.recorder import RoundRecorder
from ..sim.world import DeviceWorld
from ..training import predict_logits
from .context import SimulationContext, simulation_context

ProgressFn = Callable[[str, RoundRecord, int], None]


@dataclass(frozen=True)
class StrategyJob:
    scenario: Scenario
    spec: StrategySpec

    @property
    def rounds(self) -> int:
        return self.scenario.rounds


def evaluate_global(ctx: SimulationContext, arrays: ArrayRecord) -> tuple[float, dict[str, float]]:
    """Accuracy of a global model on the test split, with all modalities and each alone."""
    model = ctx.new_model(ctx.scenario.training.model_tier)
    model.load_state_dict(arrays.to_torch_state_dict())
    test = ctx.test_split
    names = ctx.dataset.modality_names

    def acc(modalities) -> float:
        return float((predict_logits(model, test, modalities).argmax(1).numpy() == test.labels).mean())

    overall = acc(names)
    per_modality = {f"accuracy_{m}": acc((m,)) for m in names} if len(names) > 1 else {}
    return overall, per_modality


def run_job(job: StrategyJob, executors: Grid, progress: ProgressFn | None = None) -> StrategyRun:
    scenario, label = job.scenario, job.spec.run_label
    ctx = simulation_context(scenario)
    world = DeviceWorld(ctx.population, scenario.world, scenario.seed)
    recorder = RoundRecorder(label, job.spec.name, world)
    grid = SimulatedGrid(executors, world, recorder, scenario.seed, scenario.backend.timeout_s)
    ref = resolve_strategy(job.spec.name)
    strategy = ref.cls(**strategy_params(ref, scenario.strategy_defaults, job.spec.params))
    initial = ArrayRecord(ctx.new_model(scenario.training.model_tier).state_dict())

    def close_round(server_round: int, arrays: ArrayRecord) -> MetricRecord:
        accuracy, metrics = evaluate_global(ctx, arrays)
        record = recorder.close_round(server_round, accuracy, metrics)
        if progress:
            progress(label, record, job.rounds)
        return MetricRecord({"accuracy": accuracy, **metrics})

    started = time.perf_counter()
    try:
        strategy.start(grid, initial, num_rounds=job.rounds, timeout=scenario.backend.timeout_s,
                       evaluate_fn=close_round)
    except PopulationExhausted as exc:
        recorder.run.stopped_early = str(exc)
    recorder.run.wall_time_s = time.perf_counter() - started
    return recorder.run


def make_server_app(job: StrategyJob, sink: list[StrategyRun], progress: ProgressFn | None = None) -> ServerApp:
    """A ServerApp that runs ``job`` and appends its result to ``sink``.

    Both backends run the ServerApp in this process, so the result is handed
    back through ``sink``; the closure holds no data, only the job.
    """
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        sink.append(run_job(job, grid, progress))

    return app

