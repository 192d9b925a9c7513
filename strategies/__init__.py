"""fedkd's built-in strategies, one file each.

The registry below lists them explicitly (no registration on import); the
value is ``module:Class``. Third-party packages add theirs through the
``fedkd.strategies`` entry-point group.
"""

BUILTIN: dict[str, str] = {
    "fedavg": "strategies.fedavg:FedAvg",
    "fedprox": "strategies.fedprox:FedProx",
    "fedavg_modal": "strategies.fedavg_modal:FedAvgModal",
    "fedprox_modal": "strategies.fedprox_modal:FedProxModal",
    "fedmd": "strategies.fedmd:FedMD",
    "dsfl": "strategies.dsfl:DSFL",
    "teacher_kd": "strategies.teacher_kd:TeacherKD",
    "feddf": "strategies.feddf:FedDF",
    "centralized": "strategies.centralized:Centralized",
    "ra_cmkd": "strategies.ra_cmkd:RACMKD",
    "gossip_kd": "strategies.gossip_kd:GossipKD",
}
