"""Distillation losses on tensors: a leaf module, so training code and the
distillation helpers both import it without importing each other."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def kd_loss(student_logits: torch.Tensor, target_probs: torch.Tensor, temperature: float) -> torch.Tensor:
    """Hinton et al.'s distillation loss: T^2 * KL(target || softmax(student / T))."""
    log_student = F.log_softmax(student_logits / temperature, dim=-1)
    return F.kl_div(log_student, target_probs, reduction="batchmean") * temperature**2
