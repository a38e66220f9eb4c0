"""Memorization score R and the paper's levels.

R is the share of the protocol's outputs (templates x samples) that contain the object. Level 0
is R = 0; level i (1-4) covers ((i-1)/4, i/4].
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

NUM_LEVELS = 5
_EPS = 1e-9  # R within this of a threshold counts as on it (R from floats: 0.25 may be 0.25000000000000006)


def level(r: float) -> int:
    """The paper's level of a memorization score R in [0, 1]."""
    if not 0.0 <= r <= 1.0 + _EPS:
        raise ValueError(f"R must be in [0, 1], got {r}")
    if r <= 0.0:
        return 0
    top = NUM_LEVELS - 1
    return min(top, max(1, math.ceil(top * r - _EPS)))


def no_hit_probability(template_probs: Sequence[float], samples_per_template: int) -> float:
    """Probability that the sampling protocol, with hit probability p_j per sample of template j,
    finds no hit in all its `samples_per_template` x templates samples."""
    p = np.clip(np.asarray(template_probs, np.float64), 0.0, 1.0)
    with np.errstate(divide="ignore"):  # p = 1: log 0 = -inf, no chance of a miss
        return float(np.exp(samples_per_template * np.log1p(-p).sum()))


def expected_level(template_probs: Sequence[float], samples_per_template: int) -> int:
    """The level the sampling protocol most likely gives when template j hits with probability p_j.

    Levels 1-4 follow the expected score R = mean_j p_j. Level 0 is R = 0 in the protocol, which a
    probability never is: here it is the facts whose samples most likely (probability >= 1/2)
    contain no hit at all, i.e. roughly R < ln 2 / (templates x samples).
    """
    if no_hit_probability(template_probs, samples_per_template) >= 0.5:
        return 0
    return max(1, level(float(np.mean(template_probs))))
