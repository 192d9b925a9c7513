"""The ServerApp: runs one strategy through the simulated world.

The strategy's own round loop (``Strategy.start``) drives everything; fedkd
hands it the simulated grid and closes each round in ``evaluate_fn``, which
Flower calls after every round: the global model is scored on the test split
and the round's traffic, energy and failures become one ``RoundRecord``.
With a checkpoint store, the same hook saves the run after every round, and a
resumed job restores it and lets ``Strategy.start`` run the remaining rounds
under their own numbers (:mod:`fedkd.checkpoint`).
"""
from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from flwr.app import ArrayRecord, Context, MetricRecord
from flwr.serverapp import Grid, ServerApp

import numpy as np

from ..contract import FedkdStrategy, StrategyEnv
from ..registry import resolve_strategy, strategy_params
from ..results import RoundRecord, StrategyRun
from ..scenario import Scenario, StrategySpec
from ..scoring import (PanelDevice, PanelModel, PanelScoring, ScoreCache, evaluation_panel, global_model,
                       node_profile, own_model, score_panel)
from ..sim.grid import PopulationExhausted, SimulatedGrid
from ..sim.recorder import RoundRecorder
from ..sim.state_store import DeviceStateStore
from ..sim.world import OK, DeviceWorld
from ..warm_start import warm_start_indices, warm_started
from ..context import SimulationContext, simulation_context
from ..protocol import torch_state_dict

if TYPE_CHECKING:
    from ..checkpoint import CheckpointStore

ProgressFn = Callable[[str, RoundRecord, int], None]


@dataclass(frozen=True)
class StrategyJob:
    scenario: Scenario
    spec: StrategySpec
    checkpoints: CheckpointStore | None = None  # save the run there after every round
    index: int = 0  # the strategy's place in the scenario's list: names its checkpoint
    resume: bool = False  # continue from the strategy's checkpoint, when there is one

    @property
    def rounds(self) -> int:
        return self.scenario.rounds


class RunScorer:
    """Scores one strategy's run, round after round, by the one protocol (:mod:`fedkd.scoring`).

    The panel is a pure function of the scenario, so every strategy of a run (and a
    resumed run) is scored on the same devices. Which model a panel device runs: the
    strategy's ``fedkd_panel_model`` when it has one, else the global model for a
    weight-sharing strategy, else the device's own.
    """

    def __init__(self, ctx: SimulationContext, strategy: Any, shares_weights: bool):
        self.ctx, self.strategy, self.shares_weights = ctx, strategy, shares_weights
        self.panel = evaluation_panel(ctx, ctx.scenario.evaluation.panel_devices)
        self.trained: set[int] = set()
        self._seen_records = 0
        # Last round's accuracies by model and exact weights: unchanged models are not scored
        # again. Not checkpointed: a resumed run starts it empty and gets the same numbers.
        self.scores = ScoreCache(ctx.test_split)

    def score(self, arrays: ArrayRecord, recorder: RoundRecorder, device_state: dict
              ) -> tuple[float, dict[str, float]]:
        self._note_trained(recorder)
        self.scores.new_round()
        if isinstance(self.strategy, PanelScoring):
            def model_of(device: PanelDevice) -> PanelModel:
                return self.strategy.fedkd_panel_model(self.ctx, device, device_state)
        elif self.shares_weights:
            shared = global_model(self.ctx, torch_state_dict(arrays))

            def model_of(device: PanelDevice) -> PanelModel:
                return shared
        else:
            def model_of(device: PanelDevice) -> PanelModel:
                return own_model(self.ctx, device, device_state)
        accuracy, metrics = score_panel(self.ctx, self.panel, model_of, self.trained, self.scores)
        if self.shares_weights and not isinstance(self.strategy, PanelScoring):
            metrics |= global_model_columns(self.ctx, shared, self.scores)
        if isinstance(self.strategy, FedkdStrategy):
            metrics |= self.strategy.fedkd_round_metrics(self.ctx, device_state)
        return accuracy, metrics

    def _note_trained(self, recorder: RoundRecorder) -> None:
        """Devices that have completed a training task (closed rounds, then the open one)."""
        closed = recorder.run.devices
        for record in closed[self._seen_records:]:
            if record.phase == "train" and record.status == OK:
                self.trained.add(record.device_id)
        self._seen_records = len(closed)
        self.trained.update(d for d in recorder.pending_trained())


def global_model_columns(ctx: SimulationContext, shared: PanelModel,
                         scores: ScoreCache | None = None) -> dict[str, float]:
    """A global model fed every modality (``accuracy_all_modalities``) and each alone.
    With the run's ``scores``, the panel's devices have mostly scored these already."""
    from ..threads import single_threaded

    names = ctx.dataset.modality_names
    scores = scores if scores is not None else ScoreCache(ctx.test_split)
    with single_threaded():
        columns = {"accuracy_all_modalities": scores.accuracy(shared, names)}
        if len(names) > 1:
            columns |= {f"accuracy_{m}": scores.accuracy(shared, (m,)) for m in names}
    return columns


def run_job(job: StrategyJob, executors: Grid, progress: ProgressFn | None = None) -> StrategyRun:
    from ..threads import single_threaded

    # The server's own scoring and training on one thread, as client tasks run: the
    # same numbers whether a run starts fresh or resumes, whichever strategy ran first.
    with single_threaded():
        return _run_job(job, executors, progress)


