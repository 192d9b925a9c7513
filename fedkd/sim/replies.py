"""Checks of a ClientApp's reply before the world times it and a strategy sees it.

A reply that would poison an aggregate or a model fails its task with reason
``invalid`` (the simulated grid turns it into an error reply), and the round
goes on without it:

- a non-finite number anywhere: in any ArrayRecord (the device's travelling
  state included), in any MetricRecord, in the FLOPs it reports (which must
  also be >= 0), in decoded logits;
- arrays under a key the task also sent that differ from what was sent: other
  array names, shapes or dtypes (a weight reply must fit the model it trains);
- a reply to a plain ``train`` task (Flower's weight exchange) that lacks an
  ArrayRecord the task carried;
- for a task that names ``public-indices`` (logit exchange), a payload that
  does not decode (:func:`fedkd.codecs.decode_any`) or is not one row of
  ``num_classes`` floating-point scores per public sample asked for.
"""
from __future__ import annotations

import math

import numpy as np
from flwr.app import Message, RecordDict

from ..codecs import decode_any
from ..protocol import COST, PREFIX, array_numpy


def reply_problem(task: Message, reply: Message, num_classes: int | None = None) -> str | None:
    """What is wrong with ``reply`` to ``task``, in a few words; None if nothing is."""
    try:
        return (_arrays_problem(task.content, reply.content, task.metadata.message_type)
                or _metrics_problem(reply.content) or _logits_problem(task.content, reply.content, num_classes))
    except Exception as exc:  # noqa: BLE001 - a reply so malformed that reading it fails is invalid too
        return f"unreadable reply ({type(exc).__name__}: {exc})"


def _arrays_problem(task: RecordDict, reply: RecordDict, message_type: str) -> str | None:
    sent = {k: v for k, v in task.array_records.items() if not k.startswith(PREFIX)}
    got = reply.array_records
    if message_type == "train":
        missing = sorted(set(sent) - set(got))
        if missing:
            return f"no ArrayRecord {missing[0]!r}, which the train task sent"
    for key, record in got.items():
        expected = sent.get(key)
        if expected is not None and list(record.keys()) != list(expected.keys()):
            return f"ArrayRecord {key!r} holds arrays {list(record.keys())[:4]}..., not the {len(expected)} sent"
        for name, array in record.items():
            if expected is not None:
                want = expected[name]
                if array.dtype != want.dtype:
                    return f"array {key}/{name} has dtype {array.dtype}, the task sent {want.dtype}"
                if tuple(array.shape) != tuple(want.shape):
                    return f"array {key}/{name} has shape {tuple(array.shape)}, the task sent {tuple(want.shape)}"
            values = array_numpy(array)
            if values.dtype.kind in "fc" and not np.isfinite(values).all():
                return f"non-finite values in array {key}/{name}"
    return None


def _metrics_problem(reply: RecordDict) -> str | None:
    for key, record in reply.metric_records.items():
        for name, value in record.items():
            values = value if isinstance(value, list) else [value]
            if not all(math.isfinite(v) for v in values):
                return f"non-finite metric {key}/{name}"
    cost = reply.metric_records.get(COST)
    if cost is not None and "flops" in cost and not float(cost["flops"]) >= 0:
        return f"negative FLOPs reported ({cost['flops']})"
    return None


def _logits_problem(task: RecordDict, reply: RecordDict, num_classes: int | None) -> str | None:
    asked = next((c["public-indices"] for k, c in task.config_records.items()
                  if not k.startswith(PREFIX) and "public-indices" in c), None)
    if asked is None:
        return None
    for key, record in reply.config_records.items():
        if key.startswith(PREFIX):
            continue
        for name, value in record.items():
            if not isinstance(value, bytes):
                continue
            try:
                logits = decode_any(value)
            except ValueError as exc:
                return f"{key}/{name} does not decode: {exc}"
            if logits.dtype.kind != "f":
                return f"logits {key}/{name} have dtype {logits.dtype}; expected floating point"
            want = (len(asked), num_classes if num_classes is not None else logits.shape[-1])
            if logits.ndim != 2 or logits.shape != want:
                return f"logits {key}/{name} have shape {logits.shape}; expected {want}"
            if not np.isfinite(logits).all():
                return f"non-finite logits in {key}/{name}"
    return None
