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

from ..device_models import model_key, model_keys, parse_key, unpack
from ..logit_exchange import PublicSet
from ..registry import resolve_strategy, strategy_params
from ..seeding import derive_seed
from ..results import RoundRecord, StrategyRun
from ..scenario import Scenario, StrategySpec
from ..sim.grid import NodeProfile, PopulationExhausted, SimulatedGrid
from ..sim.recorder import RoundRecorder
from ..sim.world import DeviceWorld
from ..training import predict_logits
from .context import SimulationContext, simulation_context
from .records import torch_state_dict

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


def sensor_shares(ctx: SimulationContext) -> dict[tuple[str, ...], float]:
    """Share of the population sensing each modality set: the weights of the headline accuracy."""
    from .architectures import population_architectures

    counts: dict[tuple[str, ...], int] = {}
    for arch, n in population_architectures(ctx).items():
        counts[arch.modalities] = counts.get(arch.modalities, 0) + n
    total = sum(counts.values())
    return {mods: n / total for mods, n in sorted(counts.items())}


def headline(per_set: dict[tuple[str, ...], float], shares: dict[tuple[str, ...], float]) -> float:
    """The accuracy a random device of the population gets: per-sensor-set accuracies
    weighted by how many devices sense that set (sets not scored are left out)."""
    scored = {mods: share for mods, share in shares.items() if mods in per_set}
    return float(sum(per_set[m] * w for m, w in scored.items()) / sum(scored.values()))


def evaluate_global(ctx: SimulationContext, arrays: ArrayRecord,
                    shares: dict[tuple[str, ...], float] | None = None) -> tuple[float, dict[str, float]]:
    """A global model scored as the devices use it: each fed only the sensors it has.

    ``accuracy`` weights each sensor set by its share of the population, so it
    is comparable with strategies whose devices keep their own models; the
    model fed every modality is ``accuracy_all_modalities``.
    """
    shares = shares or sensor_shares(ctx)
    model = ctx.new_model(ctx.scenario.training.model_tier)
    model.load_state_dict(torch_state_dict(arrays))
    test = ctx.test_split
    names = ctx.dataset.modality_names

    def acc(modalities) -> float:
        return float((predict_logits(model, test, modalities).argmax(1).numpy() == test.labels).mean())

    per_set = {mods: acc(mods) for mods in shares}
    metrics = {f"accuracy_{'+'.join(mods)}_devices": a for mods, a in per_set.items()}
    metrics["accuracy_all_modalities"] = per_set.get(names, None) or acc(names)
    if len(names) > 1:
        metrics.update({f"accuracy_{m}": per_set.get((m,), None) or acc((m,)) for m in names})
    return headline(per_set, shares), metrics


def node_profile(ctx: SimulationContext, device_id: int) -> NodeProfile:
    device_class = ctx.population.class_of(device_id)
    tier = device_class.model_tier or ctx.scenario.training.model_tier
    return NodeProfile(device_id, device_class.name, tier, ctx.modalities_of(device_id), ctx.fog_of(device_id))


# How many device models a logit-exchange strategy is scored on each round.
DEVICE_PANEL = 24


def evaluate_devices(ctx: SimulationContext, device_state: dict,
                     shares: dict[tuple[str, ...], float] | None = None) -> tuple[float, dict[str, float]]:
    """Mean test accuracy of the devices' own models, each with its own sensors.

    A fixed panel: the lowest ids among devices that have a model (before any
    has, fresh models of the first devices), so the curve follows the same
    devices from round to round once they have joined. A device holding
    several models (sizes or sensors an allocator asked for) counts with its
    best one, the one it would run. ``accuracy`` weights each sensor set's
    mean by its share of the population, as for a global model.
    """
    shares = shares or sensor_shares(ctx)
    panel = sorted(device_state)[:DEVICE_PANEL] or list(range(min(DEVICE_PANEL, ctx.population.size)))
    test = ctx.test_split
    scores: list[tuple[float, str, str]] = []
    for device_id in panel:
        device = ctx.device(device_id)
        state = device_state.get(device_id)
        keys = model_keys(state) or [model_key(device.model_tier, device.modalities)]
        best = None
        for key in keys:
            tier, modalities = parse_key(key)
            model = ctx.new_model(tier, seed=derive_seed(ctx.scenario.seed, "device-model", device_id, key),
                                  modalities=modalities)
            weights = unpack(state, key)
            if weights is not None:
                model.load_state_dict(weights)
            acc = float((predict_logits(model, test, modalities).argmax(1).numpy() == test.labels).mean())
            if best is None or acc > best[0]:
                best = (acc, tier, "+".join(modalities))
        scores.append(best)
    accuracies = np.array([a for a, _, _ in scores])
    metrics = {"accuracy_min": float(accuracies.min()), "evaluated_devices": float(len(scores))}
    for tier in sorted({t for _, t, _ in scores}):
        metrics[f"accuracy_tier_{tier}"] = float(np.mean([a for a, t, _ in scores if t == tier]))
    per_set = {}
    for mods in sorted({m for _, _, m in scores}):
        per_set[tuple(mods.split("+"))] = float(np.mean([a for a, _, m in scores if m == mods]))
        metrics[f"accuracy_{mods}_devices"] = per_set[tuple(mods.split("+"))]
    metrics["accuracy_panel_mean"] = float(accuracies.mean())
    return headline(per_set, shares), metrics