def _run_job(job: StrategyJob, executors: Grid, progress: ProgressFn | None) -> StrategyRun:
    scenario, label = job.scenario, job.spec.run_label
    ctx = simulation_context(scenario)
    world = DeviceWorld(ctx.population, scenario.world, scenario.seed)
    recorder = RoundRecorder(label, job.spec.name, world)
    saved = job.checkpoints.load(job.index, label) if job.checkpoints is not None and job.resume else None
    resumed = saved is not None and saved["state"] is not None
    grid = SimulatedGrid(executors, world, recorder, scenario.seed, scenario.backend.timeout_s,
                         describe=lambda device_id: node_profile(ctx, device_id), topology=scenario.topology,
                         num_classes=ctx.dataset.num_classes, state_store=open_state_store(job, saved))
    ref = resolve_strategy(job.spec.name)
    strategy = ref.cls(**strategy_params(ref, scenario.strategy_defaults, job.spec.params))
    # fedkd's half of the strategy, if it has one (fedkd.contract); a Flower-only strategy has none.
    fedkd_part = strategy if isinstance(strategy, FedkdStrategy) else FedkdStrategy()
    fedkd_part.fedkd_setup(StrategyEnv.of(ctx, grid))
    warm_start = scenario.training.warm_start if ref.shares_weights else None
    initial_model = ctx.new_model(scenario.training.model_tier)
    if warm_start is not None and not resumed:
        warm_started(ctx, initial_model, warm_start)
    initial = ArrayRecord(initial_model.state_dict())
    scorer = RunScorer(ctx, strategy, ref.shares_weights)
    if resumed:
        state = saved["state"]
        initial = state["arrays"]
        world.set_state(state["world"])
        grid.set_state(state["grid"])
        recorder.set_state(saved["run"])
        fedkd_part.fedkd_restore(state["strategy"])
    done = recorder.current_round - 1 if resumed else 0  # rounds completed after round 0
    wall_before_s = recorder.run.wall_time_s
    started = time.perf_counter()

    def close_round(flower_round: int, arrays: ArrayRecord) -> MetricRecord | None:
        if resumed and flower_round == 0:
            return None  # the initial model was scored before the run was interrupted
        server_round = flower_round + done
        accuracy, metrics = scorer.score(arrays, recorder, grid.device_state)
        record = recorder.close_round(server_round, accuracy, metrics)
        recorder.run.wall_time_s = wall_before_s + time.perf_counter() - started
        # The round's device states are committed first; the checkpoint names that round;
        # only then are the versions they replace dropped (fedkd.sim.state_store).
        grid.device_state.flush(server_round)
        if job.checkpoints is not None:
            job.checkpoints.save(job.index, label, complete=False, run=recorder.get_state(), state={
                "arrays": arrays, "strategy": fedkd_part.fedkd_state(),
                "world": world.get_state(), "grid": grid.get_state()})
        grid.device_state.checkpointed(server_round)
        if progress:
            progress(label, record, job.rounds)
        return MetricRecord({"accuracy": accuracy, **metrics})

    try:
        with renumbered(strategy, done):
            strategy.start(grid, initial, num_rounds=job.rounds - done, timeout=scenario.backend.timeout_s,
                           evaluate_fn=close_round)
    except PopulationExhausted as exc:
        recorder.run.stopped_early = str(exc)
    finally:
        grid.device_state.close()  # its file stays for --resume until the runner's final checkpoint
    read = dict(fedkd_part.fedkd_labels_read())
    if warm_start is not None:
        read["warm_start"] = warm_start_indices(ctx, warm_start)
    read = {purpose: idx for purpose, idx in read.items() if len(idx)}
    recorder.run.labelled_public = {purpose: len(np.unique(idx)) for purpose, idx in sorted(read.items())}
    recorder.run.labelled_public_total = len(np.unique(np.concatenate(
        [np.asarray(idx, dtype=np.int64) for idx in read.values()]))) if read else 0
    recorder.run.wall_time_s = wall_before_s + time.perf_counter() - started
    return recorder.run


def open_state_store(job: StrategyJob, saved: dict | None) -> DeviceStateStore:
    """The devices' state store of ``job``: in the run's output folder when it is checkpointed
    (reopened when ``saved`` is a checkpoint to resume whose store holds the states), else a
    private temporary one."""
    cache_mb = job.scenario.backend.state_cache_mb
    if job.checkpoints is None:
        return DeviceStateStore(cache_mb=cache_mb)
    label = job.spec.run_label
    grid_state = saved["state"]["grid"] if saved is not None and saved["state"] is not None else None
    return DeviceStateStore(job.checkpoints.state_path(job.index, label), cache_mb=cache_mb,
                            identity=job.checkpoints.state_identity(label),
                            resume=grid_state is not None and "device_state" not in grid_state)


ROUND_METHODS = ("configure_train", "aggregate_train", "configure_evaluate", "aggregate_evaluate")


@contextmanager
def renumbered(strategy: Any, done: int) -> Iterator[None]:
    """While it lasts, ``strategy`` sees round ``done + r`` where ``Strategy.start`` says ``r``.

    ``Strategy.start`` numbers the rounds it runs from 1; a run resumed after
    ``done`` rounds must give the strategy the numbers of an uninterrupted run,
    which key its draws and go into its messages.
    """
    if done == 0:
        yield
        return
    before = {name: vars(strategy)[name] for name in ROUND_METHODS if name in vars(strategy)}
    for name in ROUND_METHODS:
        method = getattr(strategy, name)
        setattr(strategy, name, lambda server_round, *args, _method=method, **kwargs:
                _method(server_round + done, *args, **kwargs))
    try:
        yield
    finally:
        for name in ROUND_METHODS:
            if name in before:
                setattr(strategy, name, before[name])
            else:
                delattr(strategy, name)


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

