"""Scenario files: plain YAML, validated once into typed, frozen objects.

Unknown keys are rejected. Every error names the file, the key path and what
was expected (:class:`fedkd.errors.ScenarioError`); the CLI turns it into one
line and exit code 2.
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from .errors import ScenarioError

PositiveFloat = Annotated[float, Field(gt=0, allow_inf_nan=False)]
NonNegativeFloat = Annotated[float, Field(ge=0, allow_inf_nan=False)]
Probability = Annotated[float, Field(ge=0, le=1, allow_inf_nan=False)]
PositiveInt = Annotated[int, Field(gt=0)]

# A YAML document whose aliases would expand past this many nodes is refused
# before anything walks it (a "billion laughs" file is a few hundred bytes).
MAX_EXPANDED_YAML_NODES = 1_000_000


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, strict=False)


class PartitionSpec(_Strict):
    """How the train split is dealt out to devices (computed lazily per device)."""

    label_alpha: PositiveFloat | None = Field(
        0.5, description="Dirichlet concentration of each device's label mix; null = IID"
    )
    samples_per_device: PositiveInt = 64
    quantity_sigma: NonNegativeFloat = Field(0.5, description="log-normal spread of shard sizes")
    min_samples: PositiveInt = 8
    by_domain: bool = Field(
        False, description="each device sees one domain (e.g. one camera) of the dataset"
    )
    disjoint: bool = Field(
        False, description="no two shards share a sample (dealt once per process, O(train size)); "
        "needs devices * min_samples <= train samples"
    )
    modality_mix: dict[str, Annotated[float, Field(gt=0, le=1, allow_inf_nan=False)]] | None = Field(
        None, description="share of devices per modality set, e.g. {camera: 0.6, sensor: 0.3, "
        "camera+sensor: 0.1}; used for devices whose class leaves `modalities` null"
    )
    partitioner: Annotated[str, Field(min_length=1)] | None = Field(
        None, description="a Flower Datasets partitioner (flwr_datasets.partitioner), e.g. DirichletPartitioner, "
        "or module:Class / file.py:Class; null = fedkd's own lazy partitioner (label_alpha ... disjoint)"
    )
    params: dict[str, Any] = Field(
        default_factory=dict, description="the partitioner's parameters (num_partitions is the population size)"
    )

    @model_validator(mode="after")
    def _one_partitioner(self) -> "PartitionSpec":
        own = ("label_alpha", "samples_per_device", "quantity_sigma", "min_samples", "by_domain", "disjoint")
        if self.partitioner is None:
            if self.params:
                raise ValueError("`params` are a Flower Datasets partitioner's; name it in `partitioner`")
            return self
        # Compared with the defaults, not model_fields_set: a scenario dumped and parsed again
        # (command-line overrides, worker processes) sets every field.
        mixed = [k for k in own if getattr(self, k) != type(self).model_fields[k].default]
        if mixed:
            raise ValueError(f"{mixed[0]} belongs to fedkd's own partitioner, not to {self.partitioner}; "
                             "give the partitioner's parameters in `params`")
        return self

    @field_validator("modality_mix")
    @classmethod
    def _mix_is_a_distribution(cls, mix: dict[str, float] | None) -> dict[str, float] | None:
        if mix is None:
            return None
        if not mix:
            raise ValueError("expected at least one modality set, or null")
        seen: dict[frozenset[str], str] = {}
        for key in mix:
            names = modality_set(key)
            if not all(names) or len(set(names)) != len(names):
                raise ValueError(f"{key!r}: expected distinct modality names joined by '+', e.g. 'camera+sensor'")
            if frozenset(names) in seen:
                raise ValueError(f"{key!r} and {seen[frozenset(names)]!r} name the same modality set")
            seen[frozenset(names)] = key
        total = sum(mix.values())
        if abs(total - 1.0) > 1e-6:
            raise ValueError(f"shares must sum to 1, they sum to {total:g}")
        return mix


def modality_set(key: str) -> tuple[str, ...]:
    """The modality names in a ``modality_mix`` key: ``"camera+sensor"`` -> ``("camera", "sensor")``."""
    return tuple(name.strip() for name in key.split("+"))


class DataSpec(_Strict):
    dataset: str
    options: dict[str, Any] = Field(default_factory=dict)
    partition: PartitionSpec = PartitionSpec()
    test_samples: PositiveInt | None = Field(
        None, description="evaluate on the first N test samples only (speed)"
    )


class AvailabilitySpec(_Strict):
    """Online / offline as a two-state continuous-time Markov chain."""

    mean_online_s: PositiveFloat = 3600.0
    mean_offline_s: PositiveFloat = 600.0


HourOfDay = Annotated[float, Field(ge=0, le=24, allow_inf_nan=False)]
HourlyFactors = Annotated[list[PositiveFloat], Field(min_length=24, max_length=24)]


class ChargingWindowSpec(_Strict):
    """Plugged in from ``start_hour`` to ``end_hour`` every day (past midnight if start > end)."""

    start_hour: HourOfDay
    end_hour: HourOfDay
    power_w: PositiveFloat

    @model_validator(mode="after")
    def _not_empty(self) -> "ChargingWindowSpec":
        if self.start_hour % 24 == self.end_hour % 24:
            raise ValueError("start_hour and end_hour are the same hour; for all-day charging "
                             "use recharge_power_w")
        return self


class SolarSpec(_Strict):
    """A solar panel: power follows a half-sine from sunrise to sunset, ``peak_w`` at midday."""

    peak_w: PositiveFloat
    sunrise_hour: HourOfDay = 6.0
    sunset_hour: HourOfDay = 20.0

    @model_validator(mode="after")
    def _day_has_length(self) -> "SolarSpec":
        if self.sunrise_hour >= self.sunset_hour:
            raise ValueError(f"sunrise_hour ({self.sunrise_hour:g}) must come before sunset_hour "
                             f"({self.sunset_hour:g})")
        return self


class QualityStateSpec(_Strict):
    """One state of a class's Markov-modulated link and compute quality (see fedkd.sim.quality)."""

    name: Annotated[str, Field(min_length=1)]
    mean_duration_s: PositiveFloat
    bandwidth_factor: PositiveFloat = Field(1.0, description="multiplies uplink_bps and downlink_bps")
    compute_factor: PositiveFloat = Field(1.0, description="multiplies compute_flops")


