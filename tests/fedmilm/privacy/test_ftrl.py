"""DP-FTRL: the tree's noise, its epsilon against dp-accounting, and the participation rules."""

from __future__ import annotations

import json
import math
import random

import dp_accounting
import pytest
import torch
from dp_accounting import dp_event
from dp_accounting.pld import pld_privacy_accountant
from dp_accounting.rdp import rdp_privacy_accountant

from fedmilm.aggregation import DpFtrl, aggregate_all
from fedmilm.privacy.calibrate import resolve_privacy
from fedmilm.privacy.gaussian import gaussian_delta, gaussian_epsilon, gaussian_mu_for
from fedmilm.privacy.randomness import SecureRandom, SeededRandom
from fedmilm.privacy.tree import TreeAccountant, TreeNoise, ftrl_noise_for, tree_depth
from tests.conftest import tiny_config

COORDS = 40_000
REF = {"a": torch.zeros(COORDS)}


def test_prefix_noise_variance_is_the_popcount_of_the_round_and_restarts_with_the_tree():
    """The noise in the model after t rounds of a tree is the sum of popcount(t) independent
    nodes; after a restart the finished tree's total stays and the new tree adds to it."""
    tree = TreeNoise(SeededRandom(3), std=1.0, leaves_per_tree=8)
    total = torch.zeros(COORDS)
    for t in range(1, 13):
        total += tree.next_step_noise(REF)["a"]
        within = t if t <= 8 else t - 8
        expected = bin(within).count("1") + (1 if t > 8 else 0)  # + tree one's final node
        assert total.var().item() == pytest.approx(expected, rel=0.05), t
    assert len(tree._stack) <= tree_depth(8)


def test_tree_noise_is_not_reproducible_without_a_test_seed():
    a = TreeNoise(SecureRandom(), std=1.0, leaves_per_tree=4).next_step_noise(REF)["a"]
    b = TreeNoise(SecureRandom(), std=1.0, leaves_per_tree=4).next_step_noise(REF)["a"]
    assert not torch.equal(a, b)
    assert a.std().item() == pytest.approx(1.0, rel=0.05)


@pytest.mark.parametrize("mu,epsilon", [(0.5, 1.0), (1.0, 3.0), (2.0, 2.0)])
def test_gaussian_profile_matches_dp_accounting(mu, epsilon):
    """delta(epsilon) of a mu-GDP mechanism against dp-accounting's PLD of a Gaussian with
    sensitivity 1 and std 1/mu (its own, independent computation)."""
    pld = pld_privacy_accountant.PLDAccountant(value_discretization_interval=1e-4)
    pld.compose(dp_event.GaussianDpEvent(1 / mu))
    assert gaussian_delta(mu, epsilon) == pytest.approx(pld.get_delta(epsilon), rel=1e-3)


@pytest.mark.parametrize("sigma,separation,rounds,cap", [
    (1.0, 1, 10, None), (2.0, 8, 100, None), (3.5, 100, 1000, 4), (0.8, 3, 7, 2)])
def test_tree_epsilon_against_dp_accounting(sigma, separation, rounds, cap):
    """Our exact epsilon is what dp-accounting's PLD gives for the equivalent Gaussian, and at
    most what its RDP accountant gives for the tree-aggregation events themselves (one tree of
    `separation` rounds per participation)."""
    delta = 1e-6
    accountant = TreeAccountant(sigma, separation, cap)
    accountant.step(rounds)
    participations = accountant.participations()
    assert participations == min(math.ceil(rounds / separation), cap or 10**9)
    ours = accountant.epsilon(delta)
    tree = dp_event.SingleEpochTreeAggregationDpEvent(sigma, separation)
    rdp = rdp_privacy_accountant.RdpAccountant(
        neighboring_relation=dp_accounting.NeighboringRelation.REPLACE_SPECIAL)
    rdp.compose(dp_event.SelfComposedDpEvent(tree, participations))
    pld = pld_privacy_accountant.PLDAccountant(value_discretization_interval=1e-4)
    pld.compose(dp_event.SelfComposedDpEvent(
        dp_event.GaussianDpEvent(sigma / math.sqrt(tree_depth(separation))), participations))
    assert ours == pytest.approx(pld.get_epsilon(delta), rel=0.01)
    assert ours <= rdp.get_epsilon(delta) * (1 + 1e-9)


def test_ftrl_noise_meets_the_target_exactly():
    sigma = ftrl_noise_for(8.0, delta=1e-6, rounds=100, min_separation=10,
                           max_participations=None)
    accountant = TreeAccountant(sigma, 10, None)
    accountant.step(100)
    assert accountant.epsilon(1e-6) == pytest.approx(8.0, rel=1e-6)
    slightly_less = TreeAccountant(sigma * 0.99, 10, None)
    slightly_less.step(100)
    assert slightly_less.epsilon(1e-6) > 8.0
    assert gaussian_epsilon(gaussian_mu_for(2.0, 1e-5), 1e-5) == pytest.approx(2.0, rel=1e-9)


def test_rounds_lost_on_a_resume_are_charged_as_unseen_participations():
    plain, lossy = TreeAccountant(2.0, 5, 3), TreeAccountant(2.0, 5, 3)
    plain.step(20)
    lossy.step(10)
    lossy.charge_lost(4)  # 4 rounds whose records the resumed server never saw
    lossy.step(10)
    assert plain.participations() == 3          # the cap
    assert lossy.participations() == 3 + 1      # the cap, plus one the lost rounds may hold
    assert lossy.epsilon(1e-6) > plain.epsilon(1e-6)


