"""Resolve the privacy settings of a run before it starts: calibrate noise, refuse the hopeless.

The planned sampling mirrors what the run really does: a phone's DP-SGD samples each example
with probability q = batch / n for epochs x ceil(n / batch) steps each time it is picked, and
is picked in about rounds x clients_per_round / num_clients rounds; the server picks each phone
with probability clients_per_round / num_clients once per round (Poisson).
"""

from __future__ import annotations

import dataclasses
import logging
import math
import warnings
from functools import lru_cache

from opacus.accountants.utils import get_noise_multiplier

from fedmilm.config.schema import FedMilmConfig, UserPrivacyConfig
from fedmilm.config.validate import ConfigError
from fedmilm.privacy.accountant import PRV_MIN_NOISE, Accountant
from fedmilm.privacy.adaptive_clip import update_noise_multiplier
from fedmilm.privacy.tree import TreeAccountant, default_separation, ftrl_noise_for
from fedmilm.training.skeleton import dp_sample_rate, planned_steps

log = logging.getLogger("fedmilm")


def user_sample_rate(cfg: FedMilmConfig) -> float:
    """Probability that the server samples a given phone in a round."""
    return cfg.federation.clients_per_round / cfg.federation.num_clients


def expected_rounds(cfg: FedMilmConfig) -> int:
    """Rounds a phone is expected to train in: rounds x clients_per_round / num_clients."""
    return math.ceil(cfg.federation.rounds * user_sample_rate(cfg))


def sample_plan(cfg: FedMilmConfig, n: int | None = None) -> tuple[float, int, int]:
    """(per-step sample rate, steps per round, expected rounds) of one phone's DP-SGD with `n`
    training interactions (default: `data.train_per_user`, the synthetic count)."""
    n, batch = n or cfg.data.train_per_user, cfg.train.batch_size
    per_round = planned_steps(n, epochs=cfg.train.epochs, batch_size=batch)
    return dp_sample_rate(n, batch_size=batch), per_round, expected_rounds(cfg)


MAX_NOISE_MULTIPLIER = 100.0  # beyond this the noise swamps any update: no useful run
# Opacus's RDP warns when its best order is the largest or smallest it tries (in the
# calibration search): the bound is then looser, i.e. on the safe side; nothing to act on.
EDGE_ORDER = "Optimal order is the"  # ... largest / smallest alpha


