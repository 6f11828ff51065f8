"""Adaptive clipping (Andrew et al. 2021, "Differentially Private Learning with Adaptive
Clipping"): the clip norm follows a target quantile of the phones' update norms.

Each phone reports whether its update fitted under this round's clip, as b - 1/2 in
{-1/2, +1/2} (sensitivity 1/2 whether a phone is added, removed or replaced by one that sends
nothing). The server releases the noisy fraction b~ = (sum (b_i - 1/2) + N(0, s^2)) / m + 1/2
and moves the clip geometrically: C <- C exp(-lr (b~ - quantile)). The update sum and the
count together are one Gaussian mechanism of noise multiplier sigma when the update's own noise
multiplier is (sigma^-2 - (2 s)^-2)^-1/2 (their Theorem 1), so the accountant is unchanged: the
count's privacy is paid for with a little more noise on the update.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from fedmilm.privacy.randomness import PrivateRandom


def update_noise_multiplier(total: float, count_noise: float) -> float:
    """The update's noise multiplier that leaves room for the count within `total`;
    `ValueError` when the count's noise is too small to fit (2 s <= sigma)."""
    room = total ** -2 - (2 * count_noise) ** -2
    if room <= 0:
        raise ValueError(f"the count noise {count_noise:g} must exceed half the noise "
                         f"multiplier ({total / 2:g}) to fit inside it")
    return room ** -0.5


def default_count_noise(expected: float, total: float) -> float:
    """m / 20 as Andrew et al. use, but never below sigma (the update noise then grows by at
    most 1 / sqrt(3/4) = 1.155x)."""
    return max(expected / 20, total)


@dataclass
class QuantileClip:
    """The clip estimate and its geometric update from a noisy fraction of unclipped updates."""

    clip: float
    quantile: float
    lr: float
    count_noise: float
    expected: float

    def update(self, votes: float, random: PrivateRandom) -> float:
        """Take a round's sum of (b_i - 1/2) votes; returns the released noisy fraction."""
        noisy = float(random.normal((1,), self.count_noise, dtype=torch.float64))
        fraction = (votes + noisy) / self.expected + 0.5
        self.clip *= math.exp(-self.lr * (fraction - self.quantile))
        return fraction
