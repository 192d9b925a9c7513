"""fedkd's built-in strategies, one file each.

The registry below lists them explicitly (no registration on import); the
value is ``module:Class``. Third-party packages add theirs through the
``fedkd.strategies`` entry-point group.
"""

BUILTIN: dict[str, str] = {
    "fedavg": "fedkd.strategies.fedavg:FedAvg",
    "fedprox": "fedkd.strategies.fedprox:FedProx",
    "fedavg_modal": "fedkd.strategies.fedavg_modal:FedAvgModal",
    "fedprox_modal": "fedkd.strategies.fedprox_modal:FedProxModal",
    "fedmd": "fedkd.strategies.fedmd:FedMD",
    "dsfl": "fedkd.strategies.dsfl:DSFL",
    "teacher_kd": "fedkd.strategies.teacher_kd:TeacherKD",
    "feddf": "fedkd.strategies.feddf:FedDF",
    "centralized": "fedkd.strategies.centralized:Centralized",
    "ra_cmkd": "fedkd.strategies.ra_cmkd:RACMKD",
    "ra_cmkd_targets": "fedkd.strategies.ra_cmkd:FogTargetsKD",
    "gossip_kd": "fedkd.strategies.gossip_kd:GossipKD",
    "fedgkt": "fedkd.strategies.fedgkt:FedGKT",
    "mutual_kd": "fedkd.strategies.mutual_kd:MutualKD",
    "fd": "fedkd.strategies.fd:FD",
    "fedproto": "fedkd.strategies.fedproto:FedProto",
}
