"""Distributed DP under SecAgg+: exact Poisson/Skellam draws, the Skellam RDP bound checked
against the exact Renyi divergence, shares that sum to the planned variance (with and without a
dropout) and pass Flower's quantisation exactly, and the config and policy around them."""

from __future__ import annotations

import math
import re
from dataclasses import replace

import dp_accounting
import mpmath
import numpy as np
import pytest
import torch
from flwr.common.secure_aggregation.quantization import quantize
from scipy import stats

from fedmilm.aggregation.dp_ftrl import DpFtrl
from fedmilm.config.validate import ConfigError
from fedmilm.privacy.calibrate import resolve_privacy
from fedmilm.privacy.discrete_noise import log_poisson_pmf, poisson
from fedmilm.privacy.distributed import DistributedNoise, noisy_share, skellam_rdp
from fedmilm.privacy.policy import PhonePolicy, policy_for_run
from fedmilm.privacy.randomness import SecureRandom, SeededRandom
from fedmilm.privacy.user_level import l2_norm, upload_clip_norm
from tests.conftest import tiny_config

DISTRIBUTED = ["privacy=user", "privacy.user.mechanism=ftrl", "aggregation.secure=true",
               "privacy.user.distributed_noise=0.5", "privacy.user.noise_multiplier=0.5",
               "privacy.user.target_epsilon=null", "federation.num_clients=8",
               "federation.clients_per_round=4", "federation.min_replies=3",
               "aggregation.secagg_shares=3", "aggregation.secagg_threshold=2"]


@pytest.mark.parametrize("lam", [0.7, 6.5, 10.0, 123.4, 1e5, 1e10])
def test_poisson_draws_follow_the_poisson_law(lam):
    draws = poisson(200_000, lam, SeededRandom(7)).numpy()
    law = stats.poisson(lam)
    edges = np.unique(law.ppf(np.linspace(0.01, 0.99, 25)))  # bins of ~4% mass each
    counts = np.histogram(draws, bins=np.concatenate([[-0.5], edges + 0.5, [np.inf]]))[0]
    mass = np.diff(np.concatenate([[0.0], law.cdf(edges), [1.0]]))
    _, p = stats.chisquare(counts, mass / mass.sum() * len(draws))
    assert p > 1e-3, (lam, counts, mass * len(draws))


def test_log_pmf_keeps_its_precision_where_the_textbook_formula_loses_it():
    lam = 1e10
    k = torch.tensor([int(lam) - 300_000, int(lam), int(lam) + 123_456], dtype=torch.int64)
    mpmath.mp.dps = 60
    exact = [float(-lam + int(j) * mpmath.log(lam) - mpmath.loggamma(int(j) + 1)) for j in k]
    ours = log_poisson_pmf(k, lam)
    textbook = -lam + k.double() * math.log(lam) - torch.lgamma(k.double() + 1)
    assert torch.allclose(ours, torch.tensor(exact, dtype=torch.float64), rtol=0, atol=1e-9)
    assert float((textbook - torch.tensor(exact, dtype=torch.float64)).abs().max()) > 1e-7


def _exact_skellam_rdp(order: int, shift: int, variance: float) -> float:
    """D_order(Sk + shift || Sk) for one coordinate, summed over the whole support."""
    k = np.arange(-int(60 + 40 * math.sqrt(variance)), int(60 + 40 * math.sqrt(variance)) + 1)
    log_q = stats.skellam.logpmf(k, variance / 2, variance / 2)
    log_p = stats.skellam.logpmf(k - shift, variance / 2, variance / 2)
    both = np.isfinite(log_p) & np.isfinite(log_q)  # scipy: nan/inf where the mass underflows
    terms = order * log_p[both] + (1 - order) * log_q[both]
    return float(np.logaddexp.reduce(terms)) / (order - 1)


