"""ra_cmkd: resource-aware cross-modal knowledge distillation through fog nodes.

``strategy``: the two designs (:class:`RACMKD` with fog models, and the first,
:class:`FogTargetsKD`, fogs keeping targets only); ``fog``: the fogs' cross-modal
ensembles; ``fog_models``: the models each fog distills, aligns and serves;
``alignment``: cross-modal alignment of their encoders. The device half is the
logit-exchange task (``fedkd.logit_exchange.logits_task``).
"""
from .strategy import RACMKD, FogTargetsKD

__all__ = ["FogTargetsKD", "RACMKD"]
