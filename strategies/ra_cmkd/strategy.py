"""RA-CMKD: resource-aware cross-modal knowledge distillation through fog nodes.

fedkd's headline strategy; it combines published ideas rather than
reproducing one paper: logit exchange on a paired public set (FedMD, Li &
Wang 2019, arXiv:1910.03581), confidence-weighted cross-modal ensembles
(camera models teach sensor models and the other way round; cf. ensemble
distillation in FedDF, Lin et al. 2020, arXiv:2006.07242), hierarchical
edge -> fog -> cloud aggregation (cf. HierFAVG, Liu et al. 2020,
arXiv:1905.06641), and a per-device resource-aware plan (who takes part,
with which sensor, model size, local epochs and codec) from telemetry.

Each round: the allocator plans the sampled devices from their last reports;
each device downloads its fog's model of its planned architecture (tier and
sensors; ``model_downlink`` precision), trains it on its shard, and sends its
logits on the round's public samples through its planned codec; each fog
checks each modality's teachers on the public labels it holds (a modality no
better than chance teaches nothing), builds cross-modal targets from its
devices; the cloud merges the fogs and sends its view back down, which each
fog blends with its own; each fog then distills its knowledge bank into its
models while aligning their encoders across modalities on the public pairs
(``fog_models.py``, ``alignment.py``). A device serves its fog's model, so
those models are what is scored.

``ra_cmkd_targets`` (:class:`FogTargetsKD`) is the first design, a class of
its own: the fogs keep targets only and each device keeps its own model and
digests its fog's targets (FedMD's loop); its own model is then what is
scored. :class:`RACMKD` builds on it and adds the fog models.
"""
from __future__ import annotations

import functools
from collections.abc import Iterable

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp import Grid

from fedkd.allocator import AllIn, DevicePlan, plans_for
from fedkd.codecs import decode_any, get_codec
from fedkd.contract import StrategyEnv
from .fog import blend, cross_modal_targets, merge_fog_targets, reliability
from .fog_models import FogModels
from fedkd.logit_exchange import MESSAGE_TYPE, LogitExchange
from fedkd.registry import resolve_allocator
from fedkd.resource_allocator import DeviceHardware, ResourceAware, TaskShape
from fedkd.architectures import Architecture, population_architectures
from fedkd.protocol import FOG_MODEL, payload_bytes
from fedkd.labels import labelled_order, labelled_public, unlabelled_public
from fedkd.scoring import PanelDevice, PanelModel, node_profile
from fedkd.seeding import rng_for

