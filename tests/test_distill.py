"""Aggregators and losses of knowledge distillation, with numbers worked by hand."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from fedkd.distill import entropy_reduction, kd_loss, mean_logits, mean_probabilities


def logits_of(probs) -> np.ndarray:
    return np.log(np.asarray(probs, dtype=np.float64))


def test_mean_logits_is_fedmds_consensus():
    # Two devices, one sample: logits [1, 3] and [3, 1]; equal weights -> [2, 2].
    out = mean_logits(np.array([[[1.0, 3.0]], [[3.0, 1.0]]]), np.array([1.0, 1.0]))
    assert out.tolist() == [[2.0, 2.0]]


def test_weighted_mean_of_probabilities():
    # Probabilities [0.8, 0.2] (weight 3) and [0.4, 0.6] (weight 1): [0.7, 0.3].
    out = mean_probabilities(np.stack([logits_of([[0.8, 0.2]]), logits_of([[0.4, 0.6]])]), np.array([3.0, 1.0]))
    assert out == pytest.approx(np.array([[0.7, 0.3]]))


def test_entropy_reduction_sharpens_the_average():
    # Average of [0.8, 0.2] and [0.4, 0.6] is [0.6, 0.4]; ERA at T = 0.1 is
    # softmax([6, 4]) = [1 / (1 + e^-2), e^-2 / (1 + e^-2)] = [0.8808, 0.1192].
    out = entropy_reduction(np.stack([logits_of([[0.8, 0.2]]), logits_of([[0.4, 0.6]])]), np.ones(2), 0.1)
    assert out[0, 0] == pytest.approx(1 / (1 + math.exp(-2)))
    assert out.sum() == pytest.approx(1.0)


def test_kd_loss_is_zero_when_the_student_matches_and_positive_otherwise():
    target = torch.tensor([[0.7, 0.3]])
    assert float(kd_loss(torch.log(target), target, 1.0)) == pytest.approx(0.0, abs=1e-7)
    # KL([0.7, 0.3] || [0.5, 0.5]) = 0.7 ln 1.4 + 0.3 ln 0.6 = 0.08228; times T^2 = 4 at T = 2,
    # where the student's logits [0, 0] give [0.5, 0.5] at any T.
    assert float(kd_loss(torch.zeros(1, 2), target, 2.0)) == pytest.approx(4 * (0.7 * math.log(1.4) + 0.3 * math.log(0.6)), rel=1e-5)
