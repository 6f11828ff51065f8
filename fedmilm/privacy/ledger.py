"""A phone's privacy ledger: its accountant, its budget, persisted in its own storage."""

from __future__ import annotations

import json
import os
from pathlib import Path

from fedmilm.privacy.accountant import Accountant


class BudgetExceeded(RuntimeError):
    """Training now would push the cumulative epsilon past the target."""


class PrivacyLedger:
    """Composes every DP-SGD step a phone ever took, across rounds and restarts."""

    def __init__(self, *, mechanism: str, delta: float, target_epsilon: float | None) -> None:
        self.accountant = Accountant(mechanism)
        self.delta = delta
        self.target_epsilon = target_epsilon

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
        """Atomic JSON write: the ledger is the one file a phone must never lose."""
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps({"delta": self.delta, **self.accountant.state_dict()}))
        os.replace(tmp, path)

    def load(self, path: Path) -> None:
        """Restore from `path` if it exists (a new phone starts with an empty ledger)."""
        if not path.is_file():
            return
        state = json.loads(path.read_text())
        if state.get("delta") != self.delta:
            raise ValueError(f"{path} accounts for delta={state.get('delta')}, the run uses "
                             f"delta={self.delta}; privacy.delta must not change for a phone")
        state.pop("delta")
        self.accountant.load_state_dict(state)