class DiurnalSpec(_Strict):
    """Multipliers by hour of day (24 numbers, the first for 0:00-1:00) of the class's means."""

    bandwidth_factor: HourlyFactors | None = None
    compute_factor: HourlyFactors | None = None


class DeviceClassSpec(_Strict):
    """A kind of device and its resources. Every number carries its unit in its name.

    ``profile`` / ``link`` name entries of the device catalogue (fedkd.sim.catalogue,
    ``fedkd devices``), which fill in the keys they have figures for; keys the class
    gives itself win. They come first so that an unknown name is the error reported.
    """

    name: Annotated[str, Field(min_length=1)]
    share: Annotated[float, Field(gt=0, le=1)]
    # exclude=True: the filled-in figures are what a run depends on (checkpoints, results).
    profile: str | None = Field(None, exclude=True, description="a hardware profile of the device catalogue")
    link: str | None = Field(None, exclude=True, description="a link profile of the device catalogue")
    modalities: list[str] | None = Field(None, description="modalities it senses; null = all")
    model_tier: Literal["tiny", "small", "base"] | None = None
    compute_flops: PositiveFloat = Field(description="mean sustained FLOP/s")
    uplink_bps: PositiveFloat
    downlink_bps: PositiveFloat
    latency_s: NonNegativeFloat = 0.05
    jitter_sigma: NonNegativeFloat = Field(
        0.3, description="log-normal spread of compute speed and bandwidth, drawn per round"
    )
    battery_j: PositiveFloat | None = Field(None, description="capacity; null = mains powered")
    initial_charge_min: Probability = 0.5
    energy_per_flop_j: NonNegativeFloat = 1e-9
    energy_per_byte_up_j: NonNegativeFloat = 1e-6
    energy_per_byte_down_j: NonNegativeFloat = 5e-7
    d2d_bps: PositiveFloat | None = Field(
        None, description="device-to-device radio rate, either way; null = receive on the downlink, "
        "send on the uplink"
    )
    d2d_latency_s: NonNegativeFloat | None = Field(None, description="per D2D message; null = latency_s")
    energy_per_byte_d2d_j: NonNegativeFloat | None = Field(
        None, description="per D2D byte sent or received; null = energy_per_byte_down_j / _up_j"
    )
    idle_power_w: NonNegativeFloat = 0.0
    recharge_power_w: NonNegativeFloat = Field(0.0, description="constant trickle charge")
    charging_windows: list[ChargingWindowSpec] = Field(
        default_factory=list, description="daily hours on a charger; adds to recharge_power_w"
    )
    solar: SolarSpec | None = Field(None, description="a panel following the sun; adds to the rest")
    availability: AvailabilitySpec = AvailabilitySpec()
    quality: list[QualityStateSpec] | None = Field(
        None, description="Markov-modulated link/compute states; null = always the class's means"
    )
    diurnal: DiurnalSpec | None = Field(None, description="bandwidth and speed by hour of day")
    trace: str | None = Field(
        None, description="CSV replayed by the class's devices (format: fedkd.sim.traces, README)"
    )

    @model_validator(mode="before")
    @classmethod
    def _catalogue_figures(cls, raw: Any) -> Any:
        if isinstance(raw, dict) and (raw.get("profile") is not None or raw.get("link") is not None):
            from .sim.catalogue import class_figures  # pydantic only; when a class names an entry

            return {**class_figures(raw.get("profile"), raw.get("link")), **raw}
        return raw

    @field_validator("profile")
    @classmethod
    def _profile_known(cls, name: str | None) -> str | None:
        from .sim.catalogue import check_name

        return None if name is None else check_name("profile", name)

    @field_validator("link")
    @classmethod
    def _link_known(cls, name: str | None) -> str | None:
        from .sim.catalogue import check_name

        return None if name is None else check_name("link", name)

    @field_validator("quality")
    @classmethod
    def _state_names_unique(cls, states: list[QualityStateSpec] | None) -> list[QualityStateSpec] | None:
        if states is not None:
            names = [s.name for s in states]
            if not names or len(set(names)) != len(names):
                raise ValueError(f"expected at least one state, with unique names, got {names}")
        return states

    @field_validator("trace")
    @classmethod
    def _trace_loads(cls, path: str | None) -> str | None:
        if path is not None:
            from .sim.traces import load_trace  # numpy; only when a class has a trace

            load_trace(path)  # a TraceError is a ValueError: reported under this key
        return path


