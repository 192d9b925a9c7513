"""A labelled warm start for weight-sharing strategies.

Strategies that distil on the server read some labelled public samples (a
validation set, teacher checks). So that a comparison does not hand them
labels the weight-sharing baselines never see, ``training.warm_start`` trains
the baselines' initial global model on the same labelled samples
(:mod:`fedkd.labels`) before round 1, on the server, as FedMD's transfer step
does on devices. The labels it reads are reported like any strategy's.
"""
from __future__ import annotations

import numpy as np
from torch import nn

from .labels import labelled_public
from .threads import single_threaded
from .scenario import WarmStartSpec
from .seeding import derive_seed
from .training import train_local


def warm_start_indices(ctx, spec: WarmStartSpec) -> np.ndarray:
    return labelled_public(ctx.scenario.seed, len(ctx.dataset.split("public")), spec.labelled_samples)


def warm_started(ctx, model: nn.Module, spec: WarmStartSpec) -> nn.Module:
    """``model`` (every encoder) trained on the run's first labelled public samples, in place."""
    training = ctx.scenario.training
    labelled = ctx.dataset.split("public").subset(warm_start_indices(ctx, spec))
    with single_threaded():
        train_local(model, labelled, ctx.dataset.modality_names, epochs=spec.epochs,
                    batch_size=training.batch_size, learning_rate=training.learning_rate,
                    seed=derive_seed(ctx.scenario.seed, "warm-start"), optimizer=training.optimizer)
    return model
