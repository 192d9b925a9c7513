"""The one scoring protocol: every strategy is scored the same way.

A fixed **evaluation panel** of devices is drawn once per run from the whole
population (seeded by the scenario's seed, stratified by device class, 64
devices by default or the whole population if smaller), so every strategy of
a run is scored on the same devices. Each panel device is scored on the test
split with the model it would run *now*, fed only its own sensors:

- weight-sharing strategies: the current global model;
- strategies with a server-side model per architecture (FedDF, the
  centralized reference): the model of the device's architecture;
- fog strategies (ra_cmkd): its fog's model of its architecture;
- strategies whose devices keep models: its own model, or its initial model
  if it has never trained.

A strategy says which model that is through :class:`PanelScoring` (the
``fedkd_panel_model`` hook); strategies without the hook are scored by the
two defaults above (global model, devices' own models). ``accuracy`` is the
panel mean. Extra columns: ``accuracy_participants`` (panel devices that have
completed a training task), per sensor set, per tier, per device class, per
fog (``accuracy_fog_min``/``max``) and the worst device (``accuracy_min``).

Nothing here ever chooses between models by their test accuracy.

A run scores most models unchanged from the round before (a device that did
not train keeps its model), so a :class:`ScoreCache` remembers the last
rounds' accuracies by exactly what was scored: the model's key, the sensors
it was fed and a digest of its weights' bytes. It only saves work: the same
weights on the same data give the same accuracy, so a hit is the number a
recomputation would give, and an empty cache (a resumed run) the same numbers.
"""
from __future__ import annotations

import functools
import hashlib
from collections.abc import Callable, Hashable, Iterable, Mapping
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import numpy as np
import torch
from torch import nn

from .seeding import derive_seed, rng_for
from .sim.grid import NodeProfile

# How many devices the evaluation panel holds by default.
PANEL_DEVICES = 64

# The fingerprint of a device's initial (never trained) model: its PanelModel key identifies it.
INITIAL_WEIGHTS = "initial"


# A panel device as it registered: what it senses and runs, where it sits.
PanelDevice = NodeProfile


@dataclass(frozen=True)
class PanelModel:
    """The model a panel device runs now. ``key`` names it: devices with the same key run
    the same weights, so the model is built and scored once per key and sensor set."""

    key: Hashable
    build: Callable[[], nn.Module]
    # What the weights are, exactly, without building the model (``weights_fingerprint`` of
    # what ``build`` loads): an unchanged model then skips its build as well as its scoring.
    # None: the built model's own state is fingerprinted.
    fingerprint: Callable[[], Hashable | None] | None = None


@runtime_checkable
class PanelScoring(Protocol):
    """What a strategy implements when neither default (global model, devices' own models)
    names the model its devices run."""

    def fedkd_panel_model(self, ctx, device: PanelDevice, device_state: dict) -> PanelModel: ...


def panel_counts(class_sizes: np.ndarray, size: int) -> np.ndarray:
    """Devices per class: proportional to the class's size (largest remainder), every
    class with devices getting at least one when ``size`` allows, never more than it has."""
    class_sizes = np.asarray(class_sizes, dtype=np.int64)
    total = int(class_sizes.sum())
    size = min(size, total)
    if size == total:
        return class_sizes.copy()
    exact = class_sizes * size / total
    counts = np.floor(exact).astype(np.int64)
    present = class_sizes > 0
    if size >= int(present.sum()):
        counts = np.where(present, np.maximum(counts, 1), 0)
    # Hand out what is left by largest remainder; take back from the largest counts if the
    # minimum of one overshot. Ties go to the lower class index (stable sort).
    while counts.sum() < size:
        room = np.where(counts < class_sizes, exact - counts, -np.inf)
        counts[int(np.argmax(room))] += 1
    while counts.sum() > size:
        spare = np.where(counts > 1, counts - exact, -np.inf)
        counts[int(np.argmax(spare))] -= 1
    return counts


