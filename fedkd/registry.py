"""Find strategies and allocators by name.

Either is named by its registry name (``fedavg``), as ``module:Class``, as
``path/to/file.py:Class`` (relative to the current folder), or by the name an
installed package registered in the ``fedkd.strategies`` (``fedkd.allocators``)
entry-point group. A built-in name wins over an entry point of the same name.
Anything that cannot be used is a one-line :class:`FedkdError`.
"""
from __future__ import annotations

import hashlib
import importlib
import importlib.util
import inspect
import sys
import typing
from collections.abc import Callable
from dataclasses import dataclass
from importlib.metadata import entry_points
from pathlib import Path
from types import ModuleType
from typing import Any

from flwr.serverapp.strategy import Strategy
from pydantic import TypeAdapter, ValidationError

from .errors import FedkdError

STRATEGY_GROUP = "fedkd.strategies"
ALLOCATOR_GROUP = "fedkd.allocators"


@dataclass(frozen=True)
class StrategyRef:
    name: str
    cls: type[Strategy]
    description: str
    shares_weights: bool  # exchanges model weights, so every device needs one architecture


@dataclass(frozen=True)
class AllocatorRef:
    name: str
    cls: type  # a subclass of fedkd.allocator.Allocator
    description: str


@dataclass(frozen=True)
class _Kind:
    """What differs between looking up a strategy and an allocator."""

    noun: str
    group: str
    builtins: Callable[[], dict[str, str]]
    base: Callable[[], type]
    base_name: str


def builtin_strategies() -> dict[str, str]:
    from fedkd.strategies import BUILTIN

    return dict(BUILTIN)


def builtin_allocators() -> dict[str, str]:
    from .allocator import BUILTIN_ALLOCATORS

    return dict(BUILTIN_ALLOCATORS)


def _allocator_base() -> type:
    from .allocator import Allocator

    return Allocator


STRATEGY = _Kind("strategy", STRATEGY_GROUP, builtin_strategies, lambda: Strategy,
                 "a Flower strategy (a subclass of flwr.serverapp.strategy.Strategy)")
ALLOCATOR = _Kind("allocator", ALLOCATOR_GROUP, builtin_allocators, _allocator_base,
                  "an allocator (a subclass of fedkd.allocator.Allocator)")


def _plugins(kind: _Kind) -> dict[str, str]:
    """Entry-point names of installed packages, as ``module:attr``.

    When two packages claim one name, importlib.metadata keeps the first on
    sys.path, as Python does for console scripts.
    """
    return {ep.name: f"{ep.module}:{ep.attr}" for ep in entry_points(group=kind.group)}


def registered(kind: _Kind) -> dict[str, str]:
    """Every name this kind is known by: built-ins first, then installed plugins."""
    builtins = kind.builtins()
    return builtins | {k: v for k, v in sorted(_plugins(kind).items()) if k not in builtins}


def registered_strategies() -> dict[str, str]:
    return registered(STRATEGY)


def registered_allocators() -> dict[str, str]:
    return registered(ALLOCATOR)


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def _load_file(path: Path, kind: _Kind) -> ModuleType:
    if not path.exists():
        where = "" if path.is_absolute() else f" (relative paths start at the current folder, {Path.cwd()})"
        raise FedkdError(f"{kind.noun} file {path} not found{where}")
    if not path.is_file():
        raise FedkdError(f"{kind.noun} file {path} is not a file")
    digest = hashlib.sha1(str(path.resolve()).encode()).hexdigest()[:10]
    module_name = f"fedkd_file_{digest}_{path.stem}"
    spec = importlib.util.spec_from_file_location(module_name, path)
    module = importlib.util.module_from_spec(spec)
    # Registered before it runs: dataclasses and pickling look their module up here.
    sys.modules[module_name] = module
    try:
        spec.loader.exec_module(module)
    except (Exception, SystemExit) as exc:  # noqa: BLE001 - the user's broken file, in one line
        del sys.modules[module_name]
        raise FedkdError(f"{kind.noun} file {path} failed to import: {_one_line(exc)}") from None
    return module


def _import(module_name: str, kind: _Kind) -> ModuleType:
    try:
        return importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        missing = exc.name or ""
        if module_name == missing or module_name.startswith(missing + "."):
            raise FedkdError(f"{kind.noun} module {module_name!r} not found ({exc.msg}); "
                             "for a file, write path/to/file.py:Class") from None
        raise FedkdError(f"{kind.noun} module {module_name!r} failed to import: {_one_line(exc)}") from None
    except (Exception, SystemExit) as exc:  # noqa: BLE001
        raise FedkdError(f"{kind.noun} module {module_name!r} failed to import: {_one_line(exc)}") from None


def _target(name: str, kind: _Kind) -> str:
    """``where:attr`` for a registry name, an entry point, or a reference given directly."""
    known = registered(kind)
    if name in known:
        return known[name]
    if ":" in name:
        return name
    if name.endswith(".py"):
        raise FedkdError(f"{kind.noun} {name!r} names a file but no class; write {name}:ClassName")
    raise FedkdError(f"unknown {kind.noun} {name!r}; expected one of {sorted(known)}, "
                     "or module:Class, or path/to/file.py:Class")


def _candidates(module: ModuleType, base: type) -> list[str]:
    return sorted(n for n, v in vars(module).items()
                  if inspect.isclass(v) and issubclass(v, base) and v.__module__ == module.__name__)


