"""Differential privacy: accountants, the per-phone ledger, calibration, user-level DP."""

from fedmilm.privacy.accountant import ACCOUNTANTS, Accountant
from fedmilm.privacy.ledger import BudgetExceeded, PrivacyLedger

__all__ = ["ACCOUNTANTS", "Accountant", "BudgetExceeded", "PrivacyLedger"]