def evaluation_panel(ctx, size: int = PANEL_DEVICES) -> list[PanelDevice]:
    """The run's evaluation panel: a pure function of the scenario (seed included)."""
    population = ctx.population
    ids = np.arange(population.size)
    classes = population.class_index(ids)
    sizes = np.bincount(classes, minlength=len(population.classes))
    chosen: list[int] = []
    for index, count in enumerate(panel_counts(sizes, size)):
        if count:
            members = ids[classes == index]
            rng = rng_for(ctx.scenario.seed, "evaluation-panel", population.classes[index].name)
            chosen.extend(int(d) for d in rng.choice(members, int(count), replace=False))
    return [node_profile(ctx, d) for d in sorted(chosen)]


def node_profile(ctx, device_id: int) -> NodeProfile:
    """What a device registers: its class, model tier, sensors and fog."""
    device_class = ctx.population.class_of(device_id)
    return NodeProfile(device_id, device_class.name, device_class.model_tier or ctx.scenario.training.model_tier,
                       ctx.modalities_of(device_id), ctx.fog_of(device_id))


def global_model(ctx, arrays_state: dict) -> PanelModel:
    """A weight-sharing strategy's global model (every device runs the same weights): built
    once, however many sensor sets the panel scores it with."""

    @functools.cache
    def build() -> nn.Module:
        model = ctx.new_model(ctx.scenario.training.model_tier)
        model.load_state_dict(arrays_state)
        return model

    # The global model is a fresh seeded model with every weight loaded (strict): its weights say it all.
    return PanelModel("global", build, functools.cache(lambda: weights_fingerprint(arrays_state)))


def own_model(ctx, device: PanelDevice, device_state: dict, strip: Callable | None = None) -> PanelModel:
    """A device's own model of its registered architecture; its initial model if it has
    never trained one. ``strip`` removes what the state holds besides models."""
    from .device_models import model_key, unpack

    key = model_key(device.model_tier, device.modalities)
    state = device_state.get(device.device_id)
    weights = unpack(strip(state) if strip is not None and state is not None else state, key)

    def build() -> nn.Module:
        model = ctx.new_model(device.model_tier, modalities=device.modalities,
                              seed=derive_seed(ctx.scenario.seed, "device-model", device.device_id, key))
        if weights is not None:
            model.load_state_dict(weights)
        return model

    def fingerprint() -> Hashable | None:
        # Untrained, it runs its initial model: a pure function of the run, the device and
        # the model key (seeded), which the PanelModel's key already names.
        return INITIAL_WEIGHTS if weights is None else weights_fingerprint(weights)

    return PanelModel(("device", device.device_id, key), build, fingerprint)


def score_panel(ctx, panel: list[PanelDevice], model_of: Callable[[PanelDevice], PanelModel],
                trained: Iterable[int] = (), scores: ScoreCache | None = None
                ) -> tuple[float, dict[str, float]]:
    """Each panel device's test accuracy with the model ``model_of`` names, fed its own sensors.
    ``scores``: the run's cache of earlier rounds' accuracies (else nothing is reused)."""
    from .threads import single_threaded

    scores = scores if scores is not None else ScoreCache(ctx.test_split)
    if scores.data is not ctx.test_split:
        raise ValueError("the score cache holds accuracies on another test split")
    # Devices with the same key run the same weights: scored (and fingerprinted) once per round.
    this_round: dict[tuple, float] = {}
    accuracies = np.empty(len(panel))
    with single_threaded():
        for i, device in enumerate(panel):
            choice = model_of(device)
            slot = (choice.key, device.modalities)
            if slot not in this_round:
                this_round[slot] = scores.accuracy(choice, device.modalities)
            accuracies[i] = this_round[slot]
    return float(accuracies.mean()), panel_metrics(panel, accuracies, set(trained))


def weights_fingerprint(weights: Mapping[str, object]) -> bytes | None:
    """An exact digest of a state dict: every entry's name, dtype, shape and bytes, in order.
    One changed bit changes it. None when an entry is not an array (nothing to hash exactly)."""
    digest = hashlib.blake2b(digest_size=32)
    for name, value in weights.items():
        if isinstance(value, np.ndarray):
            value = torch.from_numpy(value)
        if not isinstance(value, torch.Tensor):
            return None
        tensor = value.detach().cpu().contiguous()
        header = repr((name, str(tensor.dtype), tuple(tensor.shape))).encode()
        # Length-prefixed, so no two different state dicts feed the hash the same bytes.
        digest.update(len(header).to_bytes(8, "little") + header)
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy())
    return digest.digest()


