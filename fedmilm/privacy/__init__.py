"""Differential privacy: accountants, the per-phone ledger, calibration, user-level DP."""

from fedmilm.privacy.accountant import ACCOUNTANTS, Accountant
from fedmilm.privacy.ledger import BudgetExceeded, LedgerError, PrivacyLedger

__all__ = ["ACCOUNTANTS", "Accountant", "BudgetExceeded", "LedgerError", "PrivacyLedger"]
