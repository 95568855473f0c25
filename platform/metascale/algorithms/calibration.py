"""Expected calibration error (Guo et al. 2017, "On Calibration of Modern Neural Networks"): the confidence range
(0, 1] is cut into `bins` equal-width bins ((m-1)/M, m/M]; ECE = sum_m |B_m|/n |acc(B_m) - conf(B_m)|, which is
(1/n) sum_m |sum_{i in B_m} (correct_i - conf_i)|. Written without data-dependent shapes so that it runs under vmap.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

BINS = 15  # Guo et al.'s choice


def expected_calibration_error(probs: Tensor, y: Tensor, bins: int = BINS) -> Tensor:
    """ECE of predictive probabilities `probs` [n, classes] against integer labels `y` [n] (one set: one task)."""
    conf, pred = probs.max(-1)
    correct = (pred == y).to(probs.dtype)
    index = (conf * bins).ceil().long().clamp(1, bins) - 1  # bin m holds ((m-1)/M, m/M]
    gaps = F.one_hot(index, bins).to(probs.dtype).T @ (correct - conf)  # [bins]: sum of (correct - conf) per bin
    return gaps.abs().sum() / probs.shape[0]