@pytest.mark.parametrize("variance", [2.0, 8.0, 30.0, 200.0])
@pytest.mark.parametrize("shift", [1, 3])
def test_the_skellam_bound_holds_and_is_tight_in_one_dimension(variance, shift):
    for order in (2, 3, 5, 10, 32):
        exact = _exact_skellam_rdp(order, shift, variance)
        bound = skellam_rdp(order, l1=shift, l2=shift, variance=variance)
        assert exact <= bound, (order, exact, bound)
        if variance >= 30 and order <= 10:  # the bound nears the Gaussian's, and the truth
            assert bound <= 1.25 * exact, (order, exact, bound)


def _noise(**changes) -> DistributedNoise:
    base = DistributedNoise(noise_multiplier=0.5, clip_norm=1.0, expected=5, floor=4,
                            clip_range=8.0, quant_range=2**16, num_values=20_000)
    return replace(base, **changes)


def test_epsilon_against_the_server_is_the_gaussian_one_of_the_shares_that_must_arrive():
    noise = _noise(noise_multiplier=3.0, clip_range=64.0)  # epsilon ~1-5: integer orders do
    for participations in (1, 4, 16):
        sigma = math.sqrt(noise.floor * noise.share_variance) / noise.l2  # floor shares, not 5
        accountant = dp_accounting.rdp.RdpAccountant()
        accountant.compose(dp_accounting.GaussianDpEvent(sigma), participations)
        gaussian = accountant.get_epsilon(1e-5 / 2)
        ours = noise.epsilon(participations, 1e-5)
        assert gaussian * 0.99 <= ours <= gaussian * 1.03, (participations, ours, gaussian)
    assert noise.epsilon(4, 1e-5) < replace(noise, floor=2).epsilon(4, 1e-5)


def test_shares_sum_to_the_planned_variance_with_and_without_a_dropout():
    noise = _noise()
    room = upload_clip_norm(1.0, num_values=noise.num_values, secagg_clip_range=8.0,
                            secagg_quant_range=2**16)
    generator = torch.Generator().manual_seed(3)
    updates = []
    for _ in range(noise.expected):
        raw = torch.randn(noise.num_values, generator=generator, dtype=torch.float64)
        updates.append({"a": (raw * room / raw.norm()).view(100, 200)})
    random = SecureRandom()
    shares = [noisy_share(u, noise, random) for u in updates]
    planned = (noise.noise_multiplier * noise.clip_norm) ** 2  # over all 5 phones
    for arrived in (5, 4):  # everyone, then one phone dropped out before masking
        error = sum(s["a"].double() for s in shares[:arrived]) - sum(
            u["a"] for u in updates[:arrived])
        variance = float(error.pow(2).mean())
        expected = planned * arrived / noise.expected
        assert abs(variance / expected - 1) < 0.04, (arrived, variance, expected)
        assert abs(float(error.mean())) < 4 * math.sqrt(expected / noise.num_values)


def test_shares_lie_on_the_grid_flower_quantises_exactly_within_the_clip():
    noise = _noise(noise_multiplier=1e-6)  # almost no noise: the rounding alone shows
    room = upload_clip_norm(1.0, num_values=noise.num_values, secagg_clip_range=8.0,
                            secagg_quant_range=2**16)
    raw = torch.randn(100, 200, dtype=torch.float64)
    update = {"a": (raw * room / raw.norm()).to(torch.float32)}
    share = noisy_share(update, noise, SecureRandom())
    assert l2_norm(share) <= noise.clip_norm  # the rounding room was enough
    index = share["a"].double() / noise.step
    assert torch.equal(index, index.round())  # on the grid
    quantised = quantize([share["a"].numpy()], noise.clip_range, noise.quant_range)[0]
    assert np.array_equal(quantised, (index.numpy() + noise.quant_range / 2).astype(np.int64))
    moved = (share["a"].double() - update["a"].double()).abs()
    assert float(moved.max()) <= noise.step and float(moved.mean()) > noise.step / 10


def test_the_public_config_cannot_replay_a_phones_share():
    noise, update = _noise(), {"a": torch.zeros(100, 200)}
    first, second = (noisy_share(update, noise, SecureRandom()) for _ in range(2))
    assert not torch.equal(first["a"], second["a"])
    seeded = [noisy_share(update, noise, SeededRandom(5))["a"] for _ in range(2)]
    assert torch.equal(*seeded)  # the test-only generator is the only replayable one


