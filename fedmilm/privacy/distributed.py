"""Distributed DP under SecAgg+: every phone adds its share of integer Skellam noise before
masking, so the server never sees a sum with less noise than its accountant charges.

The grid. Flower's SecAgg+ clips a coordinate to [-R, R] and rounds (x + R) Q / (2R)
stochastically to an integer. With R and Q powers of two the step 2R/Q is one too, and a value
j * step (|j| <= Q/2 <= 2^23: exact in float32) passes Flower's quantisation unchanged: the
phone's own unbiased rounding (from its CSPRNG) and its integer noise are what gets summed.

Sensitivity, in grid units. A phone clips its update to C less the rounding room
(`upload_clip_norm`), so after rounding its norm is at most C: Delta2 = C / step, and for an
integer vector Delta1 <= min(sqrt(d) Delta2, Delta2^2). Neighbours differ in one phone's update
(zero-out): the server knows who took part anyway, what it must not learn is what they sent.

Accounting (Agarwal, Kairouz & Liu 2021, "The Skellam Mechanism for Differentially Private
Federated Learning", Cor. 3.6): Skellam noise of variance mu per coordinate is, for integer
alpha > 1, (alpha, eps)-RDP with
    eps(alpha) <= alpha Delta2^2 / (2 mu) + min(((2 alpha - 1) Delta2^2 + 6 Delta1) / (4 mu^2),
                                                 3 Delta1 / (2 mu)).
The server unmasks only when at least `floor` phones' vectors arrived (`server/secure.py`), so
mu >= floor x one phone's share in every round it sees; a phone's rounds compose over its
participations (bounded by DP-FTRL's separation and cap).

Flower's clip to [-R, R] after the noise is a per-phone function the sum does not capture; the
chance that it touches any coordinate of any phone in a round with the protected phone is
bounded by Chernoff on the Skellam tail, p, and the guarantee is (eps, delta/2 + (1 + e^eps) p)
with eps from RDP at delta/2 (the standard argument: outside that event the server's view is a
function of the noised sum).
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, replace

import torch
from opacus.accountants.analysis.rdp import get_privacy_spent

from fedmilm.adapters.space import State
from fedmilm.config.schema import FedMilmConfig
from fedmilm.privacy.calibrate import EDGE_ORDER
from fedmilm.privacy.discrete_noise import skellam
from fedmilm.privacy.randomness import PrivateRandom

ORDERS = list(range(2, 257)) + [320, 512, 1024, 4096]  # integer: the bound holds for them
CLIP_EVENT_SHARE = 1e-6  # validation wants the clip event below this share of delta


def skellam_rdp(order: int, *, l1: float, l2: float, variance: float) -> float:
    """The Skellam mechanism's RDP bound (module docstring) at integer `order` > 1."""
    second = min(((2 * order - 1) * l2**2 + 6 * l1) / (4 * variance**2), 3 * l1 / (2 * variance))
    return order * l2**2 / (2 * variance) + second


@dataclass(frozen=True)
class DistributedNoise:
    """The phones' Skellam noise: `noise_multiplier` x clip is the std of the sum of
    `expected` phones' shares; the server unmasks only sums of at least `floor` shares."""

    noise_multiplier: float
    clip_norm: float
    expected: int
    floor: int
    clip_range: float  # SecAgg+'s R
    quant_range: int   # SecAgg+'s Q
    num_values: int    # coordinates of the global adapter

    @property
    def step(self) -> float:
        return 2 * self.clip_range / self.quant_range

    @property
    def share_variance(self) -> float:
        """One phone's noise variance per coordinate, in grid units squared."""
        return (self.noise_multiplier * self.clip_norm / self.step) ** 2 / self.expected

    @property
    def l2(self) -> float:
        return self.clip_norm / self.step

    @property
    def l1(self) -> float:
        return min(math.sqrt(self.num_values) * self.l2, self.l2**2)

    def rdp(self, order: int, shares: int) -> float:
        """RDP at integer `order` of one round whose sum carries `shares` phones' noise."""
        return skellam_rdp(order, l1=self.l1, l2=self.l2, variance=shares * self.share_variance)

    def log_clip_probability(self, participations: int) -> float:
        """log of a bound on the chance that Flower clips any noised coordinate of any phone
        in the rounds one phone takes part in (each coordinate lies within +-C before noise)."""
        margin = (self.clip_range - self.clip_norm) / self.step
        if margin <= 0:
            return 0.0
        v = self.share_variance
        s = math.asinh(margin / v)  # the Chernoff optimum for the Skellam MGF exp(v(cosh s - 1))
        log_tail = v * 2 * math.sinh(s / 2) ** 2 - s * margin
        events = 2 * self.num_values * self.expected * max(participations, 1)
        return min(0.0, math.log(events) + log_tail)

    def epsilon(self, participations: int, delta: float) -> float:
        """Epsilon against the server after `participations` rounds of one phone."""
        if participations == 0:
            return 0.0
        if self.noise_multiplier == 0:
            return math.inf
        rdp = [participations * self.rdp(order, self.floor) for order in ORDERS]
        with warnings.catch_warnings():  # an edge order only means a looser (safe) bound
            warnings.filterwarnings("ignore", message=EDGE_ORDER)
            eps, _ = get_privacy_spent(orders=ORDERS, rdp=rdp, delta=delta / 2)
        eps = float(eps)
        log_slack = math.log1p(math.exp(min(eps, 700.0))) + self.log_clip_probability(
            participations)
        return eps if log_slack <= math.log(delta / 2) else math.inf

    def range_problem(self, participations: int, delta: float) -> str | None:
        """Why SecAgg+'s range R is too narrow for the phones' noise (None: it is wide enough
        that Flower clips a noised value with chance below CLIP_EVENT_SHARE x delta)."""
        limit = math.log(CLIP_EVENT_SHARE * delta)
        if self.log_clip_probability(participations) <= limit:
            return None
        wide = self.clip_range
        while replace(self, clip_range=wide).log_clip_probability(participations) > limit:
            wide *= 2
        return (f"aggregation.secagg_clip_range={self.clip_range:g} is too narrow for the "
                f"phones' noise (std {self.phone_std():.3g} per phone): SecAgg+ would clip "
                f"noised values; use {wide:g}")

    def phone_std(self) -> float:
        """One phone's noise std per coordinate, in the update's units."""
        return math.sqrt(self.share_variance) * self.step


def noisy_share(update: State, noise: DistributedNoise, random: PrivateRandom) -> State:
    """`update` rounded onto the grid without bias, plus this phone's Skellam share, as float32
    multiples of the step (which Flower's quantisation then carries exactly)."""
    shared = {}
    for key in sorted(update):
        scaled = update[key].to(torch.float64) / noise.step
        index = random.round_unbiased(scaled) + skellam(tuple(scaled.shape),
                                                        noise.share_variance, random)
        shared[key] = (index.to(torch.float64) * noise.step).to(torch.float32)
    return shared


def distributed_noise_for(cfg: FedMilmConfig, num_values: int) -> DistributedNoise | None:
    """The run's distributed noise over a global adapter of `num_values` numbers (None: off).
    The floor is `federation.min_replies`: the server unmasks no sum of fewer shares."""
    user = cfg.privacy.user
    if not cfg.privacy.user_level or user.distributed_noise is None:
        return None
    agg = cfg.aggregation
    return DistributedNoise(noise_multiplier=user.distributed_noise, clip_norm=user.clip_norm,
                            expected=cfg.federation.clients_per_round,
                            floor=cfg.federation.min_replies, clip_range=agg.secagg_clip_range,
                            quant_range=agg.secagg_quant_range, num_values=num_values)
