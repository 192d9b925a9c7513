"""Model zoo: one encoder family per modality kind, at three size tiers."""
from .multimodal import TIERS, MultimodalNet, build_model
from .measure import ModelCost, measure_cost

__all__ = ["TIERS", "MultimodalNet", "build_model", "ModelCost", "measure_cost"]