def _ftrl(*overrides: str) -> DpFtrl:
    cfg = resolve_privacy(tiny_config("privacy=user", "privacy.user.mechanism=ftrl",
                                      "privacy.seeded_noise=true", *overrides))
    return DpFtrl(cfg)


def test_server_enforces_separation_and_cap():
    agg = _ftrl("federation.num_clients=30", "federation.clients_per_round=5",
                "federation.rounds=40", "privacy.user.min_separation=4",
                "privacy.user.max_participations=5")
    nodes, sampler, seen = list(range(30)), random.Random(0), {}
    for server_round in range(1, 41):
        cohort = agg.cohort(nodes, sampler, server_round)
        assert len(cohort) == len(set(cohort)) <= 5
        for device in cohort:
            rounds = seen.setdefault(device, [])
            assert not rounds or server_round - rounds[-1] >= 4
            rounds.append(server_round)
    assert max(len(r) for r in seen.values()) <= 5
    assert sum(len(r) for r in seen.values()) == 30 * 5  # every phone used its cap


def test_participation_records_survive_a_checkpoint():
    first = _ftrl("federation.num_clients=20", "federation.clients_per_round=5",
                  "privacy.user.min_separation=4")
    sampler = random.Random(1)
    taken = first.cohort(list(range(20)), sampler, 1)
    aggregate_all(first, [], [], REF)
    second = _ftrl("federation.num_clients=20", "federation.clients_per_round=5",
                   "privacy.user.min_separation=4")
    second.load_state_dict(first.state_dict())
    assert set(second.eligible(list(range(20)), 2)).isdisjoint(taken)
    assert second.epsilon() == first.epsilon() > 0
    assert second.accountant.rounds == 1


def test_release_is_the_sum_over_the_fixed_cohort_plus_tree_noise():
    agg = _ftrl("federation.num_clients=20", "federation.clients_per_round=4",
                "privacy.user.noise_multiplier=2.0", "privacy.user.clip_norm=0.5")
    updates = [{"a": torch.full((COORDS,), 0.001 * (i + 1))} for i in range(3)]
    step = aggregate_all(agg, updates, [1, 1, 1], REF)
    # (sum 0.006 + N(0, (2 x 0.5)^2)) / 4: mean 0.0015, std 0.25 per coordinate
    assert step["a"].mean().item() == pytest.approx(0.0015, abs=0.004)
    assert step["a"].std().item() == pytest.approx(0.25, rel=0.05)
    assert agg.accountant.rounds == 1


def test_config_resolves_separation_and_calibrates_the_tree_noise():
    cfg = resolve_privacy(tiny_config(
        "privacy=user", "privacy.user.mechanism=ftrl", "privacy.user.noise_multiplier=null",
        "privacy.user.target_epsilon=4", "federation.num_clients=40",
        "federation.clients_per_round=5", "federation.rounds=16", "privacy.delta=1e-3"))
    user = cfg.privacy.user
    assert user.min_separation == 8                       # 40 // 5
    accountant = TreeAccountant(user.noise_multiplier, 8, None)
    accountant.step(16)
    assert accountant.participations() == 2
    assert accountant.epsilon(1e-3) == pytest.approx(4.0, rel=1e-6)


def test_poisson_under_availability_says_what_its_epsilon_assumes(caplog):
    from fedmilm.server.federation import _warn_risky

    _warn_risky(tiny_config("privacy=user", "device.availability=synthetic"))
    assert "assumes every phone is sampled independently" in caplog.text
    assert "privacy.user.mechanism=ftrl" in caplog.text
    caplog.clear()
    _warn_risky(tiny_config("privacy=user", "privacy.user.mechanism=ftrl",
                            "device.availability=synthetic"))
    _warn_risky(tiny_config("privacy=user"))
    assert "assumes every phone" not in caplog.text


def test_the_public_config_reproduces_neither_tree_noise_nor_clip_counts_and_none_is_saved():
    """Two servers with the same public config (no test seed) release different noise and move
    the clip differently, and the checkpointed state holds no generator or tree node."""
    run = ("privacy=user", "privacy.user.mechanism=ftrl", "privacy.user.adaptive_clip=true",
           "federation.num_clients=20", "federation.clients_per_round=4")
    first, second = (DpFtrl(resolve_privacy(tiny_config(*run))) for _ in range(2))
    steps = []
    for agg in (first, second):
        agg.cohort(list(range(20)), random.Random(0), 1)  # the public sampler: same cohort
        round_sum = agg.start_round()
        agg.vote(0.5)
        steps.append(agg.finish_round(round_sum, REF))
    assert not torch.equal(steps[0]["a"], steps[1]["a"])
    assert first.adaptive.clip != second.adaptive.clip
    saved = first.state_dict()
    assert "noise_generator" not in saved and "tree" not in json.dumps(saved).replace(
        '"mechanism": "tree"', "")


def test_the_gaussian_profile_survives_a_noise_multiplier_near_zero():
    """mu ~ 4e9 (sigma ~ 1e-9, a clip-only run): the profile's two terms cancel near 1e19;
    epsilon must come out finite and ordered, not overflow."""
    from fedmilm.privacy.gaussian import gaussian_epsilon

    tiny, small = gaussian_epsilon(4e9, 1e-5), gaussian_epsilon(1e3, 1e-5)
    assert math.isfinite(tiny) and tiny > small > 0