class FogTargetsKD(LogitExchange):
    """RA-CMKD's first design: fogs keep cross-modal targets; devices keep their own models and digest them."""

    def __init__(self, allocator: str = "resource_aware", allocator_params: dict | None = None,
                 peer_weight: float = 0.25, cloud_share: float = 0.5, backhaul_codec: str = "int8",
                 check_teachers: bool = True, bank_samples: int = 256, **kwargs):
        super().__init__(**kwargs)
        self._ctx = None
        self.devices: dict[Architecture, int] = {}  # the population's census, for scoring
        self._archs: dict[int, Architecture] = {}  # this round's devices' planned architectures
        self.check_teachers = check_teachers  # weigh each modality by its accuracy on public labels
        self._public_labels: np.ndarray | None = None
        if not 0 <= cloud_share <= 1:
            raise ValueError(f"cloud_share must be in [0, 1], got {cloud_share}")
        get_codec(backhaul_codec)
        self.allocator = resolve_allocator(allocator).cls(**(allocator_params or {}))
        self.peer_weight, self.cloud_share, self.backhaul_codec = peer_weight, cloud_share, backhaul_codec
        # The latest targets of each fog and of the cloud, with the public samples they refer
        # to: a fog that heard nobody this round keeps older targets about other samples.
        self.fog_targets: dict[int, dict[str, np.ndarray]] = {}
        self.fog_target_indices: dict[int, np.ndarray] = {}
        self.cloud_targets: dict[str, np.ndarray] = {}
        self._checked: set[int] = set()  # public samples whose labels checked teachers
        self._validation = np.zeros(0, np.int64)
        # Each fog's (and the cloud's) knowledge bank: its latest targets for every public
        # sample it has seen (NaN rows: not yet). A device digests up to bank_samples of them,
        # not only the last round's, so knowledge gathered while it was away reaches it.
        if bank_samples < 0:
            raise ValueError(f"bank_samples must be >= 0, got {bank_samples}")
        self.bank_samples = bank_samples
        self.fog_bank: dict[int, dict[str, np.ndarray]] = {}
        self.cloud_bank: dict[str, np.ndarray] = {}
        self._plans: dict[int, DevicePlan] = {}
        self._profiles: dict = {}
        self.sat_out = 0  # devices the allocator kept out last round

    def fedkd_setup(self, env: StrategyEnv) -> None:
        """The public set; the public labels (fogs check their teachers on them); registrations
        and model costs, for the allocator."""
        super().fedkd_setup(env)
        ctx = env.ctx
        if ctx is None:
            return  # a unit test of the targets alone
        self._public_labels = ctx.dataset.split("public").labels
        self._ctx = ctx
        self._setup_fogs(ctx)
        if not isinstance(self.allocator, ResourceAware):
            return
        population, training = ctx.population, ctx.scenario.training

        def hardware(device_id: int) -> DeviceHardware:
            c = population.class_of(device_id)
            return DeviceHardware(
                modalities=ctx.modalities_of(device_id), model_tier=c.model_tier or training.model_tier,
                samples=len(ctx.partitioner.shard(device_id).indices), latency_s=c.latency_s,
                capacity_j=float("inf") if c.battery_j is None else c.battery_j,
                energy_per_flop_j=c.energy_per_flop_j, energy_per_byte_up_j=c.energy_per_byte_up_j,
                energy_per_byte_down_j=c.energy_per_byte_down_j)

        def flops(tier: str, modalities: tuple[str, ...]) -> tuple[int, int]:
            return ctx.train_flops_per_sample(tier, modalities), ctx.forward_flops_per_sample(tier, modalities)

        classes = ctx.dataset.num_classes
        batch = min(self.public_batch, len(ctx.dataset.split("public")))
        digest = self._digest_samples(ctx, batch)
        self.allocator.bind(hardware, flops, TaskShape(
            public_batch=batch, distill_samples=digest * self.distill_epochs, num_classes=classes,
            downlink_bytes=self._measure_downlink(batch, digest, classes), reply_overhead_bytes=_reply_overhead(),
            model_bytes=self._model_bytes(ctx)), deadline_s=ctx.scenario.world.round_deadline_s)

    # -- what RACMKD changes -------------------------------------------------------
    def _setup_fogs(self, ctx) -> None:
        """Before round 1, after the public labels: nothing more for fogs that keep targets only."""

    def _digest_samples(self, ctx, batch: int) -> int:
        """Public samples a device digests a round (for the allocator's cost model)."""
        return max(batch, min(self.bank_samples, len(ctx.dataset.split("public"))))

    def _model_bytes(self, ctx):
        """Bytes of a model download by architecture, or None: devices download no models."""
        return None

    def _downloads(self) -> dict[tuple[int, Architecture], ArrayRecord] | None:
        """Models the round's devices download, by (fog, architecture); None: devices keep their own."""
        return None

    def _fog_updates(self, fogs: list[int], server_round: int
                     ) -> tuple[dict[int, float], dict[int, int], list[float]]:
        """After the targets: each fog's FLOPs, each fog's model bytes swapped with the cloud, losses."""
        return {}, {}, []

    def fedkd_state(self) -> dict:
        return {**super().fedkd_state(), "fog_targets": self.fog_targets, "cloud_targets": self.cloud_targets,
                "fog_target_indices": self.fog_target_indices, "checked": sorted(self._checked),
                "fog_bank": self.fog_bank, "cloud_bank": self.cloud_bank, "sat_out": self.sat_out}

    def fedkd_restore(self, state: dict) -> None:
        super().fedkd_restore(state)
        self.fog_targets, self.cloud_targets = state["fog_targets"], state["cloud_targets"]
        self.fog_target_indices, self._checked = state["fog_target_indices"], set(state["checked"])
        self.fog_bank, self.cloud_bank = state["fog_bank"], state["cloud_bank"]
        self.sat_out = state["sat_out"]

    def fedkd_labels_read(self) -> dict[str, np.ndarray]:
        """Labelled public samples read: those whose labels checked the teachers."""
        return {"teacher_check": np.array(sorted(self._checked), dtype=np.int64)} if self._checked else {}

    def _measure_downlink(self, batch: int, digest: int, classes: int) -> int:
        config = ConfigRecord({"server-round": 1, "public-indices": list(range(batch)), "codec": "int8",
                               "modality": "camera+sensor", "model-tier": "small", "local-epochs": 1,
                               "temperature": 1.0, "distill-epochs": 1, "public-pretrain-epochs": 0})
        if digest:
            targets = np.full((digest, classes), 1.0 / classes, dtype=np.float32)
            config["targets"] = get_codec(self.downlink_codec).encode(targets)
            config["target-indices"] = list(range(digest))
        return payload_bytes(RecordDict({"config": config}))

    # -- Flower's Strategy API ----------------------------------------------------
    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        network = self.env.network
        candidates = self._sample(grid)
        telemetry = network.telemetry() if network is not None else None
        allocator = self.allocator if telemetry is not None else AllIn()
        plans = plans_for(allocator, server_round, candidates, telemetry)
        self._plans = {d: p for d, p in plans.items() if p.take_part}
        self.sat_out = len(plans) - len(self._plans)
        self._profiles = network.node_profiles(self._plans) if network is not None else {}
        self._ask_public_batch(server_round)
        messages = []
        self._archs = {device: self._architecture(device, plan) for device, plan in self._plans.items()}
        downloads = self._downloads()
        for device, plan in sorted(self._plans.items()):
            fog, arch = self._fog(device), self._archs[device]
            targets = (None if downloads is not None
                       else self._targets_for(fog, "+".join(arch.modalities), server_round))
            task = self._task(server_round, plan.codec, plan.local_epochs, targets)
            task["modality"], task["model-tier"] = "+".join(arch.modalities), arch.tier
            content = RecordDict({"config": task})
            if downloads is not None:
                content[FOG_MODEL] = downloads[(fog, arch)]
            messages.append(Message(content, device, MESSAGE_TYPE))
        return messages

    def _architecture(self, device: int, plan: DevicePlan) -> Architecture:
        """The model a device runs this round: its registered one, or the smaller tier or
        single sensor its plan asks for (sensors kept in the dataset's order)."""
        profile = self._profiles.get(device) or node_profile(self._ctx, device)
        tier, modalities = profile.model_tier, tuple(profile.modalities)
        if plan.modality is not None:
            wanted = set(plan.modality.split("+"))
            modalities = tuple(m for m in modalities if m in wanted)
        return Architecture(plan.model_tier or tier, modalities)

    def _fog(self, device: int) -> int:
        profile = self._profiles.get(device)
        return 0 if profile is None or profile.fog is None else int(profile.fog)

    def _targets_for(self, fog: int, modality: str | None, server_round: int
                     ) -> tuple[np.ndarray, np.ndarray] | None:
        """(public indices, targets) a device of ``modality`` in ``fog`` digests."""
        if self.bank_samples == 0:  # only the latest targets, as in FedMD
            for indices, source in ((self.fog_target_indices.get(fog), self.fog_targets.get(fog, {})),
                                    (self.target_indices, self.cloud_targets)):
                if modality in source:
                    return indices, source[modality]
            if self.cloud_targets:
                return self.target_indices, np.mean(list(self.cloud_targets.values()), axis=0)
            return None
        bank = self.fog_bank.get(fog, {}).get(modality)
        if bank is None:
            bank = self.cloud_bank.get(modality)
        if bank is None and self.cloud_bank:  # a sensor set no fog has seen yet: the cloud's mean view
            banks = np.stack(list(self.cloud_bank.values()))
            seen = (~np.isnan(banks)).sum(0)
            bank = np.where(seen > 0, np.nansum(banks, axis=0) / np.maximum(seen, 1), np.nan)
        if bank is None:
            return None
        filled = np.flatnonzero(~np.isnan(bank[:, 0]))
        if len(filled) == 0:
            return None
        if len(filled) > self.bank_samples:
            rng = rng_for(self.public.seed, "bank", server_round, fog, modality)
            filled = np.sort(rng.choice(filled, self.bank_samples, replace=False))
        return filled, bank[filled]

    def aggregate_train(self, server_round: int, replies: Iterable[Message]
                        ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        valid = [r for r in replies if not r.has_error()]
        if not valid:
            return None, None
        by_fog: dict[int, list[tuple[np.ndarray, str, float]]] = {}
        for reply in valid:
            device = reply.metadata.src_node_id
            logits = decode_any(bytes(reply.content["logits"]["payload"]))
            weight = float(reply.content["metrics"]["num-examples"])
            modality = "+".join(self._archs[device].modalities)
            by_fog.setdefault(self._fog(device), []).append((logits, modality, weight))
        fog_views, fog_weights = {}, {}
        labels = None
        if self._public_labels is not None and self.check_teachers:
            labels = self._public_labels[self._asked_indices]
            self._checked.update(int(i) for i in self._asked_indices)
        for fog, items in sorted(by_fog.items()):
            logits, modalities = np.stack([i[0] for i in items]), [i[1] for i in items]
            trust = reliability(logits, modalities, labels) if labels is not None else None
            fog_views[fog] = cross_modal_targets(logits, modalities, np.array([i[2] for i in items]),
                                                 self.peer_weight, self.temperature, trust)
            fog_weights[fog] = sum(i[2] for i in items)
        self.cloud_targets = merge_fog_targets(list(fog_views.values()), list(fog_weights.values()))
        for fog, view in fog_views.items():
            self.fog_targets[fog] = blend(view, self.cloud_targets, self.cloud_share)
            self.fog_target_indices[fog] = self._asked_indices
        self.target_indices = self._asked_indices
        self._file_in_banks(sorted(fog_views))
        fog_flops, model_bytes, distill_losses = self._fog_updates(sorted(fog_views), server_round)
        self._ship_over_backhaul(fog_views, fog_flops, model_bytes)
        weights = np.array([float(r.content["metrics"]["num-examples"]) for r in valid])
        losses = np.array([float(r.content["metrics"]["train-loss"]) for r in valid])
        metrics = MetricRecord({"train-loss": float(np.average(losses, weights=weights)),
                                "num-examples": float(weights.sum()), "sat-out": float(self.sat_out)})
        if distill_losses:
            metrics["fog-distill-loss"] = float(np.mean(distill_losses))
        return None, metrics

    def _file_in_banks(self, fogs: list[int]) -> None:
        """File this round's targets of the fogs that heard devices this round (and the cloud's)
        at the public samples they are about."""
        shape = (self.public.size, self.public.num_classes)
        for fog in fogs:
            for modality, t in self.fog_targets[fog].items():
                self.fog_bank.setdefault(fog, {}).setdefault(modality, np.full(shape, np.nan))[self._asked_indices] = t
        for modality, t in self.cloud_targets.items():
            self.cloud_bank.setdefault(modality, np.full(shape, np.nan))[self._asked_indices] = t

    def _ship_over_backhaul(self, fog_views: dict[int, dict[str, np.ndarray]],
                            fog_flops: dict[int, float], model_bytes: dict[int, int]) -> None:
        """Each fog sends its targets up and gets the cloud's down, on its own link; it
        computes its ensemble and, with fog models, distills them (``fog_flops``) and
        swaps them with the cloud (``model_bytes`` each way)."""
        network = self.env.network
        if network is None or network.topology is None:
            return
        rows, cols = len(self._asked_indices), self.public.num_classes
        one = get_codec(self.backhaul_codec).encoded_size(rows, cols)
        transfers = {}
        for fog, view in fog_views.items():
            devices = sum(1 for d in self._plans if self._fog(d) == fog)
            # Ensembling costs about one multiply-add per teacher, sample, class and student group.
            flops = 4.0 * devices * rows * cols * len(view) + fog_flops.get(fog, 0.0)
            moved = model_bytes.get(fog, 0)
            transfers[fog] = (one * len(view) + moved, one * len(self.cloud_targets) + moved, flops)
        network.backhaul(transfers)


class RACMKD(FogTargetsKD):
    """RA-CMKD: resource-aware cross-modal knowledge distillation through fog nodes."""

    def __init__(self, fog_distill_epochs: int = 2, fog_learning_rate: float = 1e-3, fog_batch_size: int = 64,
                 align_weight: float = 0.1, align_dim: int = 16, cloud_model_share: float = 0.0,
                 validation_samples: int = 200, model_downlink: str = "fp16", **kwargs):
        super().__init__(**kwargs)
        if model_downlink not in MODEL_DTYPES:
            raise ValueError(f"model_downlink must be one of {sorted(MODEL_DTYPES)}, got {model_downlink!r}")
        self.model_downlink = model_downlink
        self.fog_settings = {"epochs": fog_distill_epochs, "learning_rate": fog_learning_rate,
                             "batch_size": fog_batch_size, "temperature": self.temperature,
                             "align_weight": align_weight, "align_dim": align_dim}
        FogModels.check_settings(**self.fog_settings)
        if not 0 <= cloud_model_share <= 1:
            raise ValueError(f"cloud_model_share must be in [0, 1], got {cloud_model_share}")
        self.cloud_model_share = cloud_model_share
        if validation_samples < 0:
            raise ValueError(f"validation_samples must be 0 or more, got {validation_samples}")
        self.validation_samples = validation_samples
        self.fog_models: FogModels | None = None  # built by fedkd_setup

    def _setup_fogs(self, ctx) -> None:
        # A labelled validation set held out of what devices are asked about (as FedDF's): the
        # run's first labelled public samples, the same ones every strategy with this budget reads.
        size = len(ctx.dataset.split("public"))
        held = min(self.validation_samples, size - 1)
        validation = labelled_public(ctx.scenario.seed, size, held)
        self.public_pool = unlabelled_public(ctx.scenario.seed, size, held)
        # Labelled pretraining, when asked, happens once per fog model instead of on every device,
        # on the labelled samples that come next in the run's order.
        self.fog_models = FogModels(ctx, validation=validation, pretrain_epochs=self.public_pretrain_epochs,
                                    pretrain_samples=self.public_pretrain_samples,
                                    pretrain_pool=labelled_order(ctx.scenario.seed, size)[held:],
                                    **self.fog_settings)
        self._validation = validation
        self.devices = population_architectures(ctx)

    def _digest_samples(self, ctx, batch: int) -> int:
        return 0  # a device digests nothing: it downloads the model its fog distilled

    def _model_bytes(self, ctx):
        @functools.cache  # the allocator asks for every plan of every device, every round
        def model_bytes(tier: str, modalities: tuple[str, ...]) -> int:
            model = ctx.new_model(tier, modalities=modalities)
            return payload_bytes(RecordDict({FOG_MODEL: _model_record(model, self.model_downlink)}))

        return model_bytes

    def _downloads(self) -> dict[tuple[int, Architecture], ArrayRecord]:
        # One download per (fog, architecture), shared by its devices' messages.
        return {(self._fog(d), arch): _model_record(self.fog_models.model(self._fog(d), arch), self.model_downlink)
                for d, arch in self._archs.items()}

    def _fog_updates(self, fogs: list[int], server_round: int
                     ) -> tuple[dict[int, float], dict[int, int], list[float]]:
        """Each fog distills its bank into its models; then they are shared through the cloud."""
        fog_flops, distill_losses = {}, []
        for fog in fogs:
            targets = {arch: found for arch in self.fog_models.architectures(fog)
                       if (found := self._targets_for(fog, "+".join(arch.modalities), server_round)) is not None}
            loss, fog_flops[fog] = self.fog_models.distill(fog, targets, server_round)
            distill_losses.append(loss)
        return fog_flops, self.fog_models.share_through_cloud(fogs, self.cloud_model_share), distill_losses

    def fedkd_state(self) -> dict:
        return {**super().fedkd_state(), "fog_models": self.fog_models.state() if self.fog_models is not None else {}}

    def fedkd_restore(self, state: dict) -> None:
        super().fedkd_restore(state)
        if self.fog_models is not None:
            self.fog_models.restore(state["fog_models"])

    def fedkd_panel_model(self, ctx, device: PanelDevice, device_state: dict) -> PanelModel:
        """A device runs its fog's model of its architecture."""
        fog, arch = device.fog or 0, Architecture(device.model_tier, device.modalities)
        return PanelModel(("fog", fog, arch), lambda: self.fog_models.model(fog, arch))

    def fedkd_labels_read(self) -> dict[str, np.ndarray]:
        """Labelled public samples read: the public samples whose labels checked the teachers,
        the fogs' validation set, and pretraining's."""
        read = super().fedkd_labels_read()
        read["validation"] = self._validation
        if self.public_pretrain_epochs > 0:
            read["pretrain"] = self.fog_models.pretrain_indices()
        return read


# What a fog model's weights travel as on the downlink; the device computes in float32.
MODEL_DTYPES = {"fp32": torch.float32, "fp16": torch.float16}


def _model_record(model: torch.nn.Module, precision: str) -> ArrayRecord:
    dtype = MODEL_DTYPES[precision]
    return ArrayRecord({name: t.detach().to(dtype) for name, t in model.state_dict().items()})


def _reply_overhead() -> int:
    """Bytes of a logit reply besides the logits themselves (measured, not guessed)."""
    reply = RecordDict({"logits": ConfigRecord({"payload": b""}),
                        "metrics": MetricRecord({"num-examples": 1, "train-loss": 0.0, "distill-loss": 0.0})})
    return payload_bytes(reply)