def module_fingerprint(model: nn.Module) -> bytes | None:
    """``weights_fingerprint`` of a built model: its state dict and every buffer, including
    those a state dict leaves out (non-persistent ones)."""
    buffers = {f"buffer:{name}": buffer for name, buffer in model.named_buffers()}
    return weights_fingerprint({**model.state_dict(), **buffers})


class ScoreCache:
    """Test accuracies on one data split, by exactly what was scored: (model key, sensors fed,
    fingerprint of the weights). A run's models mostly stay as they were from one round to the
    next, so only changed ones are scored again.

    Bounded: a round keeps only the entries it used or computed, the round before is then
    dropped (``new_round``), so it holds about one panel's worth whatever the population.
    Only an accelerator: a hit is the number recomputing would give, the same on every round
    (scoring is deterministic: eval mode, one thread, the same batches), so an empty cache,
    as after ``--resume``, gives the same numbers.
    """

    def __init__(self, data):
        self.data = data
        self._previous: dict[tuple, float] = {}
        self._current: dict[tuple, float] = {}
        self.computed = 0  # accuracies worked out, not reused (for tests and profiling)

    def new_round(self) -> None:
        """Entries the closing round did not use are forgotten."""
        self._previous, self._current = self._current, {}

    def accuracy(self, choice: PanelModel, modalities: tuple[str, ...]) -> float:
        """``choice``'s accuracy on the data fed ``modalities``, reused while its weights are unchanged."""
        built = None if choice.fingerprint is not None else choice.build()
        fingerprint = choice.fingerprint() if built is None else module_fingerprint(built)
        entry = (choice.key, tuple(modalities), fingerprint)
        if fingerprint is not None and entry in self._current:
            found = self._current[entry]
        elif fingerprint is not None and entry in self._previous:
            found = self._current[entry] = self._previous.pop(entry)
        else:  # changed, new, or nothing exact to key on (then scored every time)
            found = self._compute(built if built is not None else choice.build(), modalities)
            if fingerprint is not None:
                self._current[entry] = found
            return found
        if built is not None:
            built.eval()  # what scoring it would have left on a strategy's live model
        return found

    def _compute(self, model: nn.Module, modalities: tuple[str, ...]) -> float:
        from .training import accuracy

        self.computed += 1
        return accuracy(model, self.data, modalities)


def panel_metrics(panel: list[PanelDevice], accuracies: np.ndarray, trained: set[int]) -> dict[str, float]:
    """The extra columns: participants, worst device, per sensor set, tier, class,
    architecture (tier and sensors) and fog."""
    metrics = {"accuracy_min": float(accuracies.min()), "evaluated_devices": float(len(panel))}
    took_part = np.array([d.device_id in trained for d in panel])
    metrics["panel_participants"] = float(took_part.sum())
    if took_part.any():
        metrics["accuracy_participants"] = float(accuracies[took_part].mean())

    def means(prefix: str, group: Callable[[PanelDevice], object], name: Callable[[object], str]) -> dict:
        keys = [group(d) for d in panel]
        return {f"{prefix}{name(k)}": float(accuracies[[g == k for g in keys]].mean())
                for k in sorted(set(keys), key=str)}

    metrics |= {f"accuracy_{k}_devices": v for k, v in
                means("", lambda d: d.modalities, "+".join).items()}
    metrics |= means("accuracy_tier_", lambda d: d.model_tier, str)
    metrics |= means("accuracy_class_", lambda d: d.device_class, str)
    metrics |= means("accuracy_arch_", lambda d: (d.model_tier, d.modalities), lambda k: f"{k[0]}_{'+'.join(k[1])}")
    fogs = [d.fog for d in panel]
    if len({f for f in fogs if f is not None}) > 1:
        per_fog = [accuracies[[f == fog for f in fogs]].mean() for fog in sorted({f for f in fogs if f is not None})]
        metrics["accuracy_fog_min"], metrics["accuracy_fog_max"] = float(min(per_fog)), float(max(per_fog))
    return metrics
