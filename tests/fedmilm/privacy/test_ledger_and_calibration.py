from __future__ import annotations

import pytest

from fedmilm.config import ConfigError
from fedmilm.privacy import BudgetExceeded, LedgerError, PrivacyLedger
from fedmilm.privacy.calibrate import (
    phone_sample_noise,
    resolve_privacy,
    sample_plan,
    user_sample_rate,
)
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
    with pytest.raises(LedgerError, match="delta"):
        PrivacyLedger(mechanism="prv", delta=1e-6, target_epsilon=None).load(path)


@pytest.mark.parametrize("damage", ["edit", "garbage", "truncate"])
def test_ledger_refuses_a_corrupt_or_edited_file(tmp_path, damage):
    path = tmp_path / "ledger.json"
    ledger = PrivacyLedger(mechanism="prv", delta=1e-5, target_epsilon=None)
    ledger.accountant.step(noise_multiplier=1.0, sample_rate=0.5, num_steps=4)
    ledger.save(path)
    text = path.read_text()
    path.write_text({"edit": text.replace('"history": [[1.0, 0.5, 4]]', '"history": []'),
                     "garbage": "\x00\xffnot json", "truncate": text[:20]}[damage])
    with pytest.raises(LedgerError):
        PrivacyLedger(mechanism="prv", delta=1e-5, target_epsilon=None).load(path)


@pytest.mark.parametrize("level,target", [("sample", 3.0), ("sample", 12.0), ("user", 2.0),
                                          ("user", 20.0)])
def test_calibrated_noise_meets_the_target(level, target):
    """Property: the planned run at the calibrated noise never exceeds the target epsilon."""
    from fedmilm.privacy import Accountant

    cfg = resolve_privacy(tiny_config(
        f"privacy={level}", f"privacy.{level}.noise_multiplier=null",
        f"privacy.{level}.target_epsilon={target}", "federation.rounds=10"))
    if level == "sample":  # each phone calibrates with its own n
        q, steps, rounds = sample_plan(cfg)
        sigma = phone_sample_noise(cfg, n=cfg.data.train_per_user, target=target)
        steps = steps * rounds
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
        resolve_privacy(tiny_config(*overrides))


@pytest.mark.parametrize("level", ["sample", "user"])
def test_target_already_exceeded_by_one_round_is_refused(level):
    cfg = tiny_config(f"privacy={level}", f"privacy.{level}.noise_multiplier=0.5",
                      f"privacy.{level}.target_epsilon=0.05")
    with pytest.raises(ConfigError, match=f"privacy.{level}.target_epsilon"):
        resolve_privacy(cfg)


@pytest.mark.parametrize("level", ["sample", "user"])
def test_an_impossible_target_is_one_config_line_naming_the_key(level):
    cfg = tiny_config(f"privacy={level}", f"privacy.{level}.noise_multiplier=null",
                      f"privacy.{level}.target_epsilon=0.000001")
    with pytest.raises(ConfigError) as err:
        resolve_privacy(cfg)
    lines = str(err.value).splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"privacy.{level}.target_epsilon")


def test_each_phone_calibrates_from_its_own_n():
    """jsonl users differ in n: the noise for 10 and for 40 interactions differ, and each
    meets the budget for its own n (a bound on n would make small phones decline at once)."""
    from fedmilm.privacy import Accountant

    cfg = tiny_config("privacy=sample", "privacy.sample.noise_multiplier=null",
                      "privacy.sample.target_epsilon=4", "federation.rounds=6")
    for n in (10, 40):
        sigma = phone_sample_noise(cfg, n=n, target=4.0)
        q, steps, rounds = sample_plan(cfg, n)
        accountant = Accountant(cfg.privacy.accountant)
        accountant.step(noise_multiplier=sigma, sample_rate=q, num_steps=steps * rounds)
        assert 0.9 * 4 <= accountant.epsilon(cfg.privacy.delta) <= 4
    assert phone_sample_noise(cfg, n=10, target=4.0) != phone_sample_noise(cfg, n=40, target=4.0)


def test_a_delta_above_one_over_n_to_the_1_1_warns(caplog):
    n = tiny_config("privacy=user").federation.num_clients
    weak = (n ** -1.1 + 1 / n) / 2  # between the two bounds: allowed, with a warning
    resolve_privacy(tiny_config("privacy=user", f"privacy.delta={weak}"))
    assert "1/n^1.1" in caplog.text
