"""The base of strategies that exchange predictions on a shared public set
instead of model weights.

Each round the server samples devices and sends them (a) the public samples
to predict and (b) its current targets for the samples of the previous round.
Each device digests the targets, trains on its private shard, and returns its
logits for the new public samples through a codec. The server combines them
into the next targets; a subclass says how by overriding ``combine``. Devices
keep their own models (any architecture, any sensors), so nothing forces one
architecture on the population.

With ``public_pretrain_epochs`` > 0 a device whose model is new (its first
task, or the first with a model size or sensor set it had not used) first
trains it for that many epochs on labelled public samples, FedMD's transfer
step: the first ``public_pretrain_samples`` (None: all) of the public split,
as the client takes them (``logits_task`` below).
``fedkd_labels_read`` reports those samples.
"""
from __future__ import annotations

from collections.abc import Iterable
from logging import INFO

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy
from flwr.supercore import log

from .codecs import decode_any, get_codec
from .contract import DeviceCall, FedkdStrategy, PublicSet, StrategyEnv
from .device_models import device_model, model_key, model_keys, pack
from .distill import distill_on
from .labels import labelled_public
from .protocol import FOG_MODEL, torch_state_dict
from .seeding import derive_seed, rng_for
from .training import predict_logits, train_local
from .strategy_parts import NoClientEvaluation, check_sampling, sample_devices, weighted_reply_metrics

MESSAGE_TYPE = "train.logits"


def logits_task(call: DeviceCall) -> Message:
    """One round of a logit-exchange strategy on one device (FedMD's loop, pipelined).

    1. digest: distill the device's own model towards the server's targets on
       the public samples they refer to (``target-indices``, ``targets``);
    2. revisit: train on the device's private shard;
    3. communicate: predict the public samples in ``public-indices`` with the
       device's own sensors and send the logits through the chosen codec.
    The device's model is its own (any architecture) and travels as its state.
    """
    ctx, device, scenario, message = call.ctx, call.device, call.scenario, call.message
    device_id, server_round = call.device_id, call.server_round
    config = call.config()
    training = scenario.training
    # A plan may ask for one of the device's sensors only, or another model size.
    tier = str(config.get("model-tier", device.model_tier))
    modalities = tuple(str(config["modality"]).split("+")) if "modality" in config else device.modalities
    if not set(modalities) <= set(device.modalities):
        raise ValueError(f"device {device_id} senses {device.modalities}, not {modalities}")
    key = model_key(tier, modalities)
    public = ctx.dataset.split("public")
    lr = float(config.get("learning-rate", training.learning_rate))
    per_sample = ctx.train_flops_per_sample(tier, modalities)
    flops, distill_loss = 0.0, 0.0
    state = call.state
    fog_model = message.content.get(FOG_MODEL)
    # A device that starts from its fog's model need not keep its own between rounds.
    model = device_model(ctx, device_id, tier, modalities, state if fog_model is None else None)
    if fog_model is not None:
        model.load_state_dict({name: t.float() for name, t in torch_state_dict(fog_model).items()})
    elif key not in model_keys(state) and int(config.get("public-pretrain-epochs", 0)) > 0:
        # FedMD's transfer-learning step: a new device first learns the labelled public set
        # (or the run's first public-pretrain-samples labelled samples, to bound the cost:
        # the same ones other strategies with that label budget read, fedkd.labels).
        epochs = int(config["public-pretrain-epochs"])
        labelled = public.subset(labelled_public(scenario.seed, len(public),
                                                 int(config.get("public-pretrain-samples", len(public)))))
        train_local(model, labelled, modalities, epochs=epochs, batch_size=training.batch_size,
                    learning_rate=lr, seed=derive_seed(scenario.seed, "pretrain", device_id),
                    optimizer=training.optimizer)
        flops += per_sample * len(labelled) * epochs
    if "targets" in config:
        target_idx = np.asarray(config["target-indices"], dtype=np.int64)
        targets = decode_any(bytes(config["targets"]))
        epochs = int(config.get("distill-epochs", 1))
        distill_loss = distill_on(model, public.subset(target_idx), modalities, targets,
                                  epochs=epochs, batch_size=training.batch_size, learning_rate=lr,
                                  temperature=float(config.get("temperature", 1.0)),
                                  seed=derive_seed(scenario.seed, "digest", server_round, device_id))
        flops += per_sample * len(target_idx) * epochs
    epochs = int(config.get("local-epochs", training.local_epochs))
    outcome = train_local(model, device.data, modalities, epochs=epochs,
                          batch_size=training.batch_size, learning_rate=lr,
                          seed=derive_seed(scenario.seed, "train", server_round, device_id),
                          optimizer=training.optimizer, self_distillation=training.self_distillation)
    flops += per_sample * outcome.num_examples * epochs + outcome.extra_flops
    public_idx = np.asarray(config["public-indices"], dtype=np.int64)
    logits = predict_logits(model, public.subset(public_idx), modalities).numpy()
    flops += ctx.forward_flops_per_sample(tier, modalities) * len(public_idx)
    payload = get_codec(str(config.get("codec", "fp32"))).encode(logits)
    return call.reply({
        "logits": ConfigRecord({"payload": payload}),
        "metrics": MetricRecord({"num-examples": outcome.num_examples, "train-loss": outcome.mean_loss,
                                 "distill-loss": distill_loss}),
    }, flops, state=pack(state, key, model.state_dict()) if fog_model is None else None)


