"""A device's own models, kept as its travelling state.

A device may hold one model per (tier, modalities) it has trained, because a
resource-aware allocator can ask it for a smaller model, or one sensor only,
when its battery or link is short. All of them travel in one ArrayRecord whose
keys are ``"<tier>|<modality>+<modality>|<parameter>"``.
"""
from __future__ import annotations

from collections import OrderedDict

import torch
from flwr.app import ArrayRecord

from .protocol import array_numpy
from .seeding import derive_seed

SEP = "|"


def device_model(ctx, device_id: int, tier: str, modalities: tuple[str, ...], state: ArrayRecord | None = None
                 ) -> torch.nn.Module:
    """Device ``device_id``'s own model of ``tier`` on ``modalities``: the weights it kept in
    ``state`` when it has trained that model, else its initial weights (seeded by the run,
    the device and the model, so every process builds the same)."""
    key = model_key(tier, modalities)
    model = ctx.new_model(tier, seed=derive_seed(ctx.scenario.seed, "device-model", device_id, key),
                          modalities=modalities)
    weights = unpack(state, key)
    if weights is not None:
        model.load_state_dict(weights)
    return model


def model_key(tier: str, modalities: tuple[str, ...]) -> str:
    return f"{tier}{SEP}{'+'.join(modalities)}"


def parse_key(key: str) -> tuple[str, tuple[str, ...]]:
    tier, mods = key.split(SEP)
    return tier, tuple(mods.split("+"))


def model_keys(state: ArrayRecord | None) -> list[str]:
    """The (tier, modalities) models a state holds, as keys, sorted."""
    if state is None:
        return []
    return sorted({SEP.join(name.split(SEP)[:2]) for name in state.keys()})


def unpack(state: ArrayRecord | None, key: str) -> OrderedDict[str, torch.Tensor] | None:
    """The state dict of model ``key``, or None if the device has never trained it."""
    if state is None:
        return None
    prefix = key + SEP
    found = OrderedDict((name[len(prefix):], torch.from_numpy(array_numpy(array).copy()))
                        for name, array in state.items() if name.startswith(prefix))
    return found or None


def pack(state: ArrayRecord | None, key: str, weights: dict[str, torch.Tensor]) -> ArrayRecord:
    """``state`` with model ``key`` replaced by ``weights`` (other models kept)."""
    prefix = key + SEP
    merged = OrderedDict()
    if state is not None:
        for name, array in state.items():
            if not name.startswith(prefix):
                merged[name] = torch.from_numpy(array_numpy(array).copy())
    for name, tensor in weights.items():
        merged[prefix + name] = tensor.detach().cpu()
    return ArrayRecord(merged)
