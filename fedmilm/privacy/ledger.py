"""A phone's privacy ledger: its accountant, its budget, persisted in its own storage."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from fedmilm.privacy.accountant import Accountant


class BudgetExceeded(RuntimeError):
    """Training now would push the cumulative epsilon past the target."""


class LedgerError(ValueError):
    """The ledger is unreadable, corrupt or inconsistent: the phone must not train."""


def _digest(body: dict) -> str:
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()


class PrivacyLedger:
    """Composes every DP-SGD step a phone ever took, across rounds and restarts."""

    def __init__(self, *, mechanism: str, delta: float, target_epsilon: float | None) -> None:
        self.accountant = Accountant(mechanism)
        self.delta = delta
        self.target_epsilon = target_epsilon
        self.trainings = 0  # local trainings charged: known to the server, so it may travel

    @property
    def epsilon(self) -> float:
        return self.accountant.epsilon(self.delta)

    def check_affordable(self, *, noise_multiplier: float, sample_rate: float,
                         steps: int) -> None:
        """Raise `BudgetExceeded` if `steps` more DP-SGD steps would exceed the target."""
        if self.target_epsilon is None:
            return
        after = self.accountant.epsilon_after(self.delta, noise_multiplier=noise_multiplier,
                                              sample_rate=sample_rate, num_steps=steps)
        if after > self.target_epsilon:
            raise BudgetExceeded(f"training would raise epsilon to {after:.3g} > target "
                                 f"{self.target_epsilon:g} (spent {self.epsilon:.3g})")

    def save(self, path: Path) -> None:
        """Atomic JSON write with a checksum: the ledger is the one file a phone must never
        lose or silently corrupt."""
        path.parent.mkdir(parents=True, exist_ok=True)
        body = {"delta": self.delta, "trainings": self.trainings,
                **self.accountant.state_dict()}
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps({**body, "sha256": _digest(body)}))
        os.replace(tmp, path)

    def load(self, path: Path) -> None:
        """Restore from `path` (a new phone has none); `LedgerError` when the file is
        unreadable, fails its checksum, or accounts at another delta."""
        if not path.is_file():
            return
        try:
            body = json.loads(path.read_text())
            digest = body.pop("sha256")
            if digest != _digest(body):
                raise LedgerError(f"{path}: checksum mismatch (corrupt or edited)")
            if body.pop("delta") != self.delta:
                raise LedgerError(f"{path} accounts at another delta than this phone's policy "
                                  f"({self.delta:g}); the delta must not change for a phone")
            self.trainings = int(body.pop("trainings"))
            self.accountant.load_state_dict(body)
        except LedgerError:
            raise
        except (ValueError, KeyError, TypeError, AttributeError) as err:
            raise LedgerError(f"{path}: unreadable privacy ledger ({err})") from err