class PopulationSpec(_Strict):
    devices: PositiveInt
    classes: Annotated[list[DeviceClassSpec], Field(min_length=1)]

    @model_validator(mode="after")
    def _shares_sum_to_one(self) -> "PopulationSpec":
        total = sum(c.share for c in self.classes)
        if abs(total - 1.0) > 1e-6:
            raise ValueError(f"class shares must sum to 1, they sum to {total:g}")
        names = [c.name for c in self.classes]
        if len(set(names)) != len(names):
            raise ValueError(f"class names must be unique, got {names}")
        return self


class TelemetrySpec(_Strict):
    """What devices report about themselves, for allocators (see fedkd.sim.telemetry)."""

    report_interval_s: PositiveFloat | None = Field(
        None, description="online devices also report every this many seconds; null = only after a task"
    )
    noise_sigma: NonNegativeFloat = Field(
        0.0, description="log-normal spread of reported battery, bandwidth and speed"
    )


class WorldSpec(_Strict):
    round_deadline_s: PositiveFloat = 600.0
    battery_floor_j: NonNegativeFloat = Field(
        0.0, description="a device at or below this charge is dead until recharged"
    )
    revive_fraction: Probability = Field(
        0.2, description="a flat device wakes again once recharged to this share of its capacity"
    )
    wait_step_s: PositiveFloat = Field(
        900.0, description="simulated time that passes each time a strategy waits for devices"
    )
    max_wait_s: PositiveFloat = Field(
        6 * 3600.0, description="give up on a strategy after waiting this long for devices"
    )
    start_hour: float = Field(
        8.0, ge=0, lt=24, allow_inf_nan=False,
        description="hour of day at simulated time 0 (charging windows, solar, diurnal factors)"
    )
    round_interval_s: PositiveFloat | None = Field(
        None, description="a round starts every this many simulated seconds, or when the previous one ends if "
        "later; devices idle, drain and charge in between; null = rounds back to back"
    )
    telemetry: TelemetrySpec = TelemetrySpec()


class SelfDistillSpec(_Strict):
    """LSSKD-style layered self-distillation during local training (see fedkd.self_distill)."""

    weight: PositiveFloat = Field(0.3, description="weight of the auxiliary heads' loss")
    temperature: PositiveFloat = Field(3.0, description="softening of the deeper classifier's output")
    ensemble_teaches_final: bool = Field(
        False, description="the mean of the heads' softened outputs also teaches the final classifier"
    )


class WarmStartSpec(_Strict):
    """A server-side start on labelled public samples for weight-sharing strategies, so that
    they read the same labels as strategies that need some (fedkd.labels)."""

    labelled_samples: PositiveInt = Field(description="the first N of the run's labelled public order")
    epochs: PositiveInt = 5


