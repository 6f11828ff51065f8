"""Exact (epsilon, delta) of a Gaussian mechanism, for accountants whose whole history is one.

A Gaussian mechanism of sensitivity 1 and noise std 1/mu is mu-GDP (Dong, Roth & Su 2019), and
any adaptive composition of Gaussian mechanisms with mu_i is mu-GDP with mu^2 = sum mu_i^2. Its
privacy profile is exact (Balle & Wang 2018, Theorem 8):
delta(epsilon) = Phi(-epsilon/mu + mu/2) - e^epsilon Phi(-epsilon/mu - mu/2).
DP-FTRL's tree aggregation is such a composition, so its epsilon needs no RDP slack; the
same mu also gives the rho-zCDP Gboard reports (rho = mu^2 / 2).
"""

from __future__ import annotations

import math

from scipy.special import log_ndtr

_BISECTIONS = 200


def gaussian_delta(mu: float, epsilon: float) -> float:
    """The smallest delta of a mu-GDP mechanism at `epsilon`."""
    if mu <= 0:
        return 0.0
    if math.isinf(mu):
        return 1.0
    log_first = log_ndtr(-epsilon / mu + mu / 2)
    # e^eps Phi(-eps/mu - mu/2) <= Phi(-eps/mu + mu/2) holds exactly; at mu ~ 1e9 the sum below
    # cancels two numbers near 1e18 and rounding alone could push it past the first (or
    # overflow exp), so it is capped there
    log_second = min(epsilon + log_ndtr(-epsilon / mu - mu / 2), log_first)
    return max(0.0, -math.exp(log_first) * math.expm1(log_second - log_first))


def gaussian_epsilon(mu: float, delta: float) -> float:
    """The smallest epsilon at which a mu-GDP mechanism is (epsilon, delta)-DP."""
    if not 0 < delta < 1:
        raise ValueError(f"delta must be in (0, 1), not {delta}")
    if gaussian_delta(mu, 0.0) <= delta:
        return 0.0
    if math.isinf(mu):
        return math.inf
    low, high = 0.0, 1.0
    while gaussian_delta(mu, high) > delta:  # delta(epsilon) falls as epsilon grows
        low, high = high, 2 * high
    for _ in range(_BISECTIONS):
        middle = (low + high) / 2
        if gaussian_delta(mu, middle) > delta:
            low = middle
        else:
            high = middle
    return high


def gaussian_mu_for(epsilon: float, delta: float) -> float:
    """The largest mu whose mechanism is (epsilon, delta)-DP (delta grows with mu)."""
    if epsilon < 0 or not 0 < delta < 1:
        raise ValueError(f"need epsilon >= 0 and delta in (0, 1), not {epsilon}, {delta}")
    low, high = 0.0, 1.0
    while gaussian_delta(high, epsilon) <= delta:
        low, high = high, 2 * high
    for _ in range(_BISECTIONS):
        middle = (low + high) / 2
        if gaussian_delta(middle, epsilon) <= delta:
            low = middle
        else:
            high = middle
    return low
