"""Execution backends: the same ServerApp and ClientApp, run two ways.

- ``inprocess``: fedkd's own ``Grid`` calls the ClientApp in this thread.
- ``processes``: the same grid, each round's ClientApp calls spread over
  local worker processes (:mod:`fedkd.runtime.processes`).
- ``ray``: Flower's simulation engine (``flwr.simulation.run_simulation``),
  on this machine or, given an address, on an existing Ray cluster.
"""
from __future__ import annotations

import logging
import os
import socket

from flwr.clientapp import ClientApp
from flwr.serverapp import ServerApp

from ..errors import FedkdError
from ..scenario import BackendSpec, ray_head
from .inprocess import run_inprocess


def default_executors() -> int:
    return max(1, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1)


def run_backend(spec: BackendSpec, server_app: ServerApp, client_app: ClientApp) -> None:
    if spec.kind == "inprocess":
        run_inprocess(server_app, client_app, executors=1)
    elif spec.kind == "processes":
        from .processes import run_processes

        run_processes(server_app, client_app, workers=spec.workers or default_executors())
    else:
        run_ray(spec, server_app, client_app)


def ray_address_problem(address: str | None, timeout_s: float = 5.0) -> str | None:
    """Why nothing can join a Ray cluster at ``address`` (``HOST:PORT`` or ``ray://HOST:PORT``;
    its form is checked with the scenario), or None if something listens there. ``auto``,
    ``local`` and None are Ray's to resolve. Ray itself keeps retrying an address where nothing
    listens for minutes, which would look like a hang."""
    if address is None or address in ("auto", "local") or (head := ray_head(address)) is None:
        return None  # Ray's to resolve, or refused by the scenario's own check
    host, port = head
    try:
        socket.create_connection((host, port), timeout=timeout_s).close()
    except OSError as exc:
        reason = (f"no answer within {timeout_s:g} s" if isinstance(exc, TimeoutError)
                  else (exc.strerror or type(exc).__name__).lower())
        return (f"{address}: no Ray head answers there ({reason}); start one with "
                f"`ray start --head --port={port}`, or drop address to start Ray here")
    return None


def check_ray_address(address: str | None) -> None:
    """A FedkdError (one line) if :func:`ray_address_problem` finds one."""
    if (problem := ray_address_problem(address)) is not None:
        raise FedkdError(f"backend.address {problem}")


def run_ray(spec: BackendSpec, server_app: ServerApp, client_app: ClientApp) -> None:
    check_ray_address(spec.address)
    try:
        import ray  # noqa: F401
        from flwr.simulation import run_simulation
    except ImportError:
        raise FedkdError('the ray backend needs Ray: pip install "flwr[simulation]"') from None
    # Ray warns about a future change of GPU env handling on every start; fedkd asks for no GPUs.
    os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")
    executors = spec.executors or default_executors()
    init_args = {"address": spec.address} if spec.address else {"num_cpus": executors}
    init_args["logging_level"] = logging.ERROR
    init_args["log_to_driver"] = False
    run_simulation(
        server_app=server_app, client_app=client_app, num_supernodes=executors,
        backend_config={"client_resources": {"num_cpus": 1, "num_gpus": 0.0}, "init_args": init_args},
    )