class EvaluationSpec(_Strict):
    """The one scoring protocol's panel (fedkd.scoring)."""

    panel_devices: PositiveInt = Field(
        64, description="devices in the evaluation panel (the whole population if smaller)"
    )


class TrainingSpec(_Strict):
    local_epochs: PositiveInt = 1
    batch_size: PositiveInt = 32
    learning_rate: PositiveFloat = 0.003
    optimizer: Literal["adam", "sgd"] = "adam"
    model_tier: Literal["tiny", "small", "base"] = "small"
    self_distillation: SelfDistillSpec | None = Field(
        None, description="auxiliary self-distillation heads in local training; null = off"
    )
    warm_start: WarmStartSpec | None = Field(
        None, description="weight-sharing strategies start from a model trained on labelled public samples"
    )


class StrategySpec(_Strict):
    name: Annotated[str, Field(min_length=1)]
    label: str | None = Field(None, description="name in the results; defaults to name")
    params: dict[str, Any] = Field(default_factory=dict)

    @property
    def run_label(self) -> str:
        return self.label or self.name


def ray_head(address: str) -> tuple[str, int] | None:
    """(host, port) of a Ray address ``HOST:PORT`` or ``ray://HOST:PORT`` (an IPv6 host in
    brackets); None if it is not of that form."""
    host, _, port = address.removeprefix("ray://").rpartition(":")
    host = host.strip("[]")
    return (host, int(port)) if host and port.isdigit() and 0 < int(port) < 65536 else None


class BackendSpec(_Strict):
    kind: Literal["inprocess", "processes", "ray"] = "inprocess"
    address: str | None = Field(None, description="Ray cluster address; null = start one locally")
    executors: PositiveInt | None = Field(None, description="executor nodes; null = CPU count")
    workers: PositiveInt | None = Field(
        None, description="worker processes of the processes backend; null = the cores this process may use")
    torch_device: Literal["cpu", "cuda", "auto"] = Field(
        "cpu", description="where models train and predict; auto = cuda if torch sees a GPU, else cpu. "
        "cpu by default: float results differ between devices")
    timeout_s: PositiveFloat = 3600.0
    batch_devices: PositiveInt = Field(
        1, description="at most this many devices of one phase that share an architecture and a training "
        "configuration train as one batched computation (fedkd.batched), on the inprocess and processes "
        "backends; 1 = one by one. Equal to one by one up to float rounding (tests/test_batched.py)")
    state_cache_mb: PositiveFloat = Field(
        256.0, description="memory for the devices' own models (fedkd.sim.state_store); the rest stays on disk "
        "in the results folder. How the run executes, not what it computes: results do not depend on it")

    @field_validator("address")
    @classmethod
    def _host_and_port(cls, address: str | None) -> str | None:
        if address is not None and address not in ("auto", "local") and ray_head(address) is None:
            raise ValueError(f"{address!r}: expected HOST:PORT of a Ray cluster's head (ray start --head "
                             "--port=PORT), ray://HOST:PORT, or auto")
        return address

    @field_validator("torch_device")
    @classmethod
    def _cuda_is_there(cls, device: str) -> str:
        # Checked here, so a run asking for a GPU it cannot have stops before anything runs.
        if device == "cuda":
            import torch

            if not torch.cuda.is_available():
                raise ValueError("cuda: torch sees no CUDA device here; expected cpu or auto")
        return device


class TopologySpec(_Strict):
    """Edge -> fog -> cloud: devices attach to fog nodes, fogs to the cloud.

    Only strategies that aggregate at the fog use the fog links; for the
    others a fog simply relays, which costs nothing here.
    """

    fogs: PositiveInt
    assign: Literal["by_domain", "hash"] = Field(
        "by_domain", description="fog = the device's data domain (e.g. its camera area), or a hash")
    uplink_bps: PositiveFloat = Field(2.0e7, description="fog -> cloud")
    downlink_bps: PositiveFloat = Field(5.0e7, description="cloud -> fog")
    latency_s: NonNegativeFloat = 0.05
    compute_flops: PositiveFloat = Field(5.0e10, description="a fog node's sustained FLOP/s")
    energy_per_byte_j: NonNegativeFloat = Field(1.0e-7, description="backhaul energy per byte, both ways")


