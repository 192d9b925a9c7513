"""FedAvg, modality-wise: each device moves only its own sensors' encoders and the head.

McMahan et al., "Communication-Efficient Learning of Deep Networks from
Decentralized Data", AISTATS 2017, https://arxiv.org/abs/1602.05629, with the
modality-wise aggregation of Ouyang et al., "Harmony: Heterogeneous Multi-Modal
Federated Learning through Disentangled Model Training", ACM MobiSys 2023,
https://doi.org/10.1145/3581791.3596844 (an encoder is averaged over the
devices that have its modality only).

The weight-sharing baseline made fair to devices that lack sensors. Plain
``fedavg`` sends every sampled device the whole multimodal model and a
sensor-only mote returns a camera encoder it never trained. Here, Flower's
``FedAvg`` samples the devices and builds the round's messages; then

1. ``configure_train`` learns each device's sensors from its registration
   (``grid.node_profiles``, fedkd's simulated grid) and sends it only the
   parameters it can train: ``encoders.<m>.*`` for each sensor ``m`` it has
   and every parameter outside ``encoders.`` (the shared classifier
   ``head.*``). fedkd's client builds the model from the encoders it is sent.
2. ``aggregate_train`` averages each parameter over the devices that returned
   it, weighted by their ``num-examples`` (Flower's ``aggregate_arrayrecords``
   applied to each group of parameters that the same devices returned); a
   parameter nobody returned this round keeps its global value.

Only Harmony's aggregation rule, on fedkd's one-stage multimodal model (a
missing modality masked in the fusion): not Harmony's two-stage system
(no separate fusion stage, no balance-aware resource allocation).

The global ``ArrayRecord`` always holds every encoder: the server scores it,
and it is what a checkpoint saves. Nothing else lasts beyond a round, so
``--resume`` needs no extra state. Federated evaluation (``fraction_evaluate``
> 0) is Flower's, unchanged: fedkd's evaluation task loads the whole model.
"""
from collections import defaultdict
from collections.abc import Iterable

from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.exception import InconsistentMessageReplies
from flwr.serverapp.strategy import FedAvg
from flwr.serverapp.strategy.strategy_utils import aggregate_arrayrecords, validate_message_reply_consistency

SHARES_WEIGHTS = True  # one shared multimodal model; the server keeps every encoder

ENCODERS = "encoders."  # fedkd.models.multimodal.MultimodalNet: encoders.<modality>.*, head.*


def modality_of(name: str) -> str | None:
    """The modality whose encoder holds parameter ``name``; None for shared ones (the head)."""
    if not name.startswith(ENCODERS):
        return None
    return name[len(ENCODERS):].split(".", 1)[0]


def modality_slice(arrays: ArrayRecord, modalities: Iterable[str]) -> ArrayRecord:
    """The parameters a device with ``modalities`` trains: its encoders and the shared ones.

    The Arrays are shared with ``arrays``, not copied, and keep their order."""
    keep = set(modalities)
    return ArrayRecord({name: array for name, array in arrays.items()
                        if modality_of(name) is None or modality_of(name) in keep})


def aggregate_per_parameter(global_arrays: ArrayRecord, replies: list[RecordDict],
                            weighted_by_key: str) -> ArrayRecord:
    """Each parameter's weighted mean over the replies that hold it; the global value where none does.

    Parameters returned by the same replies (an encoder, the head) are averaged
    together by Flower's ``aggregate_arrayrecords``, which normalises the
    weights over those replies."""
    holders: dict[str, list[int]] = defaultdict(list)  # parameter -> indices of the replies holding it
    for i, content in enumerate(replies):
        for name in next(iter(content.array_records.values())).keys():
            holders[name].append(i)
    unknown = sorted(set(holders) - set(global_arrays.keys()))
    if unknown:
        raise InconsistentMessageReplies(reason=f"replies hold parameters the global model lacks: {unknown[:4]}")
    groups: dict[tuple[int, ...], list[str]] = defaultdict(list)
    for name, indices in holders.items():
        groups[tuple(indices)].append(name)
    averaged = {}
    for indices, names in groups.items():
        subset = [RecordDict({"arrays": ArrayRecord({n: next(iter(replies[i].array_records.values()))[n]
                                                     for n in names}),
                              "metrics": next(iter(replies[i].metric_records.values()))}) for i in indices]
        averaged.update(aggregate_arrayrecords(subset, weighted_by_key).items())
    return ArrayRecord({name: averaged.get(name, array) for name, array in global_arrays.items()})


class FedAvgModal(FedAvg):
    """FedAvg, modality-wise: devices move only their sensors' encoders and the head, each averaged by who has it."""

    _global: ArrayRecord | None = None  # this round's global arrays, for parameters nobody returns

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        messages = list(super().configure_train(server_round, arrays, config, grid))  # Flower's sampling
        self._global = arrays
        if not messages:
            return messages
        if not hasattr(grid, "node_profiles"):
            raise RuntimeError(f"{type(self).__name__} needs each device's sensors: run it on fedkd's "
                               "simulated grid (grid.node_profiles)")
        profiles = grid.node_profiles([m.metadata.dst_node_id for m in messages])
        by_sensors: dict[tuple[str, ...], list[int]] = defaultdict(list)
        for message in messages:
            node = message.metadata.dst_node_id
            by_sensors[tuple(profiles[node].modalities)].append(node)
        content, message_type = messages[0].content, messages[0].metadata.message_type
        sliced = []
        # One content object per sensor set (the grid sizes each once), built by Flower's helper.
        for sensors, nodes in sorted(by_sensors.items()):
            record = RecordDict({self.arrayrecord_key: modality_slice(arrays, sensors),
                                 self.configrecord_key: content[self.configrecord_key]})
            sliced.extend(self._construct_messages(record, nodes, message_type))
        order = {m.metadata.dst_node_id: i for i, m in enumerate(messages)}  # Flower's sampled order
        return sorted(sliced, key=lambda m: order[m.metadata.dst_node_id])

    def aggregate_train(self, server_round: int, replies: Iterable[Message]
                        ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        # Replies differ in their keys by design: Flower's check runs below without the key test.
        valid, _ = self._check_and_log_replies(replies, is_train=True, validate=False)
        if not valid:
            return None, None
        contents = [reply.content for reply in valid]
        validate_message_reply_consistency(contents, self.weighted_by_key, check_arrayrecord=False)
        if any(len(content.array_records) != 1 for content in contents):
            raise InconsistentMessageReplies(reason="Expected exactly one ArrayRecord in replies.")
        if self._global is None:
            raise RuntimeError("aggregate_train before configure_train: no global model to update")
        arrays = aggregate_per_parameter(self._global, contents, self.weighted_by_key)
        return arrays, self.train_metrics_aggr_fn(contents, self.weighted_by_key)


__all__ = ["FedAvgModal", "SHARES_WEIGHTS", "aggregate_per_parameter", "modality_slice"]