def _load_class(name: str, kind: _Kind) -> tuple[ModuleType, type]:
    target = _target(name, kind)
    where, _, attr = target.rpartition(":")  # the last ':' splits: a folder name may hold one
    if not where or not attr:
        raise FedkdError(f"{kind.noun} {name!r} is incomplete; expected module:Class or path/to/file.py:Class")
    is_path = where.endswith(".py") or "/" in where
    if is_path and not where.endswith(".py"):
        raise FedkdError(f"{kind.noun} file {where} must be a Python file ending in .py")
    module = _load_file(Path(where).expanduser(), kind) if is_path else _import(where, kind)
    base = kind.base()
    obj: Any = module
    for part in attr.split("."):  # entry points may name Outer.Inner
        obj = getattr(obj, part, None)
    if obj is None:
        defined = _candidates(module, base)
        hint = f"; it defines {defined}" if defined else ""
        raise FedkdError(f"{where} has no {kind.noun} class {attr!r}{hint}")
    if not inspect.isclass(obj):
        raise FedkdError(f"{where}:{attr} is a {type(obj).__name__}, not a class; expected {kind.base_name}")
    if not issubclass(obj, base):
        raise FedkdError(f"{where}:{attr} is not {kind.base_name}")
    if inspect.isabstract(obj):
        missing = ", ".join(sorted(obj.__abstractmethods__))
        raise FedkdError(f"{where}:{attr} is abstract: it does not implement {missing}")
    return module, obj


def _description(module: ModuleType, cls: type) -> str:
    """The first line of the class's own docstring, else of its module's."""
    # The class's own docstring when the class is the module's (or its package's), not one it
    # re-exports (fedavg is Flower's FedAvg: its docstring is Flower's).
    mine = cls.__module__ == module.__name__ or cls.__module__.startswith(module.__name__ + ".")
    own = cls.__dict__.get("__doc__") if mine else None
    for doc in (own, module.__doc__):
        text = inspect.cleandoc(doc or "")
        if text:
            return text.splitlines()[0]
    return "(no description)"


def resolve_strategy(name: str) -> StrategyRef:
    module, cls = _load_class(name, STRATEGY)
    # The class says (``shares_weights``, fedkd.contract); else the older module flag; else a
    # Flower strategy shares weights.
    declared = [k.__dict__["shares_weights"] for k in cls.__mro__  # the contract's own default aside
                if "shares_weights" in k.__dict__ and k.__module__ != "fedkd.contract"]
    shares = declared[0] if declared else getattr(module, "SHARES_WEIGHTS", True)
    if not isinstance(shares, bool):
        raise FedkdError(f"{name}: SHARES_WEIGHTS must be True or False, got {shares!r}")
    return StrategyRef(name, cls, _description(module, cls), shares)


def resolve_allocator(name: str) -> AllocatorRef:
    module, cls = _load_class(name, ALLOCATOR)
    return AllocatorRef(name, cls, _description(module, cls))


def _accepted_keywords(cls: type) -> set[str] | None:
    """Keyword arguments ``cls(...)`` accepts, following ``**kwargs`` up to the parent that
    takes them by name; None when no parent can take them, so the class takes anything."""
    names: set[str] = set()
    forwarding = False
    for klass in cls.__mro__:
        if klass is object:
            return None if forwarding else names
        init = klass.__dict__.get("__init__")
        if init is None:
            continue
        try:
            params = inspect.signature(init).parameters.values()
        except (TypeError, ValueError):  # a C-level __init__ shows no signature: do not guess
            return None
        names |= {p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)} - {"self"}
        forwarding = any(p.kind is p.VAR_KEYWORD for p in params)
        if not forwarding:
            return names
    return names


def strategy_params(ref: StrategyRef, defaults: dict[str, Any], params: dict[str, Any]) -> dict[str, Any]:
    """Keyword arguments for the strategy: scenario defaults it accepts, then its own params."""
    accepted = _accepted_keywords(ref.cls)
    merged = {k: v for k, v in defaults.items() if accepted is None or k in accepted}
    merged.update(params)
    return merged


def check_params(ref: StrategyRef, params: dict[str, Any]) -> str | None:
    """None if ``ref.cls`` accepts ``params``, else what is wrong."""
    try:
        inspect.signature(ref.cls.__init__).bind(None, **params)
    except TypeError as exc:
        return f"{ref.name} does not accept these params: {exc}"
    accepted = _accepted_keywords(ref.cls)
    unknown = sorted(set(params) - accepted) if accepted is not None else []
    if unknown:
        return f"{ref.name} does not accept these params: {unknown}; it takes {sorted(accepted)}"
    return _type_problem(ref, params)


def _declared_types(cls: type) -> dict[str, Any]:
    """Each constructor parameter's annotation, the most derived class's winning."""
    hints: dict[str, Any] = {}
    for klass in reversed(cls.__mro__):
        init = klass.__dict__.get("__init__")
        if init is None or klass is object:
            continue
        try:
            hints.update(typing.get_type_hints(init))
        except Exception:  # noqa: BLE001 - unresolvable annotations (a third-party class): no check
            continue
    hints.pop("return", None)
    return hints


def _type_problem(ref: StrategyRef, params: dict[str, Any]) -> str | None:
    """The first param whose value does not fit its annotation (pydantic, strict: "yes" is
    no bool and 2.0 no int; an int is a float), or None."""
    hints = _declared_types(ref.cls)
    for name, value in params.items():
        if name not in hints:
            continue
        try:
            adapter = TypeAdapter(hints[name])
        except Exception:  # noqa: BLE001 - an annotation pydantic cannot check (a Callable, say)
            continue
        try:
            adapter.validate_python(value, strict=True)
        except ValidationError:
            expected = getattr(hints[name], "__name__", None) or str(hints[name]).replace("typing.", "")
            return f"{ref.name}: {name} expected {expected} (got {value!r})"
    return None
