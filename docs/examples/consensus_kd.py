"""Consensus distillation: devices keep their own models and learn from the crowd's predictions.

After FedMD (Li & Wang, "FedMD: Heterogenous Federated Learning via Model
Distillation", 2019, https://arxiv.org/abs/1910.03581), cut to its loop: each
round the server names public samples; each device digests last round's
consensus on the samples it names, trains on its own shard, and sends its
logits on the new ones; the consensus is their mean probability.
"""
import numpy as np
from flwr.app import ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp.strategy import Strategy

from fedkd.codecs import decode_any, get_codec
from fedkd.contract import DeviceCall, FedkdStrategy, StrategyEnv
from fedkd.device_models import device_model, model_key, pack
from fedkd.distill import distill_on, softmax
from fedkd.seeding import rng_for
from fedkd.training import predict_logits, train_local

TASK = "train.consensus"  # the message type of the device half below


def consensus_task(call: DeviceCall) -> Message:
    """The device half: digest the consensus, train on the shard, predict the asked samples."""
    device, config, training = call.device, call.config(), call.scenario.training
    model = device_model(call.ctx, call.device_id, device.model_tier, device.modalities, call.state)
    public = call.ctx.dataset.split("public")
    steps = dict(batch_size=training.batch_size, learning_rate=training.learning_rate)
    digested = 0
    if "consensus" in config:
        known = np.asarray(config["known"], dtype=np.int64)
        distill_on(model, public.subset(known), device.modalities, decode_any(bytes(config["consensus"])),
                   epochs=1, temperature=1.0, seed=call.seed("digest", call.server_round, call.device_id), **steps)
        digested = len(known)
    outcome = train_local(model, device.data, device.modalities, epochs=training.local_epochs,
                          seed=call.seed("train", call.server_round, call.device_id), **steps)
    asked = public.subset(np.asarray(config["asked"], dtype=np.int64))
    logits = predict_logits(model, asked, device.modalities).numpy()
    flops = (call.ctx.train_flops_per_sample(device.model_tier, device.modalities)
             * (digested + outcome.num_examples * training.local_epochs)
             + call.ctx.forward_flops_per_sample(device.model_tier, device.modalities) * len(asked))
    key = model_key(device.model_tier, device.modalities)
    return call.reply({"logits": ConfigRecord({"payload": get_codec("fp16").encode(logits)}),
                       "metrics": MetricRecord({"num-examples": outcome.num_examples})},
                      flops, state=pack(call.state, key, model.state_dict()))


class ConsensusKD(FedkdStrategy, Strategy):
    """Devices keep their own models and distill the mean of everyone's predictions."""

    shares_weights = False  # any mix of model sizes and sensors
    device_tasks = {TASK: consensus_task}

    def __init__(self, devices_per_round: int = 10, public_batch: int = 128):
        self.devices_per_round, self.public_batch = devices_per_round, public_batch
        self.consensus, self.known = None, None  # last round's mean probabilities, and on which samples

    def fedkd_setup(self, env: StrategyEnv) -> None:
        super().fedkd_setup(env)
        self.public = env.public  # the shared public set's size, classes and the run's seed

    def configure_train(self, server_round, arrays, config, grid):
        rng = rng_for(self.public.seed, "consensus", server_round)  # the same draws on resume
        online = sorted(grid.get_node_ids())
        chosen = rng.choice(online, min(self.devices_per_round, len(online)), replace=False)
        self.asked = np.sort(rng.choice(self.public.size, min(self.public_batch, self.public.size), replace=False))
        task = ConfigRecord({"asked": self.asked.tolist()})
        if self.consensus is not None:
            task["consensus"] = get_codec("fp16").encode(self.consensus.astype(np.float32))
            task["known"] = self.known.tolist()
        return [Message(RecordDict({"config": task}), int(d), TASK) for d in sorted(chosen)]

    def aggregate_train(self, server_round, replies):
        logits = [decode_any(bytes(r.content["logits"]["payload"])) for r in replies if not r.has_error()]
        if logits:
            self.consensus, self.known = softmax(np.stack(logits).astype(np.float64), 1.0).mean(0), self.asked
        return None, MetricRecord({"devices": len(logits)})

    def configure_evaluate(self, server_round, arrays, config, grid):
        return []  # fedkd scores the devices' own models itself

    def aggregate_evaluate(self, server_round, replies):
        return None

    def summary(self):
        pass

    def fedkd_state(self):
        return {"consensus": self.consensus, "known": self.known}

    def fedkd_restore(self, state):
        self.consensus, self.known = state["consensus"], state["known"]
