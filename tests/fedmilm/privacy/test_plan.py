"""`fedmilm-privacy-plan`: its epsilon against Google's dp-accounting, its noise arithmetic
against the mechanism's definition, and the cohort it names against its own criterion."""

from __future__ import annotations

import math

import dp_accounting
import pytest
from dp_accounting import rdp

from fedmilm.cli.privacy_plan import report
from fedmilm.privacy.plan import plan_user_level, smallest_useful_cohort

pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")


def _independent_epsilon(q: float, sigma: float, rounds: int, delta: float) -> float:
    event = dp_accounting.SelfComposedDpEvent(
        dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(sigma)), rounds)
    accountant = rdp.RdpAccountant()
    accountant.compose(event)
    return accountant.get_epsilon(delta)


def test_the_calibrated_noise_meets_the_target_by_an_independent_accountant():
    plan = plan_user_level(population=10_000, cohort=500, rounds=50, delta=1e-6,
                           coordinates=100_000, accountant="rdp", target_epsilon=4.0)
    reference = _independent_epsilon(0.05, plan.noise_multiplier, 50, 1e-6)
    assert plan.epsilon <= 4.0 and reference == pytest.approx(plan.epsilon, rel=0.02)
    assert reference > 3.9  # calibrated to the target, not far below it


def test_the_noise_numbers_follow_the_mechanism():
    plan = plan_user_level(population=1000, cohort=100, rounds=10, delta=1e-5,
                           coordinates=40_000, accountant="rdp", noise_multiplier=2.0)
    assert plan.noise_std_over_clip == pytest.approx(2.0 / 100)  # sigma C / m, over C
    assert plan.noise_to_signal == pytest.approx(2.0 * math.sqrt(40_000) / 100)  # = 4
    assert plan.epsilon == pytest.approx(_independent_epsilon(0.1, 2.0, 10, 1e-5), rel=0.02)


def test_the_named_cohort_is_the_smallest_that_is_not_swamped():
    """At the named cohort the noise that keeps the ratio at 1 still meets the target, one
    phone fewer it does not: checked with the independent accountant."""
    population, d = 5000, 100_000
    plan = plan_user_level(population=population, cohort=10, rounds=5, delta=1e-5,
                           coordinates=d, accountant="rdp", target_epsilon=8.0)
    assert plan.noise_to_signal > 1
    cohort = smallest_useful_cohort(plan, target_epsilon=8.0, accountant="rdp")
    assert cohort is not None and 10 < cohort <= population

    def epsilon_at_ratio_one(m: int) -> float:
        return _independent_epsilon(m / population, m / math.sqrt(d), 5, 1e-5)

    assert epsilon_at_ratio_one(cohort) <= 8.0 * 1.02
    assert epsilon_at_ratio_one(cohort - 1) > 8.0 * 0.98


def test_when_no_cohort_helps_it_says_so_in_one_line():
    plan = plan_user_level(population=20, cohort=5, rounds=5, delta=1e-5,
                           coordinates=1_000_000, accountant="rdp", target_epsilon=8.0)
    assert smallest_useful_cohort(plan, target_epsilon=8.0, accountant="rdp") is None
    lines = report(plan, clip=0.5, accountant="rdp", target=8.0, useful=None)
    assert "swamps" in lines[-3] and lines[-1].startswith("no cohort up to the whole population")


