"""fedkd's built-in strategies, one file each.

The registry below lists them explicitly (no registration on import); the
value is ``module:Class``. Third-party packages add theirs through the
``fedkd.strategies`` entry-point group.
"""

BUILTIN: dict[str, str] = {
    "fedavg": "strategies.fedavg:FedAvg",
    "fedprox": "strategies.fedprox:FedProx",
}
