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


class DeviceClassSpec(_Strict):
    """A kind of device and its resources. Every number carries its unit in its name."""

    name: Annotated[str, Field(min_length=1)]
    share: Annotated[float, Field(gt=0, le=1)]
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
    idle_power_w: NonNegativeFloat = 0.0
    recharge_power_w: NonNegativeFloat = 0.0
    availability: AvailabilitySpec = AvailabilitySpec()


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


class TrainingSpec(_Strict):
    local_epochs: PositiveInt = 1
    batch_size: PositiveInt = 32
    learning_rate: PositiveFloat = 0.003
    optimizer: Literal["adam", "sgd"] = "adam"
    model_tier: Literal["tiny", "small", "base"] = "small"


class StrategySpec(_Strict):
    name: Annotated[str, Field(min_length=1)]
    label: str | None = Field(None, description="name in the results; defaults to name")
    params: dict[str, Any] = Field(default_factory=dict)

    @property
    def run_label(self) -> str:
        return self.label or self.name


class BackendSpec(_Strict):
    kind: Literal["inprocess", "ray"] = "inprocess"
    address: str | None = Field(None, description="Ray cluster address; null = start one locally")
    executors: PositiveInt | None = Field(None, description="executor nodes; null = CPU count")
    timeout_s: PositiveFloat = 3600.0


class Scenario(_Strict):
    name: Annotated[str, Field(pattern=r"^[A-Za-z0-9_.-]+$")]
    description: str = ""
    seed: int = 0
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

    @field_validator("strategies", mode="before")
    @classmethod
    def _names_as_shorthand(cls, value: Any) -> Any:
        # `- fedavg` is shorthand for `- {name: fedavg}`.
        if isinstance(value, list):
            return [{"name": v} if isinstance(v, str) else v for v in value]
        return value

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


def load_scenario(path: str | Path) -> Scenario:
    """Load and validate a scenario file, including the data and strategy references."""
    scenario = parse_scenario(load_yaml(path), str(path))
    # Imported here: checking references needs the registries, which import torch.
    from .references import check_references

    check_references(scenario, str(path))
    return scenario