def test_the_ftrl_plan_meets_its_target_and_names_a_cohort_it_checks():
    """DP-FTRL's plan: epsilon from the tree accountant equals the target; at the named cohort
    (separation N // m) the ratio-one noise meets the target, one phone fewer it does not."""
    from fedmilm.privacy.tree import TreeAccountant

    population, d, rounds = 4000, 50_000, 40
    plan = plan_user_level(population=population, cohort=20, rounds=rounds, delta=1e-6,
                           coordinates=d, accountant="rdp", target_epsilon=8.0,
                           mechanism="ftrl")
    assert plan.min_separation == 200 and plan.epsilon == pytest.approx(8.0, rel=1e-6)
    assert plan.model_noise_over_clip == pytest.approx(plan.noise_std_over_clip
                                                       * math.sqrt(bin(40).count("1")))
    cohort = smallest_useful_cohort(plan, target_epsilon=8.0, accountant="rdp")
    assert cohort is not None

    def epsilon_at_ratio_one(m: int) -> float:
        tree = TreeAccountant(m / math.sqrt(d), population // m, None)
        return tree.epsilon(1e-6, rounds)

    assert epsilon_at_ratio_one(cohort) <= 8.0 < epsilon_at_ratio_one(cohort - 1)


def test_the_phones_noise_counts_in_the_plan_and_the_cohort_it_names():
    """Distributed noise is fresh every round: it adds to a round's noise and to all T rounds'
    noise in the model, and the named cohort leaves room for it under the ratio."""
    from fedmilm.privacy.tree import TreeAccountant

    population, d, rounds = 4000, 50_000, 40
    common = dict(population=population, cohort=20, rounds=rounds, delta=1e-6, coordinates=d,
                  accountant="rdp", noise_multiplier=3.0, mechanism="ftrl")
    plain, both = plan_user_level(**common), plan_user_level(**common, distributed_noise=4.0)
    assert both.noise_to_signal == pytest.approx(plain.noise_to_signal * 5 / 3)  # hypot(3, 4)
    tree_draws = bin(rounds % 200).count("1")  # one tree of 200 leaves, 40 rounds in
    assert both.model_noise_over_clip == pytest.approx(
        math.sqrt(tree_draws * 9 + rounds * 16) / 20)
    cohort = smallest_useful_cohort(both, target_epsilon=plain.epsilon, accountant="rdp")
    assert cohort is not None

    def central_room(m: int) -> float:  # the largest tree noise the ratio 1 leaves
        return math.sqrt(max((m / math.sqrt(d)) ** 2 - 16, 1e-300))

    def meets(m: int) -> bool:
        return (m / math.sqrt(d)) ** 2 > 16 and TreeAccountant(
            central_room(m), population // m, None).epsilon(1e-6, rounds) <= plain.epsilon

    assert meets(cohort) and not meets(cohort - 1)
    lines = report(both, clip=1.0, accountant="rdp", target=None, useful=cohort,
                   server=(2.5, 15))
    assert any("epsilon 2.5 against the server itself (at least 15 shares" in line
               for line in lines)


def test_simulate_refuses_a_swamped_run_naming_the_cohort_and_the_override(capsys):
    from fedmilm.cli.common import check_signal
    from fedmilm.privacy.calibrate import resolve_privacy
    from tests.conftest import tiny_config

    run = ("privacy=user", "privacy.accountant=rdp", "privacy.user.noise_multiplier=null",
           "privacy.user.target_epsilon=8",
           "federation.num_clients=2000", "federation.clients_per_round=5", "federation.rounds=5")
    cfg = resolve_privacy(tiny_config(*run))
    with pytest.raises(SystemExit) as stop:
        check_signal(cfg, coordinates=100_000)
    line = capsys.readouterr().err.strip()
    assert stop.value.code == 2 and len(line.splitlines()) == 1
    assert "swamps the signal" in line and "privacy.user.allow_swamped=true" in line
    cohort = int(line.split("a cohort of ")[1].split()[0])

    limit = cfg.privacy.user.max_noise_to_signal
    assert f"max_noise_to_signal={limit:g}" in line

    def epsilon_at_the_limit(m: int) -> float:
        return _independent_epsilon(m / 2000, limit * m / math.sqrt(100_000), 5,
                                    cfg.privacy.delta)

    assert epsilon_at_the_limit(cohort) <= 8.0 * 1.02 < epsilon_at_the_limit(cohort - 1) * 1.04
    check_signal(resolve_privacy(tiny_config(*run, "privacy.user.allow_swamped=true")),
                 coordinates=100_000)  # a warning, no exit
    check_signal(cfg, coordinates=10)  # not swamped: nothing to say