@lru_cache(maxsize=256)
def calibrated_noise(target: float, *, delta: float, sample_rate: float, steps: int,
                accountant: str) -> float:
    """The noise multiplier meeting `target`; `ValueError` (one line) when none up to
    MAX_NOISE_MULTIPLIER does (checked first: Opacus's search would double sigma for
    minutes towards an unreachable target)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=EDGE_ORDER)
        ceiling = Accountant(accountant).epsilon_after(
            delta, noise_multiplier=MAX_NOISE_MULTIPLIER, sample_rate=sample_rate,
            num_steps=steps)
        if ceiling > target:
            raise ValueError(f"even noise multiplier {MAX_NOISE_MULTIPLIER:g} gives epsilon "
                             f"{ceiling:.3g} > {target:g} at delta {delta:g} over {steps} steps "
                             f"at sampling rate {sample_rate:.3g}")
        if accountant == "prv" and Accountant("prv").epsilon_after(
                delta, noise_multiplier=PRV_MIN_NOISE, sample_rate=sample_rate,
                num_steps=steps) <= target:
            accountant = "rdp"  # the answer lies where PRV cannot go (see Accountant.epsilon)
        try:
            return float(get_noise_multiplier(target_epsilon=target, target_delta=delta,
                                              sample_rate=sample_rate, steps=steps,
                                              accountant=accountant, epsilon_tolerance=0.005))
        except (ValueError, RuntimeError, OverflowError) as err:
            raise ValueError(f"no noise multiplier reaches epsilon {target:g} at delta "
                             f"{delta:g} over {steps} steps at sampling rate {sample_rate:.3g} "
                             f"({type(err).__name__})") from err


def phone_sample_noise(cfg: FedMilmConfig, *, n: int, target: float | None) -> float:
    """The DP-SGD noise multiplier of a phone with `n` real training interactions: the run's
    fixed one, or calibrated on the phone from its own n and budget `target` (jsonl users
    differ in n; a bound on n would over- or under-noise them). `ValueError` when impossible."""
    sample = cfg.privacy.sample
    if sample.noise_multiplier is not None:
        return sample.noise_multiplier
    if target is None:
        raise ValueError("privacy.sample.noise_multiplier is null and no target epsilon is set")
    q, steps, rounds = sample_plan(cfg, n)
    return calibrated_noise(target, delta=cfg.privacy.delta, sample_rate=q, steps=steps * rounds,
                       accountant=cfg.privacy.accountant)


def _check_delta(problems: list[str], delta: float, units: int, what: str) -> None:
    """delta must be < 1/n for n protected units (a delta of 1/n lets the mechanism publish
    one unit's data outright); above 1/n^1.1 the guarantee is weak, so say so."""
    if delta >= 1 / units:
        problems.append(f"privacy.delta={delta:g} must be < 1/n = {1 / units:.3g} for the "
                        f"n={units} {what} it protects")
    elif delta > units ** -1.1:
        log.warning("privacy.delta=%g is above 1/n^1.1 = %.3g for the n=%d %s it protects; a "
                    "smaller delta is advisable", delta, units ** -1.1, units, what)


def _one_round_epsilon(*, noise: float, sample_rate: float, steps: int, delta: float,
                       accountant: str) -> float:
    return Accountant(accountant).epsilon_after(delta, noise_multiplier=noise,
                                                sample_rate=sample_rate, num_steps=steps)


def _resolve_poisson(cfg: FedMilmConfig, problems: list[str]) -> UserPrivacyConfig:
    """DP-FedAvg: the noise for the target over `rounds` Poisson-sampled rounds."""
    priv, user, q = cfg.privacy, cfg.privacy.user, user_sample_rate(cfg)
    if user.noise_multiplier is None:
        try:
            user = dataclasses.replace(user, noise_multiplier=calibrated_noise(
                user.target_epsilon, delta=priv.delta, sample_rate=q,
                steps=cfg.federation.rounds, accountant=priv.accountant))
        except ValueError as err:
            raise ConfigError([f"privacy.user.target_epsilon: {err}"]) from err
    first = _one_round_epsilon(noise=user.noise_multiplier, sample_rate=q, steps=1,
                               delta=priv.delta, accountant=priv.accountant)
    _check_first_round(problems, user, first)
    return user


def _resolve_ftrl(cfg: FedMilmConfig, problems: list[str]) -> UserPrivacyConfig:
    """DP-FTRL: the separation (null: N // m) and the noise for the target in closed form."""
    fed, user = cfg.federation, cfg.privacy.user
    longest = default_separation(fed.num_clients, fed.clients_per_round)
    separation = user.min_separation or longest
    if separation > longest:
        log.warning("privacy.user.min_separation=%d > num_clients // clients_per_round = %d: "
                    "fewer than %d phones may train in some rounds", separation, longest,
                    fed.clients_per_round)
    user = dataclasses.replace(user, min_separation=separation)
    if user.noise_multiplier is None:
        user = dataclasses.replace(user, noise_multiplier=ftrl_noise_for(
            user.target_epsilon, delta=cfg.privacy.delta, rounds=fed.rounds,
            min_separation=separation, max_participations=user.max_participations))
    first = TreeAccountant(user.noise_multiplier, separation, user.max_participations).epsilon(
        cfg.privacy.delta, rounds=1)
    _check_first_round(problems, user, first)
    return user


def _check_first_round(problems: list[str], user: UserPrivacyConfig, first: float) -> None:
    if user.target_epsilon is not None and first > user.target_epsilon:
        problems.append(f"privacy.user.target_epsilon={user.target_epsilon:g} is exceeded by "
                        f"a single round (epsilon {first:.3g}); raise the noise or the target")


def resolve_privacy(cfg: FedMilmConfig, user_sizes: list[int] | None = None) -> FedMilmConfig:
    """A copy with the user-level noise multiplier set (the server adds that noise); a null
    DP-SGD noise multiplier stays null: each phone calibrates its own from its real n.
    `ConfigError` naming the key if delta is too large for what it protects, if a target
    cannot be met, or if one round already exceeds it (the run could never train).
    `user_sizes`: the phones' real training counts when known up front (jsonl)."""
    priv, problems = cfg.privacy, []
    user = priv.user
    if priv.sample_level:  # checked at the smallest n; each phone calibrates with its own n
        n = min([cfg.data.train_per_user, *(user_sizes or [])])
        _check_delta(problems, priv.delta, n, "training interactions of a phone")
        q, steps, _ = sample_plan(cfg, n)
        try:
            noise = phone_sample_noise(cfg, n=n, target=priv.sample.target_epsilon)
        except ValueError as err:
            raise ConfigError([f"privacy.sample.target_epsilon: {err}"]) from err
        first = _one_round_epsilon(noise=noise, sample_rate=q, steps=steps,
                                   delta=priv.delta, accountant=priv.accountant)
        sample = priv.sample
        if sample.target_epsilon is not None and first > sample.target_epsilon:
            problems.append(f"privacy.sample.target_epsilon={sample.target_epsilon:g} is exceeded "
                            f"by one round of local training (epsilon {first:.3g}); raise the "
                            "noise or the target, or train fewer steps")
    if priv.user_level:
        _check_delta(problems, priv.delta, cfg.federation.num_clients, "phones")
        resolve = _resolve_ftrl if user.mechanism == "ftrl" else _resolve_poisson
        user = resolve(cfg, problems)
        if user.adaptive_clip and user.clip_count_noise is not None:
            try:
                update_noise_multiplier(user.noise_multiplier, user.clip_count_noise)
            except ValueError as err:
                problems.append(f"privacy.user.clip_count_noise: {err}")
    if problems:
        raise ConfigError(problems)
    return dataclasses.replace(cfg, privacy=dataclasses.replace(priv, user=user))
