"""Resolve the privacy settings of a run before it starts: calibrate noise, refuse the hopeless.

The planned sampling mirrors what the run really does: a phone's DP-SGD samples each example
with probability q = batch / n for epochs x ceil(n / batch) steps each time it is picked, and
is picked in about rounds x clients_per_round / num_clients rounds; the server picks each phone
with probability clients_per_round / num_clients once per round (Poisson).
"""

from __future__ import annotations

import dataclasses
import math

from opacus.accountants.utils import get_noise_multiplier

from fedmilm.config.schema import FedMilmConfig
from fedmilm.config.validate import ConfigError
from fedmilm.privacy.accountant import Accountant
from fedmilm.training.local import dp_sample_rate, planned_steps


def user_sample_rate(cfg: FedMilmConfig) -> float:
    """Probability that the server samples a given phone in a round."""
    return cfg.federation.clients_per_round / cfg.federation.num_clients


def sample_plan(cfg: FedMilmConfig) -> tuple[float, int, int]:
    """(per-step sample rate, steps per round, expected rounds) of one phone's DP-SGD."""
    n, batch = cfg.data.train_per_user, cfg.train.batch_size
    per_round = planned_steps(n, epochs=cfg.train.epochs, batch_size=batch)
    rounds = math.ceil(cfg.federation.rounds * user_sample_rate(cfg))
    return dp_sample_rate(n, batch_size=batch), per_round, rounds


def _calibrated(target: float, *, delta: float, sample_rate: float, steps: int,
                accountant: str) -> float:
    return float(get_noise_multiplier(target_epsilon=target, target_delta=delta,
                                      sample_rate=sample_rate, steps=steps,
                                      accountant=accountant, epsilon_tolerance=0.005))


def _one_round_epsilon(*, noise: float, sample_rate: float, steps: int, delta: float,
                       accountant: str) -> float:
    return Accountant(accountant).epsilon_after(delta, noise_multiplier=noise,
                                                sample_rate=sample_rate, num_steps=steps)


def resolve_privacy(cfg: FedMilmConfig) -> FedMilmConfig:
    """A copy with every noise multiplier set; `ConfigError` if one round already exceeds a
    target (the run could never train)."""
    priv, problems = cfg.privacy, []
    sample, user = priv.sample, priv.user
    if priv.sample_level:
        q, steps, rounds = sample_plan(cfg)
        if sample.noise_multiplier is None:
            sample = dataclasses.replace(sample, noise_multiplier=_calibrated(
                sample.target_epsilon, delta=priv.delta, sample_rate=q, steps=steps * rounds,
                accountant=priv.accountant))
        first = _one_round_epsilon(noise=sample.noise_multiplier, sample_rate=q, steps=steps,
                                   delta=priv.delta, accountant=priv.accountant)
        if sample.target_epsilon is not None and first > sample.target_epsilon:
            problems.append(f"privacy.sample.target_epsilon={sample.target_epsilon:g} is exceeded "
                            f"by one round of local training (epsilon {first:.3g}); raise the "
                            "noise or the target, or train fewer steps")
    if priv.user_level:
        q = user_sample_rate(cfg)
        if user.noise_multiplier is None:
            user = dataclasses.replace(user, noise_multiplier=_calibrated(
                user.target_epsilon, delta=priv.delta, sample_rate=q,
                steps=cfg.federation.rounds, accountant=priv.accountant))
        first = _one_round_epsilon(noise=user.noise_multiplier, sample_rate=q, steps=1,
                                   delta=priv.delta, accountant=priv.accountant)
        if user.target_epsilon is not None and first > user.target_epsilon:
            problems.append(f"privacy.user.target_epsilon={user.target_epsilon:g} is exceeded by "
                            f"a single round (epsilon {first:.3g}); raise the noise or the target")
    if problems:
        raise ConfigError(problems)
    return dataclasses.replace(cfg, privacy=dataclasses.replace(priv, sample=sample, user=user))