class Scenario(_Strict):
    name: Annotated[str, Field(pattern=r"^[A-Za-z0-9_.-]+$")]
    description: str = ""
    seed: int = 0
    seeds: list[Annotated[int, Field(ge=0)]] | None = Field(
        None, description="run every strategy once per seed (replaces `seed`); `fedkd simulate --seeds` overrides it"
    )
    rounds: PositiveInt
    data: DataSpec
    population: PopulationSpec
    world: WorldSpec = WorldSpec()
    training: TrainingSpec = TrainingSpec()
    strategy_defaults: dict[str, Any] = Field(
        default_factory=dict, description="params given to every strategy that takes them"
    )
    strategies: Annotated[list[StrategySpec], Field(min_length=1)]
    backend: BackendSpec = BackendSpec()
    topology: TopologySpec | None = None
    evaluation: EvaluationSpec = EvaluationSpec()

    @field_validator("strategies", mode="before")
    @classmethod
    def _names_as_shorthand(cls, value: Any) -> Any:
        # `- fedavg` is shorthand for `- {name: fedavg}`.
        if isinstance(value, list):
            return [{"name": v} if isinstance(v, str) else v for v in value]
        return value

    @field_validator("seeds")
    @classmethod
    def _seeds_distinct(cls, seeds: list[int] | None) -> list[int] | None:
        if seeds is None:
            return None
        if not seeds:
            raise ValueError("expected at least one seed, or leave `seeds` out")
        repeated = sorted({s for s in seeds if seeds.count(s) > 1})
        if repeated:
            raise ValueError(f"expected distinct seeds; {repeated} appear more than once")
        return seeds

    @model_validator(mode="after")
    def _labels_unique(self) -> "Scenario":
        labels = [s.run_label for s in self.strategies]
        if len(set(labels)) != len(labels):
            raise ValueError(f"strategy labels must be unique, got {labels}; set `label:`")
        return self


def _expanded_size(node: yaml.Node, memo: dict[int, int]) -> int:
    key = id(node)
    if key not in memo:
        memo[key] = 1  # guards against recursive aliases
        if isinstance(node, yaml.SequenceNode):
            memo[key] = 1 + sum(_expanded_size(n, memo) for n in node.value)
        elif isinstance(node, yaml.MappingNode):
            memo[key] = 1 + sum(_expanded_size(k, memo) + _expanded_size(v, memo) for k, v in node.value)
    return memo[key]


def _key_path(loc: tuple[Any, ...]) -> str:
    path = ""
    for part in loc:
        if isinstance(part, int):
            path += f"[{part}]"
        elif part in ("function-after", "function-before") or "[" in str(part):
            continue  # pydantic's internal validator names, not user keys
        else:
            path += f".{part}" if path else str(part)
    return path


def _describe(error: dict[str, Any]) -> str:
    msg = error["msg"]
    if error["type"] == "extra_forbidden":
        return "unknown key"
    if error["type"] == "missing":
        return "required key is missing"
    msg = re.sub(r"^(Value error|Assertion failed), ", "", msg)
    given = error.get("input")
    if error["type"] not in ("model_type", "dict_type") and not isinstance(given, (dict, list)):
        msg += f" (got {given!r})"
    return msg


def parse_scenario(raw: Any, path: str = "<scenario>") -> Scenario:
    """Validate an already-loaded YAML document."""
    if not isinstance(raw, dict):
        raise ScenarioError(path, "", f"expected a mapping of scenario keys, got {type(raw).__name__}")
    try:
        return Scenario.model_validate(raw)
    except ValidationError as exc:
        errors = exc.errors()
        first = errors[0]
        more = f" (and {len(errors) - 1} more problem{'s' * (len(errors) > 2)})" if len(errors) > 1 else ""
        raise ScenarioError(path, _key_path(first["loc"]) or "<top>", _describe(first) + more) from None


def load_yaml(path: str | Path) -> Any:
    """Read YAML safely: no Python objects, no alias bombs, errors with line numbers."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ScenarioError(str(path), "", "file not found") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ScenarioError(str(path), "", f"cannot read file: {exc}") from None
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
        if node is None:
            raise ScenarioError(str(path), "", "the file is empty; expected a scenario mapping")
        if _expanded_size(node, {}) > MAX_EXPANDED_YAML_NODES:
            raise ScenarioError(
                str(path), "", f"YAML aliases expand past {MAX_EXPANDED_YAML_NODES:,} nodes; refused"
            )
        return yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}" if mark else "?"
        problem = getattr(exc, "problem", None) or str(exc)
        raise ScenarioError(str(path), where, f"malformed YAML: {problem}") from None


def read_scenario(path: str | Path) -> Scenario:
    """Read and validate a scenario file on its own terms (keys, types, ranges). What it names
    (datasets, strategies, partitioners) is checked by :func:`fedkd.checks.load_scenario`."""
    return parse_scenario(load_yaml(path), str(path))
