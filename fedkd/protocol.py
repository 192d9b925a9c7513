"""What fedkd adds to Flower messages, and how their bytes are counted.

The simulated grid adds records under the ``fedkd.`` prefix to each task
(which device it is for, the device's own state) and strips the ones the
client adds to its reply (the FLOPs it spent, its new state). Strategies never
see them, and they are not counted as simulated traffic: in a real
deployment the device knows who it is and keeps its own state.
"""
from __future__ import annotations

from collections import OrderedDict

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict

PREFIX = "fedkd."
TASK = "fedkd.task"  # ConfigRecord: device_id, round, seed
STATE = "fedkd.state"  # ArrayRecord: per-device state that travels with the task
COST = "fedkd.cost"  # MetricRecord: flops spent by the client
# ArrayRecord: the fog's model a logit task starts from. Real traffic, so no prefix.
FOG_MODEL = "fog-model"


def array_numpy(array: Array) -> np.ndarray:
    """``array.numpy()``, read in place when the data are the plain layout ``np.save``
    writes for a tensor (C order, the dtype's own byte order; both checked against the
    header's bytes). Flower's ``numpy()`` parses every array's header with ``ast``,
    which was a measurable share of fedkd's cost per task (benchmarks/overhead.py).
    Read-only: copy before writing to it."""
    dtype = np.dtype(array.dtype)
    count = int(np.prod(array.shape, dtype=np.int64))
    offset = len(array.data) - count * dtype.itemsize
    if array.stype == "numpy.ndarray" and not dtype.hasobject and offset > 0:
        header = bytes(array.data[:offset])
        if b"'fortran_order': False" in header and f"'descr': '{dtype.str}'".encode() in header:
            return np.frombuffer(array.data, dtype=dtype, count=count, offset=offset).reshape(array.shape)
    return array.numpy()


def torch_state_dict(record: ArrayRecord) -> OrderedDict[str, torch.Tensor]:
    """``record.to_torch_state_dict()`` through :func:`array_numpy`."""
    return OrderedDict((name, torch.from_numpy(array_numpy(array).copy())) for name, array in record.items())


def payload_bytes(content: RecordDict) -> int:
    """Bytes Flower would move for ``content``: its serialised objects, fedkd's own records excluded."""
    return sum(_object_bytes(record) for key, record in content.items() if not key.startswith(PREFIX))


def _object_bytes(obj) -> int:
    children = obj.children or {}
    return len(obj.deflate()) + sum(_object_bytes(child) for child in children.values())


def strategy_view(content: RecordDict) -> RecordDict:
    """``content`` without fedkd's records."""
    return RecordDict({k: v for k, v in content.items() if not k.startswith(PREFIX)})


def with_task(content: RecordDict, device_id: int, server_round: int, seed: int) -> RecordDict:
    # A new RecordDict per device: strategies send one content object to all devices.
    records = dict(content.items())
    records[TASK] = ConfigRecord({"device_id": device_id, "round": server_round, "seed": seed})
    return RecordDict(records)


def task_of(message: Message) -> ConfigRecord:
    if TASK not in message.content:
        raise ValueError("message carries no fedkd.task record; was it sent through the simulated grid?")
    return message.content[TASK]


def cost_record(flops: float) -> MetricRecord:
    return MetricRecord({"flops": float(flops)})


def reported_flops(content: RecordDict) -> float:
    cost = content.get(COST)
    return float(cost["flops"]) if cost is not None else 0.0
