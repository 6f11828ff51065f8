"""Pluggable privacy accountants over the history of subsampled Gaussian mechanisms.

The state is only the input history [(noise_multiplier, sample_rate, steps), ...]; epsilon is
always derived from it, never stored. The maths is Opacus's (RDP: Mironov et al. 2019; PRV:
Gopi et al. 2021, which returns an upper bound); tests check both against Google's
`dp-accounting`, an independent implementation. The same object is handed to Opacus's
`DPOptimizer` step hook, so DP-SGD charges the very accountant the phone's ledger persists.
"""

from __future__ import annotations

import copy
import math
import warnings
from typing import Any

from opacus.accountants import IAccountant, PRVAccountant, RDPAccountant

FORMAT_VERSION = 1
PRV_MIN_NOISE = 0.1  # below this noise multiplier Opacus's PRV is unusable (see `epsilon`)
ACCOUNTANTS: dict[str, type[IAccountant]] = {"prv": PRVAccountant, "rdp": RDPAccountant}


class Accountant:
    """An Opacus accountant plus JSON-safe state and a look-ahead for budget checks."""

    def __init__(self, mechanism: str) -> None:
        if mechanism not in ACCOUNTANTS:
            raise ValueError(f"accountant {mechanism!r} is unknown; choose one of "
                             f"{', '.join(sorted(ACCOUNTANTS))}")
        self.mechanism = mechanism
        self.opacus: IAccountant = ACCOUNTANTS[mechanism]()

    @property
    def history(self) -> list[tuple[float, float, int]]:
        return self.opacus.history

    @property
    def steps(self) -> int:
        """Number of mechanism invocations so far (not the number of history entries)."""
        return sum(steps for _, _, steps in self.history)

    def step(self, *, noise_multiplier: float, sample_rate: float, num_steps: int = 1) -> None:
        """Record `num_steps` invocations of the subsampled Gaussian mechanism."""
        if num_steps < 1:
            raise ValueError("num_steps must be >= 1")
        last = self.history[-1] if self.history else None
        if last is not None and last[:2] == (noise_multiplier, sample_rate):
            self.history[-1] = (noise_multiplier, sample_rate, last[2] + num_steps)
        else:
            self.history.append((noise_multiplier, sample_rate, num_steps))

    def epsilon(self, delta: float) -> float:
        """An upper bound on epsilon at `delta` for everything recorded (0 before any step).
        Opacus's PRV breaks down at tiny noise multipliers (below PRV_MIN_NOISE it hangs or
        returns inf, raises at some; epsilons there are in the hundreds and beyond): RDP's
        bound over the same history, looser but still an upper bound, is returned instead."""
        if not self.history:
            return 0.0
        if self.mechanism != "prv":
            return float(self.opacus.get_epsilon(delta=delta))
        if min(sigma for sigma, _, _ in self.history) >= PRV_MIN_NOISE:
            try:
                value = float(self.opacus.get_epsilon(delta=delta))
                if math.isfinite(value):
                    return value
            except (RuntimeError, ValueError, OverflowError):
                pass
        fallback = RDPAccountant()
        fallback.history = list(self.history)
        with warnings.catch_warnings():  # an edge order only loosens the bound: the safe side
            warnings.filterwarnings("ignore", message="Optimal order is the")
            return float(fallback.get_epsilon(delta=delta))

    def epsilon_after(self, delta: float, *, noise_multiplier: float, sample_rate: float,
                      num_steps: int) -> float:
        """Epsilon if `num_steps` more steps were taken (nothing is recorded)."""
        ahead = Accountant(self.mechanism)
        ahead.load_state_dict(self.state_dict())
        ahead.step(noise_multiplier=noise_multiplier, sample_rate=sample_rate,
                   num_steps=num_steps)
        return ahead.epsilon(delta)

    def state_dict(self) -> dict[str, Any]:
        return {"version": FORMAT_VERSION, "mechanism": self.mechanism,
                "history": [list(entry) for entry in copy.deepcopy(self.history)]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a saved state; refuses empty, incomplete or foreign states."""
        if not state:
            raise ValueError("empty accountant state")
        missing = {"version", "mechanism", "history"} - set(state)
        if missing:
            raise ValueError(f"accountant state lacks {sorted(missing)}")
        if state["mechanism"] != self.mechanism:
            raise ValueError(f"accountant state is for {state['mechanism']!r}, "
                             f"not {self.mechanism!r}")
        if state["version"] != FORMAT_VERSION:
            raise ValueError(f"accountant state version {state['version']} is not supported")
        self.opacus.history = [(float(s), float(q), int(n)) for s, q, n in state["history"]]
