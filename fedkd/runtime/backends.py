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

from flwr.clientapp import ClientApp
from flwr.serverapp import ServerApp

from ..errors import FedkdError
from ..scenario import BackendSpec
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


def run_ray(spec: BackendSpec, server_app: ServerApp, client_app: ClientApp) -> None:
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
