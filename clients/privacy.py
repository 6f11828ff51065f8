"""The phone's side of privacy: its own policy, its persistent DP-SGD ledger, its randomness."""

from __future__ import annotations

from fedmilm.clients.storage import DeviceStorage
from fedmilm.config import FedMilmConfig
from fedmilm.privacy import LedgerError, PrivacyLedger
from fedmilm.privacy.calibrate import phone_sample_noise
from fedmilm.privacy.policy import PhonePolicy
from fedmilm.privacy.randomness import private_random
from fedmilm.training import DpSgd, dp_sample_rate, planned_steps

LEDGER_FILE = "privacy_ledger.json"


def open_ledger(cfg: FedMilmConfig, policy: PhonePolicy, storage: DeviceStorage) -> PrivacyLedger:
    """The phone's ledger from its own storage (empty on a phone that never trained).

    Raises `LedgerError` when the ledger is missing next to trained state, unreadable, fails
    its checksum, or has fewer trainings than the phone recorded: a phone whose budget may
    have been reset must not train.
    """
    ledger = PrivacyLedger(mechanism=cfg.privacy.accountant, delta=policy.delta,
                           target_epsilon=policy.sample_target(cfg.privacy.sample.target_epsilon))
    path, recorded = storage.folder / LEDGER_FILE, storage.ledger_trainings()
    if not path.is_file() and recorded is not None and recorded != 0:
        raise LedgerError(f"{path} is missing next to this phone's trained state")
    ledger.load(path)
    if recorded is not None and recorded > 0 and ledger.trainings < recorded:
        raise LedgerError(f"{path} holds {ledger.trainings} trainings, the phone recorded "
                          f"{recorded}: it was rolled back")
    return ledger


def dp_sgd_for(cfg: FedMilmConfig, ledger: PrivacyLedger, num_examples: int, *,
               noise: float, test_seed: int | None) -> DpSgd:
    """DP-SGD settings for this round; raises `BudgetExceeded` if the phone must decline.
    The batch masks and noise come from a fresh CSPRNG unless a test seeds them."""
    delta = ledger.delta
    if delta >= 1 / num_examples:
        raise ValueError(f"delta={delta:g} must be < 1/n = {1 / num_examples:.3g} for this "
                         f"phone's n={num_examples} training interactions")
    batch = cfg.train.batch_size
    ledger.check_affordable(noise_multiplier=noise,
                            sample_rate=dp_sample_rate(num_examples, batch_size=batch),
                            steps=planned_steps(num_examples, epochs=cfg.train.epochs,
                                                batch_size=batch))
    return DpSgd(noise_multiplier=noise, max_grad_norm=cfg.privacy.sample.max_grad_norm,
                 accountant=ledger.accountant, random=private_random(test_seed))


def sample_noise_for(cfg: FedMilmConfig, policy: PhonePolicy, num_examples: int) -> float:
    """The DP-SGD noise multiplier this phone trains with (calibrated from its own n when the
    run gives a target); `ValueError` when no noise meets its budget."""
    return phone_sample_noise(cfg, n=num_examples,
                              target=policy.sample_target(cfg.privacy.sample.target_epsilon))