class LogitExchange(FedkdStrategy, NoClientEvaluation, Strategy):
    """Exchange logits on public samples; subclasses choose how to combine them."""

    shares_weights = False
    device_tasks = {MESSAGE_TYPE: logits_task}

    def __init__(self, fraction_train: float = 0.1, min_train_nodes: int = 2, min_available_nodes: int = 2,
                 public_batch: int = 256, codec: str = "fp32", downlink_codec: str | None = None,
                 temperature: float = 1.0, distill_epochs: int = 1, local_epochs: int | None = None,
                 public_pretrain_epochs: int = 0, public_pretrain_samples: int | None = None):
        check_sampling(fraction_train, min_train_nodes, min_available_nodes)
        if public_pretrain_epochs < 0:
            raise ValueError(f"public_pretrain_epochs must be 0 or more, got {public_pretrain_epochs}")
        if public_pretrain_samples is not None and public_pretrain_samples < 1:
            raise ValueError(f"public_pretrain_samples must be positive or None, got {public_pretrain_samples}")
        if public_batch < 1:
            raise ValueError(f"public_batch must be positive, got {public_batch}")
        get_codec(codec), get_codec(downlink_codec or codec)  # fail now on a bad codec name
        self.fraction_train, self.min_train_nodes = fraction_train, min_train_nodes
        self.min_available_nodes, self.public_batch = min_available_nodes, public_batch
        self.codec, self.downlink_codec = codec, downlink_codec or codec
        self.temperature, self.distill_epochs, self.local_epochs = temperature, distill_epochs, local_epochs
        self.public_pretrain_epochs = public_pretrain_epochs
        self.public_pretrain_samples = public_pretrain_samples  # None: the whole public set
        self.public: PublicSet | None = None
        self.targets: np.ndarray | None = None  # probabilities, (public_batch, classes)
        self.target_indices: np.ndarray | None = None
        self._asked_indices: np.ndarray | None = None
        # The public samples devices may be asked about (None: all); a subclass may hold some out.
        self.public_pool: np.ndarray | None = None

    def fedkd_setup(self, env: StrategyEnv) -> None:
        """Before the first round: the public set this run shares."""
        super().fedkd_setup(env)
        self.public = env.public

    def fedkd_labels_read(self) -> dict[str, np.ndarray]:
        """{purpose: the public samples whose labels this strategy reads}: the samples devices
        pretrain on (``"transfer"``) when pretraining is on, else nothing; the server reads none."""
        if self.public_pretrain_epochs <= 0:
            return {}
        if self.public is None:
            raise RuntimeError(f"{type(self).__name__} needs fedkd_setup() with the public set first")
        return {"transfer": labelled_public(self.public.seed, self.public.size, self._pretrain_count())}

    def _pretrain_count(self) -> int:
        """How many public samples a device pretrains on: the client's rule, the first
        ``public_pretrain_samples`` of the run's labelled order (all of the split for None)."""
        wanted = self.public.size if self.public_pretrain_samples is None else self.public_pretrain_samples
        return min(int(wanted), self.public.size)

    def fedkd_state(self) -> dict:
        """What later rounds depend on, for checkpoints: the targets and the samples they refer to."""
        return {"targets": self.targets, "target_indices": self.target_indices,
                "asked_indices": self._asked_indices}

    def fedkd_restore(self, state: dict) -> None:
        """The inverse of :meth:`fedkd_state`, on a strategy built and bound as the run's was."""
        self.targets, self.target_indices = state["targets"], state["target_indices"]
        self._asked_indices = state["asked_indices"]

    # -- what subclasses change ---------------------------------------------------
    def combine(self, logits: np.ndarray, weights: np.ndarray) -> np.ndarray:
        """Targets (probabilities) from device logits (devices, samples, classes)."""
        raise NotImplementedError

    # -- Flower's Strategy API ----------------------------------------------------
    def summary(self) -> None:
        log(INFO, "\t├──> %s: fraction %.2f, public batch %d, codec %s/%s, T=%.2f", type(self).__name__,
            self.fraction_train, self.public_batch, self.codec, self.downlink_codec, self.temperature)

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        node_ids = self._sample(grid)
        self._ask_public_batch(server_round)
        targets = None if self.targets is None else (self.target_indices, self.targets)
        content = RecordDict({"config": self._task(server_round, self.codec, self.local_epochs, targets)})
        return [Message(content, node, MESSAGE_TYPE) for node in node_ids]

    # -- pieces subclasses that plan per device reuse ----------------------------
    def _sample(self, grid: Grid) -> list[int]:
        """This round's devices, as FedAvg samples them, in id order."""
        if self.public is None:
            raise RuntimeError(f"{type(self).__name__} needs fedkd_setup() with the public set before round 1")
        node_ids = sample_devices(grid, self.fraction_train, self.min_train_nodes, self.min_available_nodes)
        return sorted(node_ids)

    def _ask_public_batch(self, server_round: int) -> None:
        """Draw the round's public samples from (seed, round): the same in every process and on resume."""
        rng = rng_for(self.public.seed, "public-batch", server_round)
        pool = np.arange(self.public.size) if self.public_pool is None else self.public_pool
        self._asked_indices = np.sort(rng.choice(pool, min(self.public_batch, len(pool)), replace=False))

    def _task(self, server_round: int, codec: str, local_epochs: int | None,
              targets: tuple[np.ndarray, np.ndarray] | None) -> ConfigRecord:
        """The config a device's ``train.logits`` task reads (``logits_task``)."""
        task = ConfigRecord({"server-round": server_round, "public-indices": self._asked_indices.tolist(),
                             "codec": codec, "temperature": float(self.temperature),
                             "distill-epochs": int(self.distill_epochs),
                             "public-pretrain-epochs": int(self.public_pretrain_epochs)})
        if self.public_pretrain_samples is not None:
            task["public-pretrain-samples"] = int(self.public_pretrain_samples)
        if local_epochs is not None:
            task["local-epochs"] = int(local_epochs)
        if targets is not None:
            indices, probs = targets
            task["targets"] = get_codec(self.downlink_codec).encode(probs.astype(np.float32))
            task["target-indices"] = indices.tolist()
        return task

    def aggregate_train(self, server_round: int, replies: Iterable[Message]
                        ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        valid = [r for r in replies if not r.has_error()]
        if not valid:
            return None, None
        logits = np.stack([decode_any(bytes(r.content["logits"]["payload"])) for r in valid])
        weights = np.array([float(r.content["metrics"]["num-examples"]) for r in valid])
        self.targets = self.combine(logits, weights)
        self.target_indices = self._asked_indices
        return None, weighted_reply_metrics(valid, "train-loss")
