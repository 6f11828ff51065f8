from __future__ import annotations

import pytest

from fedmilm.config import ConfigError
from fedmilm.privacy import BudgetExceeded, PrivacyLedger
from fedmilm.privacy.calibrate import resolve_privacy, sample_plan, user_sample_rate
from tests.conftest import tiny_config


def test_ledger_persists_and_composes_across_restarts(tmp_path):
    path = tmp_path / "ledger.json"
    first = PrivacyLedger(mechanism="prv", delta=1e-5, target_epsilon=None)
    first.accountant.step(noise_multiplier=1.0, sample_rate=0.5, num_steps=4)
    first.save(path)
    again = PrivacyLedger(mechanism="prv", delta=1e-5, target_epsilon=None)
    again.load(path)
    assert again.epsilon == pytest.approx(first.epsilon)
    again.accountant.step(noise_multiplier=1.0, sample_rate=0.5, num_steps=4)
    assert again.epsilon > first.epsilon  # never reset between rounds


def test_ledger_refuses_training_past_the_target():
    ledger = PrivacyLedger(mechanism="rdp", delta=1e-5, target_epsilon=5.0)
    ledger.check_affordable(noise_multiplier=2.0, sample_rate=0.1, steps=10)
    ledger.accountant.step(noise_multiplier=2.0, sample_rate=0.1, num_steps=10)
    assert ledger.epsilon < 5
    with pytest.raises(BudgetExceeded, match="target 5"):
        ledger.check_affordable(noise_multiplier=1.0, sample_rate=0.5, steps=10)


def test_ledger_refuses_a_changed_delta(tmp_path):
    path = tmp_path / "ledger.json"
    PrivacyLedger(mechanism="prv", delta=1e-5, target_epsilon=None).save(path)
    with pytest.raises(ValueError, match="privacy.delta"):
        PrivacyLedger(mechanism="prv", delta=1e-6, target_epsilon=None).load(path)


@pytest.mark.parametrize("level,target", [("sample", 3.0), ("sample", 12.0), ("user", 2.0),
                                          ("user", 20.0)])
def test_calibrated_noise_meets_the_target(level, target):
    """Property: the planned run at the calibrated noise never exceeds the target epsilon."""
    from fedmilm.privacy import Accountant

    cfg = resolve_privacy(tiny_config(
        f"privacy={level}", f"privacy.{level}.noise_multiplier=null",
        f"privacy.{level}.target_epsilon={target}", "federation.rounds=10"))
    if level == "sample":
        q, steps, rounds = sample_plan(cfg)
        sigma, steps = cfg.privacy.sample.noise_multiplier, steps * rounds
    else:
        q, sigma, steps = user_sample_rate(cfg), cfg.privacy.user.noise_multiplier, 10
    accountant = Accountant(cfg.privacy.accountant)
    accountant.step(noise_multiplier=sigma, sample_rate=q, num_steps=steps)
    achieved = accountant.epsilon(cfg.privacy.delta)
    assert 0.9 * target <= achieved <= target


@pytest.mark.parametrize("overrides,needle", [
    (["privacy=sample", "privacy.sample.noise_multiplier=-1"], "privacy.sample.noise_multiplier"),
    (["privacy=user", "privacy.delta=0.1"], "privacy.delta"),
    (["privacy=sample", "privacy.delta=0.5"], "privacy.delta"),
    (["privacy=sample", "train.batch_size=1"], "train.batch_size"),
    (["privacy=user", "privacy.user.noise_multiplier=null"], "both null"),
    (["privacy=user", "federation.clients_per_round=1", "federation.min_replies=1"],
     "clients_per_round"),
    (["privacy=sample", "lora.variant=ffa", "personalization=fedsa"], "lora.variant=ffa"),
])
def test_bad_privacy_configs_stop_with_the_key(overrides, needle):
    with pytest.raises(ConfigError, match=needle):
        tiny_config(*overrides)


@pytest.mark.parametrize("level", ["sample", "user"])
def test_target_already_exceeded_by_one_round_is_refused(level):
    cfg = tiny_config(f"privacy={level}", f"privacy.{level}.noise_multiplier=0.5",
                      f"privacy.{level}.target_epsilon=0.05")
    with pytest.raises(ConfigError, match=f"privacy.{level}.target_epsilon"):
        resolve_privacy(cfg)
