from __future__ import annotations

import random

import pytest
import torch

from fedmilm.aggregation import DpFedAvg, FedAvg, aggregate_all
from fedmilm.privacy.randomness import SeededRandom
from fedmilm.privacy.user_level import clip_update, l2_norm, noisy_mean
from tests.conftest import tiny_config

REF = {"a": torch.zeros(50, 40), "b": torch.zeros(30)}


def test_clip_scales_down_only():
    long = {"a": torch.full((50, 40), 1.0), "b": torch.zeros(30)}
    assert l2_norm(clip_update(long, 2.0)) == pytest.approx(2.0)
    short = {"a": torch.full((50, 40), 1e-4), "b": torch.zeros(30)}
    assert torch.equal(clip_update(short, 2.0)["a"], short["a"])


def test_noisy_mean_is_fixed_denominator_sum_plus_calibrated_noise():
    updates = [{"a": torch.full((50, 40), float(i)), "b": torch.ones(30)} for i in range(3)]
    exact = noisy_mean(updates, REF, clip_norm=1.0, noise_multiplier=0.0, expected_clients=4,
                       random=SeededRandom(0))
    assert torch.allclose(exact["a"], torch.full((50, 40), (0 + 1 + 2) / 4))
    noisy = noisy_mean([], REF, clip_norm=0.5, noise_multiplier=2.0, expected_clients=4,
                       random=SeededRandom(0))
    # std of each coordinate = sigma * C / expected = 2 * 0.5 / 4 = 0.25 (2000 samples)
    assert noisy["a"].std().item() == pytest.approx(0.25, rel=0.08)
    assert abs(noisy["a"].mean().item()) < 0.03


def test_dp_fedavg_samples_poisson_and_accounts_every_round():
    cfg = tiny_config("privacy=user", "privacy.seeded_noise=true", "federation.num_clients=20",
                      "federation.clients_per_round=5")
    agg = DpFedAvg(cfg)
    sizes = [len(agg.cohort(list(range(20)), random.Random(i))) for i in range(400)]
    assert sum(sizes) / len(sizes) == pytest.approx(5, rel=0.1)  # q N on average
    assert len(set(sizes)) > 3  # the cohort size varies: it is Poisson, not fixed
    assert agg.max_update_norm == pytest.approx(cfg.privacy.user.clip_norm, rel=1e-2)
    noise_only = aggregate_all(agg, [], [], REF)  # no reply: still released, as pure noise (a skip
    assert set(noise_only) == set(REF)       # decided on the exact count would leak it)...
    assert float(noise_only["a"].abs().sum()) > 0
    assert agg.accountant.steps == 1         # ...and accounted
    assert agg.epsilon() > 0


def test_dp_fedavg_cohorts_cannot_be_recomputed_from_the_config():
    """Two servers with the same config and seed draw different cohorts, and the seeded
    sampler the server holds (reproducible from `seed`) has no say in them."""
    cfg = tiny_config("privacy=user", "federation.num_clients=40",
                      "federation.clients_per_round=10")
    first, second = DpFedAvg(cfg), DpFedAvg(cfg)
    nodes = list(range(40))
    a = [first.cohort(nodes, random.Random(cfg.seed)) for _ in range(5)]
    b = [second.cohort(nodes, random.Random(cfg.seed)) for _ in range(5)]
    replay = [[n for n in nodes if random.Random(cfg.seed).random() < first.rate]
              for _ in range(5)]
    assert a != b and a != replay


def test_dp_fedavg_stops_before_exceeding_the_target():
    cfg = tiny_config("privacy=user", "privacy.user.target_epsilon=6",
                      "privacy.user.noise_multiplier=1.0")
    agg = DpFedAvg(cfg)
    rounds = 0
    while agg.may_continue():
        aggregate_all(agg, [], [], REF)
        rounds += 1
        assert rounds < 1000
    assert 0 < agg.epsilon() <= 6 < agg.accountant.epsilon_after(
        cfg.privacy.delta, noise_multiplier=1.0, sample_rate=agg.rate, num_steps=1)


def test_plain_fedavg_samples_fixed_size_without_replacement():
    agg = FedAvg(tiny_config("federation.num_clients=20", "federation.clients_per_round=5"))
    cohort = agg.cohort(list(range(20)), random.Random(0))
    assert len(cohort) == len(set(cohort)) == 5 and agg.epsilon() is None
