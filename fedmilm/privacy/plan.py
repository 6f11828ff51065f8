"""What user-level DP-FedAvg will do to the adapter, before a run spends hours finding out.

DP-FedAvg releases (sum of clipped updates + N(0, (sigma C)^2 I)) / m, with m the expected
cohort. Each of the d coordinates of the global part then carries noise of std sigma C / m,
the noise vector has norm about sigma C sqrt(d) / m, and the mean of the clipped updates has
norm at most C (exactly C only when every phone moves the same way). So
sigma sqrt(d) / m is a lower bound on the noise-to-signal norm ratio of a round's step: above
1 the step is mostly noise.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

from fedmilm.privacy.accountant import Accountant
from fedmilm.privacy.calibrate import LARGEST_ORDER, calibrated_noise


@dataclass(frozen=True)
class UserLevelPlan:
    """One DP-FedAvg setting and what it costs."""

    population: int
    cohort: int                 # expected phones per round (q N)
    rounds: int
    delta: float
    noise_multiplier: float
    epsilon: float              # after all rounds, from the accountant
    coordinates: int            # numbers in the global part of the adapter

    @property
    def sample_rate(self) -> float:
        return self.cohort / self.population

    @property
    def noise_std_over_clip(self) -> float:
        """Per-coordinate noise std of the released mean, in units of the clip norm."""
        return self.noise_multiplier / self.cohort

    @property
    def noise_to_signal(self) -> float:
        """Noise norm over the largest possible signal norm (C): at least this much noise."""
        return self.noise_multiplier * math.sqrt(self.coordinates) / self.cohort


def plan_user_level(*, population: int, cohort: int, rounds: int, delta: float,
                    coordinates: int, accountant: str, target_epsilon: float | None = None,
                    noise_multiplier: float | None = None) -> UserLevelPlan:
    """The plan for a fixed noise multiplier, or for the one that meets `target_epsilon`
    (`ValueError` when none does)."""
    rate = cohort / population
    if noise_multiplier is None:
        if target_epsilon is None:
            raise ValueError("give a noise multiplier or a target epsilon")
        noise_multiplier = calibrated_noise(target_epsilon, delta=delta, sample_rate=rate,
                                            steps=rounds, accountant=accountant)
    epsilon = Accountant(accountant).epsilon_after(delta, noise_multiplier=noise_multiplier,
                                                   sample_rate=rate, num_steps=rounds)
    return UserLevelPlan(population=population, cohort=cohort, rounds=rounds, delta=delta,
                         noise_multiplier=noise_multiplier, epsilon=epsilon,
                         coordinates=coordinates)


def smallest_useful_cohort(plan: UserLevelPlan, *, target_epsilon: float, accountant: str,
                           max_ratio: float = 1.0) -> int | None:
    """The smallest expected cohort whose step is not swamped (noise-to-signal at most
    `max_ratio`) at the same population, rounds, delta and epsilon; None when even the whole
    population is not enough.

    A cohort m is useful exactly when the largest noise that keeps the ratio in bounds,
    sigma_max = max_ratio m / sqrt(d), still meets the target (epsilon falls as sigma grows):
    one accountant evaluation per m, no calibration. Bisection: larger cohorts only help."""
    def useful(cohort: int) -> bool:
        sigma = max_ratio * cohort / math.sqrt(plan.coordinates)
        with warnings.catch_warnings():  # Opacus's PRV takes log(1 - q) at q = 1
            warnings.simplefilter("ignore", RuntimeWarning)
            warnings.filterwarnings("ignore", message=LARGEST_ORDER)
            epsilon = Accountant(accountant).epsilon_after(
                plan.delta, noise_multiplier=sigma, sample_rate=cohort / plan.population,
                num_steps=plan.rounds)
        return epsilon <= target_epsilon

    if not useful(plan.population):
        return None
    low, high = 1, plan.population  # useful(high) holds
    while low < high:
        middle = (low + high) // 2
        if useful(middle):
            high = middle
        else:
            low = middle + 1
    return high