def test_a_narrow_secagg_range_is_refused_naming_one_that_works():
    noise = _noise(noise_multiplier=4.0)  # std 1.8 per phone against R = 8
    problem = noise.range_problem(participations=4, delta=1e-5)
    assert problem is not None and "aggregation.secagg_clip_range=8 " in problem
    wide = float(problem.rsplit("use ", 1)[1])
    assert replace(noise, clip_range=wide).range_problem(4, 1e-5) is None
    assert replace(noise, clip_range=wide / 2).range_problem(4, 1e-5) is not None
    assert _noise().range_problem(4, 1e-5) is None


def test_the_server_accountant_reports_the_tighter_of_both_guarantees():
    cfg = resolve_privacy(tiny_config(*DISTRIBUTED, "privacy.delta=1e-3",
                                      "privacy.user.noise_multiplier=0.05",
                                      "privacy.user.distributed_noise=2.0",
                                      "aggregation.secagg_clip_range=128"))
    mechanism = DpFtrl(cfg, coordinates=20_000)
    mechanism.charge(3)
    central = mechanism.accountant.epsilon(cfg.privacy.delta)
    server = mechanism.epsilon_server()
    assert server is not None and server < central  # the phones' noise is the larger here
    assert mechanism.epsilon() == server
    state = mechanism.accountant_state()
    assert state["distributed"]["epsilon_server"] == server
    assert state["distributed"]["floor"] == 3  # federation.min_replies
    plain = resolve_privacy(tiny_config(*DISTRIBUTED[:2], "privacy.user.noise_multiplier=0.5",
                                        "privacy.user.target_epsilon=null"))
    assert DpFtrl(plain).epsilon_server() is None


@pytest.mark.parametrize(("overrides", "message"), [
    (["aggregation.secure=false"], "needs aggregation.secure=true"),
    (["privacy.user.mechanism=poisson"], "needs privacy.user.mechanism=ftrl"),
    (["aggregation.secagg_clip_range=6"], "powers of two"),
    (["aggregation.secagg_quant_range=33554432"], "must be <= 2^24"),
    (["aggregation.secagg_quant_range=1073741824"], "overflows SecAgg+'s 2^32 modulus"),
])
def test_config_errors_name_the_key(overrides, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        tiny_config(*DISTRIBUTED, *overrides)


def test_a_phone_declines_a_run_with_less_distributed_noise_than_its_policy():
    cfg = tiny_config(*DISTRIBUTED)
    strict = replace(policy_for_run(cfg.privacy), min_distributed_noise=1.0)
    assert "distributed noise 0.5 < the phone's minimum 1" in strict.refusal(cfg.privacy, None)
    assert policy_for_run(cfg.privacy).refusal(cfg.privacy, None) is None
    older = policy_for_run(cfg.privacy).to_json().replace(', "min_distributed_noise": 0.5', "")
    assert "min_distributed_noise" not in older  # a policy file from before this setting
    assert PhonePolicy.from_json(older, "old.json").min_distributed_noise == 0.0


def test_a_run_whose_range_the_noise_would_overflow_stops_with_one_line(capsys):
    from fedmilm.cli.common import check_distributed

    loud = resolve_privacy(tiny_config(*DISTRIBUTED, "privacy.user.distributed_noise=5"))
    with pytest.raises(SystemExit) as stopped:
        check_distributed(loud, coordinates=20_000)
    err = capsys.readouterr().err.strip()
    assert stopped.value.code == 2 and len(err.splitlines()) == 1
    assert "aggregation.secagg_clip_range=8 is too narrow" in err
    named = err.rsplit("use ", 1)[1]
    wide = resolve_privacy(tiny_config(*DISTRIBUTED, "privacy.user.distributed_noise=5",
                                       f"aggregation.secagg_clip_range={named}"))
    check_distributed(wide, coordinates=20_000)  # the range it named fits
