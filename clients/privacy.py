"""The phone's side of privacy: its persistent DP-SGD ledger and what it may release."""

from __future__ import annotations

from pathlib import Path

from fedmilm.config import FedMilmConfig
from fedmilm.privacy import PrivacyLedger
from fedmilm.training import DpSgd, dp_sample_rate, planned_steps

LEDGER_FILE = "privacy_ledger.json"


def open_ledger(cfg: FedMilmConfig, folder: Path) -> PrivacyLedger:
    """The phone's ledger, restored from its storage (empty on a phone's first round)."""
    priv = cfg.privacy
    ledger = PrivacyLedger(mechanism=priv.accountant, delta=priv.delta,
                           target_epsilon=priv.sample.target_epsilon)
    ledger.load(folder / LEDGER_FILE)
    return ledger


def dp_sgd_for(cfg: FedMilmConfig, ledger: PrivacyLedger, num_examples: int) -> DpSgd:
    """DP-SGD settings for this round; raises `BudgetExceeded` if the phone must decline."""
    sample, delta = cfg.privacy.sample, cfg.privacy.delta
    assert sample.noise_multiplier is not None, "noise is calibrated before the run starts"
    if delta >= 1 / num_examples:
        raise ValueError(f"privacy.delta={delta:g} must be < 1/n = {1 / num_examples:.3g} for "
                         f"this phone's n={num_examples} training interactions")
    batch = cfg.train.batch_size
    ledger.check_affordable(noise_multiplier=sample.noise_multiplier,
                            sample_rate=dp_sample_rate(num_examples, batch_size=batch),
                            steps=planned_steps(num_examples, epochs=cfg.train.epochs,
                                                batch_size=batch))
    return DpSgd(noise_multiplier=sample.noise_multiplier, max_grad_norm=sample.max_grad_norm,
                 accountant=ledger.accountant)