def run_job(job: StrategyJob, executors: Grid, progress: ProgressFn | None = None) -> StrategyRun:
    from .architectures import single_threaded

    # The server's own scoring and training on one thread, as client tasks run: the
    # same numbers whether a run starts fresh or resumes, whichever strategy ran first.
    with single_threaded():
        return _run_job(job, executors, progress)


def _run_job(job: StrategyJob, executors: Grid, progress: ProgressFn | None) -> StrategyRun:
    scenario, label = job.scenario, job.spec.run_label
    ctx = simulation_context(scenario)
    world = DeviceWorld(ctx.population, scenario.world, scenario.seed)
    recorder = RoundRecorder(label, job.spec.name, world)
    grid = SimulatedGrid(executors, world, recorder, scenario.seed, scenario.backend.timeout_s,
                         describe=lambda device_id: node_profile(ctx, device_id), topology=scenario.topology,
                         num_classes=ctx.dataset.num_classes)
    ref = resolve_strategy(job.spec.name)
    strategy = ref.cls(**strategy_params(ref, scenario.strategy_defaults, job.spec.params))
    # Optional fedkd hooks a strategy may define (Flower's own strategies have none):
    # fedkd_bind(PublicSet): the shared public set; fedkd_attach_server(ctx): the
    # server's own data and model builders; fedkd_evaluate(ctx, device_state):
    # how to score the strategy's models, when neither a global model nor the
    # devices' own models are the answer; fedkd_state() / fedkd_restore(state):
    # what it keeps from round to round besides the global arrays, for checkpoints.
    if hasattr(strategy, "fedkd_bind"):
        strategy.fedkd_bind(PublicSet(len(ctx.dataset.split("public")), ctx.dataset.num_classes, scenario.seed))
    if hasattr(strategy, "fedkd_attach_server"):
        strategy.fedkd_attach_server(ctx)
    initial = ArrayRecord(ctx.new_model(scenario.training.model_tier).state_dict())
    shares = sensor_shares(ctx)
    saved = job.checkpoints.load(job.index, label) if job.checkpoints is not None and job.resume else None
    resumed = saved is not None and saved["state"] is not None
    if resumed:
        state = saved["state"]
        initial = state["arrays"]
        world.set_state(state["world"])
        grid.set_state(state["grid"])
        recorder.set_state(saved["run"])
        if hasattr(strategy, "fedkd_restore"):
            strategy.fedkd_restore(state["strategy"])
    done = recorder.current_round - 1 if resumed else 0  # rounds completed after round 0
    wall_before_s = recorder.run.wall_time_s
    started = time.perf_counter()

    def close_round(flower_round: int, arrays: ArrayRecord) -> MetricRecord | None:
        if resumed and flower_round == 0:
            return None  # the initial model was scored before the run was interrupted
        server_round = flower_round + done
        scored = strategy.fedkd_evaluate(ctx, grid.device_state) if hasattr(strategy, "fedkd_evaluate") else None
        if scored is not None:
            accuracy, metrics = scored
        elif ref.shares_weights:
            accuracy, metrics = evaluate_global(ctx, arrays, shares)
        else:
            accuracy, metrics = evaluate_devices(ctx, grid.device_state, shares)
        record = recorder.close_round(server_round, accuracy, metrics)
        recorder.run.wall_time_s = wall_before_s + time.perf_counter() - started
        if job.checkpoints is not None:
            job.checkpoints.save(job.index, label, complete=False, run=recorder.get_state(), state={
                "arrays": arrays, "strategy": strategy.fedkd_state() if hasattr(strategy, "fedkd_state") else {},
                "world": world.get_state(), "grid": grid.get_state()})
        if progress:
            progress(label, record, job.rounds)
        return MetricRecord({"accuracy": accuracy, **metrics})

    try:
        with renumbered(strategy, done):
            strategy.start(grid, initial, num_rounds=job.rounds - done, timeout=scenario.backend.timeout_s,
                           evaluate_fn=close_round)
    except PopulationExhausted as exc:
        recorder.run.stopped_early = str(exc)
    recorder.run.wall_time_s = wall_before_s + time.perf_counter() - started
    return recorder.run


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

