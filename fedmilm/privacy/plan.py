"""What user-level DP will do to the adapter, before a run spends hours finding out.

Both mechanisms release (sum of clipped updates + noise) / m, with m the expected cohort, and
every round's step carries at least one fresh Gaussian of std sigma C / m per coordinate (a
DP-FedAvg round's noise; a new node of DP-FTRL's tree). Over the d coordinates of the global
part that noise has norm about sigma C sqrt(d) / m, while the mean of the clipped updates has
norm at most C (exactly C only when every phone moves the same way). So sigma sqrt(d) / m is a
lower bound on the noise-to-signal norm ratio of a round's step: above 1 the step is mostly
noise. What differs is how noise piles up in the model: DP-FedAvg's adds up over all T rounds
(std sigma C sqrt(T) / m), DP-FTRL's only over the tree nodes a prefix sum uses.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

from fedmilm.privacy.accountant import Accountant
from fedmilm.privacy.calibrate import EDGE_ORDER, calibrated_noise
from fedmilm.privacy.tree import TreeAccountant, default_separation, ftrl_noise_for


@dataclass(frozen=True)
class UserLevelPlan:
    """One user-level DP setting and what it costs."""

    mechanism: str              # poisson | ftrl
    population: int
    cohort: int                 # expected phones per round (q N; ftrl: the fixed cohort)
    rounds: int
    delta: float
    noise_multiplier: float
    epsilon: float              # after all rounds, from the mechanism's accountant
    coordinates: int            # numbers in the global part of the adapter
    min_separation: int | None = None      # ftrl: rounds per tree
    max_participations: int | None = None  # ftrl
    distributed_noise: float = 0.0         # phones' noise std of a round (/ C), fresh per round

    @property
    def sample_rate(self) -> float:
        return self.cohort / self.population

    @property
    def round_noise(self) -> float:
        """A round's fresh noise std over C: the server's (or the new tree node's) and the
        phones' shares together."""
        return math.hypot(self.noise_multiplier, self.distributed_noise)

    @property
    def noise_std_over_clip(self) -> float:
        """Per-coordinate std of a round's fresh noise in the released mean, over the clip."""
        return self.round_noise / self.cohort

    @property
    def noise_to_signal(self) -> float:
        """Noise norm over the largest possible signal norm (C): at least this much noise."""
        return self.round_noise * math.sqrt(self.coordinates) / self.cohort

    @property
    def model_noise_over_clip(self) -> float:
        """Per-coordinate std of all noise in the model after the last round, over the clip:
        sqrt(T) draws for DP-FedAvg; for DP-FTRL the nodes of each tree's final prefix sum."""
        if self.mechanism == "poisson":
            draws = self.rounds
        else:
            assert self.min_separation is not None
            full, rest = divmod(self.rounds, self.min_separation)
            draws = full * self.min_separation.bit_count() + rest.bit_count()
        variance = draws * self.noise_multiplier**2 + self.rounds * self.distributed_noise**2
        return math.sqrt(variance) / self.cohort  # the phones' noise is fresh every round


def _epsilon(mechanism: str, *, population: int, cohort: int, rounds: int, delta: float,
             noise: float, accountant: str, separation: int | None,
             cap: int | None) -> float:
    if mechanism == "ftrl":
        tree = TreeAccountant(noise, separation or default_separation(population, cohort), cap)
        return tree.epsilon(delta, rounds)
    with warnings.catch_warnings():  # Opacus's PRV takes log(1 - q) at q = 1
        warnings.simplefilter("ignore", RuntimeWarning)
        warnings.filterwarnings("ignore", message=EDGE_ORDER)
        return Accountant(accountant).epsilon_after(delta, noise_multiplier=noise,
                                                    sample_rate=cohort / population,
                                                    num_steps=rounds)


def plan_user_level(*, population: int, cohort: int, rounds: int, delta: float,
                    coordinates: int, accountant: str, target_epsilon: float | None = None,
                    noise_multiplier: float | None = None, mechanism: str = "poisson",
                    min_separation: int | None = None,
                    max_participations: int | None = None,
                    distributed_noise: float = 0.0) -> UserLevelPlan:
    """The plan for a fixed noise multiplier, or for the one that meets `target_epsilon`
    (`ValueError` when none does). `min_separation` None: N // m (ftrl)."""
    separation = None
    if mechanism == "ftrl":
        separation = min_separation or default_separation(population, cohort)
    if noise_multiplier is None:
        if target_epsilon is None:
            raise ValueError("give a noise multiplier or a target epsilon")
        if mechanism == "ftrl":
            assert separation is not None
            noise_multiplier = ftrl_noise_for(target_epsilon, delta=delta, rounds=rounds,
                                              min_separation=separation,
                                              max_participations=max_participations)
        else:
            noise_multiplier = calibrated_noise(target_epsilon, delta=delta,
                                                sample_rate=cohort / population, steps=rounds,
                                                accountant=accountant)
    epsilon = _epsilon(mechanism, population=population, cohort=cohort, rounds=rounds,
                       delta=delta, noise=noise_multiplier, accountant=accountant,
                       separation=separation, cap=max_participations)
    return UserLevelPlan(mechanism=mechanism, population=population, cohort=cohort,
                         rounds=rounds, delta=delta, noise_multiplier=noise_multiplier,
                         epsilon=epsilon, coordinates=coordinates, min_separation=separation,
                         max_participations=max_participations,
                         distributed_noise=distributed_noise)


def smallest_useful_cohort(plan: UserLevelPlan, *, target_epsilon: float, accountant: str,
                           max_ratio: float = 1.0, fixed_separation: bool = False) -> int | None:
    """The smallest cohort whose step is not swamped (noise-to-signal at most `max_ratio`) at
    the same population, rounds, delta and epsilon; None when even the whole population is
    not enough. DP-FTRL's separation follows the cohort (N // m) unless `fixed_separation`.

    A cohort m is useful exactly when the largest noise that keeps the ratio in bounds,
    sigma_max = max_ratio m / sqrt(d), still meets the target (epsilon falls as sigma grows):
    one accountant evaluation per m, no calibration. Bisection: larger cohorts only help.
    The phones' noise (distributed) keeps its total std and takes its part of that room."""
    def useful(cohort: int) -> bool:
        room = (max_ratio * cohort / math.sqrt(plan.coordinates)) ** 2 - plan.distributed_noise**2
        if room <= 0:
            return False
        sigma = math.sqrt(room)
        separation = plan.min_separation if fixed_separation else None
        return _epsilon(plan.mechanism, population=plan.population, cohort=cohort,
                        rounds=plan.rounds, delta=plan.delta, noise=sigma,
                        accountant=accountant, separation=separation,
                        cap=plan.max_participations) <= target_epsilon

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


def swamp_warning(plan: UserLevelPlan, *, accountant: str,
                  max_ratio: float = 1.0) -> str | None:
    """One line when the planned noise swamps the signal (ratio above `max_ratio`), naming the
    cohort that would not be swamped at the same epsilon; None otherwise."""
    if plan.noise_to_signal <= max_ratio:
        return None
    useful = smallest_useful_cohort(plan, target_epsilon=plan.epsilon, accountant=accountant,
                                    max_ratio=max_ratio)
    where = (f"a cohort of {useful} (federation.clients_per_round) would not be, at the same "
             f"epsilon {plan.epsilon:.3g}" if useful is not None
             else f"no cohort of the {plan.population} phones would be, at epsilon "
                  f"{plan.epsilon:.3g}: more phones, fewer rounds or a larger epsilon")
    return (f"the noise swamps the signal: noise-to-signal norm ratio >= "
            f"{plan.noise_to_signal:.3g} each round, above privacy.user.max_noise_to_signal="
            f"{max_ratio:g} (sigma {plan.noise_multiplier:.3g}"
            + (f", phones' {plan.distributed_noise:.3g}" if plan.distributed_noise else "")
            + f", cohort {plan.cohort}, "
            f"{plan.coordinates:,} coordinates); {where}")
