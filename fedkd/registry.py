"""Find a strategy class by name.

A strategy is named by its registry name (``fedavg``), as ``module:Class``,
as ``path/to/file.py:Class``, or by the name a package registered in the
``fedkd.strategies`` entry-point group. Anything else is a clear error.
"""
from __future__ import annotations

import importlib
import importlib.util
import inspect
import sys
from dataclasses import dataclass
from importlib.metadata import entry_points
from pathlib import Path
from typing import Any

from flwr.serverapp.strategy import Strategy

from .errors import FedkdError

ENTRY_POINT_GROUP = "fedkd.strategies"


@dataclass(frozen=True)
class StrategyRef:
    name: str
    cls: type[Strategy]
    description: str
    shares_weights: bool  # exchanges model weights, so every device needs one architecture


def builtin_strategies() -> dict[str, str]:
    from strategies import BUILTIN

    return dict(BUILTIN)


def _load_file(path: Path):
    if not path.is_file():
        raise FedkdError(f"strategy file {path} not found")
    module_name = f"fedkd_user_{abs(hash(str(path.resolve())))}"
    spec = importlib.util.spec_from_file_location(module_name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module
    try:
        spec.loader.exec_module(module)
    except Exception as exc:  # noqa: BLE001 - report the user's broken file in one line
        del sys.modules[module_name]
        raise FedkdError(f"strategy file {path} failed to import: {type(exc).__name__}: {exc}") from None
    return module


def _import(module_name: str):
    try:
        return importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        raise FedkdError(f"strategy module {module_name!r} not found ({exc.msg})") from None
    except Exception as exc:  # noqa: BLE001
        raise FedkdError(f"strategy module {module_name!r} failed to import: {type(exc).__name__}: {exc}") from None


def resolve_strategy(name: str) -> StrategyRef:
    target = builtin_strategies().get(name)
    if target is None:
        found = [ep for ep in entry_points(group=ENTRY_POINT_GROUP) if ep.name == name]
        target = found[0].value if found else None
    if target is None and ":" not in name:
        known = sorted(builtin_strategies()) + sorted(ep.name for ep in entry_points(group=ENTRY_POINT_GROUP))
        raise FedkdError(f"unknown strategy {name!r}; expected one of {known}, "
                         "or module:Class, or path/to/file.py:Class")
    where, _, attr = (target or name).rpartition(":")
    module = _load_file(Path(where)) if where.endswith(".py") else _import(where)
    cls = getattr(module, attr, None)
    if cls is None:
        raise FedkdError(f"{where} has no class {attr!r}")
    if not (inspect.isclass(cls) and issubclass(cls, Strategy)):
        raise FedkdError(f"{where}:{attr} is not a Flower strategy "
                         "(expected a subclass of flwr.serverapp.strategy.Strategy)")
    doc = inspect.getdoc(module) or inspect.getdoc(cls) or ""
    description = doc.strip().splitlines()[0] if doc.strip() else "(no description)"
    shares = getattr(module, "SHARES_WEIGHTS", getattr(cls, "shares_weights", True))
    return StrategyRef(name, cls, description, bool(shares))


def strategy_params(ref: StrategyRef, defaults: dict[str, Any], params: dict[str, Any]) -> dict[str, Any]:
    """Keyword arguments for the strategy: scenario defaults it accepts, then its own params."""
    accepted = inspect.signature(ref.cls.__init__).parameters
    takes_any = any(p.kind is p.VAR_KEYWORD for p in accepted.values())
    merged = {k: v for k, v in defaults.items() if takes_any or k in accepted}
    merged.update(params)
    return merged


def check_params(ref: StrategyRef, params: dict[str, Any]) -> str | None:
    """None if ``ref.cls`` accepts ``params``, else what is wrong."""
    signature = inspect.signature(ref.cls.__init__)
    try:
        signature.bind(None, **params)
    except TypeError as exc:
        return f"{ref.name} does not accept these params: {exc}"
    return None
