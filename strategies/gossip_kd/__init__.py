"""Gossip KD: serverless distillation between neighbours on a device-to-device graph (Bistritz et al. 2020).

``strategy``: the simulation's side (who neighbours whom each round, who heard
what); ``device``: the device task; ``topology``: the device-to-device graphs.
"""
from .strategy import GossipKD, disagreement

__all__ = ["GossipKD", "disagreement"]
