"""Sizes checked before they are allocated: memory for the population, disk for the devices' state.

A well-typed but absurd scenario (``devices: 1e12``, or a million devices each
keeping a model on a small disk) is refused when it is validated, with one
line giving the estimate, never with a MemoryError or a full disk an hour in.

The estimates are measured, not guessed: bytes per device of the population's
columns (a world of up to 1,000 devices is built and its arrays summed, plus
the list of node ids a Flower strategy samples from), and bytes of each
device architecture's state dict (the model is built). A device-state store
holds at most two versions of a device's state (the checkpointed one and the
newest) plus SQLite's own overhead (about 15 %, benchmarks/README.md).
"""
from __future__ import annotations

import math
import os
import shutil
import sys
from pathlib import Path

import numpy as np

from .errors import ScenarioError
from .scenario import Scenario

SAMPLE_DEVICES = 1000
STORE_FACTOR = 2 * 1.2  # two versions of a row until the next checkpoint; SQLite's pages and index


def check_sizes(scenario: Scenario, path: str, out_dir: Path | None, dataset=None, stores_at_once: int = 1) -> None:
    """A ScenarioError (one line, with the estimate) if the population does not fit in memory,
    or the devices' state would not fit on the disk of ``out_dir``."""
    devices = scenario.population.devices
    per_device = population_bytes_per_device(scenario)
    cache = scenario.backend.state_cache_mb * 2**20
    need = per_device * devices + cache
    have = available_memory_bytes()
    if have is not None and need > have:
        fits = max(int((have - cache) / per_device), 0)
        raise ScenarioError(path, "population.devices",
                            f"{devices:,} devices need about {_size(need)} of memory ({per_device:.0f} B each for "
                            f"the population's columns, measured, plus the {_size(cache)} state cache), but "
                            f"{_size(have)} is available; expected at most about {fits:,} devices")
    if out_dir is None:
        return
    need_disk, worst = 0.0, None
    for i, spec in enumerate(scenario.strategies):
        estimate = state_disk_bytes(scenario, i, dataset)
        if estimate is not None and (worst is None or estimate[0] > worst[1][0]):
            worst = (i, estimate)
    if worst is None:
        return
    i, (need_disk, holders, state) = worst
    need_disk *= stores_at_once
    free = free_disk_bytes(out_dir)
    if need_disk > free:
        label = scenario.strategies[i].run_label
        runs = f" x {stores_at_once} runs at once" if stores_at_once > 1 else ""
        raise ScenarioError(path, f"strategies[{i}]",
                            f"{label}: up to {holders:,} devices keep a model ({_size(state)} each), about "
                            f"{_size(need_disk)}{runs} on disk in {out_dir}, but {_size(free)} is free there; "
                            "expected fewer devices or rounds, or another --out")


def population_bytes_per_device(scenario: Scenario) -> float:
    """Memory per device of the population's columns and of the node-id list strategies sample from."""
    from .sim.population import Population
    from .sim.world import DeviceWorld

    n = min(scenario.population.devices, SAMPLE_DEVICES)
    sample = scenario.population.model_copy(update={"devices": n})
    world = DeviceWorld(Population(sample, scenario.seed), scenario.world, scenario.seed)
    ids = world.available_ids().tolist()
    listed = sys.getsizeof(ids) + sum(sys.getsizeof(i) for i in ids)  # Python ints in a list
    return (_array_bytes(world) + listed) / n


def state_disk_bytes(scenario: Scenario, index: int, dataset=None) -> tuple[float, int, int] | None:
    """(bytes on disk, devices that may hold state, bytes of the largest state) of strategy
    ``index``'s store; None for a strategy whose devices keep nothing (it shares weights)."""
    from .registry import resolve_strategy, strategy_params

    spec = scenario.strategies[index]
    ref = resolve_strategy(spec.name)
    if ref.shares_weights:
        return None
    params = strategy_params(ref, scenario.strategy_defaults, spec.params)
    devices = scenario.population.devices
    per_round = devices
    if isinstance(params.get("fraction_train"), (int, float)) and params["fraction_train"] > 0:
        per_round = max(math.ceil(params["fraction_train"] * devices), int(params.get("min_train_nodes") or 0))
    holders = min(devices, scenario.rounds * per_round)
    state = max(model_state_bytes(scenario, tier, mods, dataset) for tier, mods in _architectures(scenario, dataset))
    return holders * state * STORE_FACTOR, holders, state


def model_state_bytes(scenario: Scenario, tier: str, modalities: tuple[str, ...], dataset=None) -> int:
    """Bytes of the state dict of a device model of ``tier`` over ``modalities`` (built once)."""
    from .models.multimodal import build_model

    dataset = dataset if dataset is not None else _dataset(scenario)
    specs = [m for m in dataset.modalities if m.name in modalities]
    model = build_model(specs, dataset.num_classes, tier, seed=0)
    return sum(t.numel() * t.element_size() for t in model.state_dict().values())


def available_memory_bytes() -> float | None:
    """Memory available to a new process now (Linux ``MemAvailable``), else physical memory."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return float(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return float(os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))
    except (ValueError, OSError, AttributeError):
        return None


def free_disk_bytes(out_dir: Path) -> float:
    """Free bytes on the disk ``out_dir`` is (or will be) on."""
    folder = Path(out_dir).absolute()
    while not folder.exists():
        folder = folder.parent
    return float(shutil.disk_usage(folder).free)


def _architectures(scenario: Scenario, dataset) -> set[tuple[str, tuple[str, ...]]]:
    dataset = dataset if dataset is not None else _dataset(scenario)
    every = tuple(m.name for m in dataset.modalities)
    # A class without `modalities` gets a set from the modality mix: count the largest, every one.
    return {(c.model_tier or scenario.training.model_tier, tuple(c.modalities) if c.modalities else every)
            for c in scenario.population.classes}


def _dataset(scenario: Scenario):
    from .data import load_dataset

    return load_dataset(scenario.data.dataset, scenario.data.options, scenario.seed)


def _array_bytes(obj, depth: int = 0, seen: set | None = None) -> int:
    """Bytes of the numpy arrays ``obj`` holds, a few attributes deep."""
    seen = set() if seen is None else seen
    if id(obj) in seen:
        return 0
    seen.add(id(obj))
    if isinstance(obj, np.ndarray):
        return obj.nbytes
    if depth > 3:
        return 0
    if isinstance(obj, (list, tuple)):
        return sum(_array_bytes(v, depth + 1, seen) for v in obj)
    if isinstance(obj, dict):
        return sum(_array_bytes(v, depth + 1, seen) for v in obj.values())
    if hasattr(obj, "__dict__"):
        return sum(_array_bytes(v, depth + 1, seen) for v in vars(obj).values())
    return 0


def _size(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB", "PB"):
        if n < 1000 or unit == "PB":
            return f"{n:,.0f} {unit}" if unit == "B" else f"{n:,.1f} {unit}"
        n /= 1000
    return f"{n:,.1f} PB"
