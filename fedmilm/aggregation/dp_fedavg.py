"""User-level DP-FedAvg with Poisson cohorts (McMahan et al. 2018): its guarantee rests on the
amplification by sampling, so who trains must be the private coin flips drawn here."""

from __future__ import annotations

import random
from typing import Any

from fedmilm.adapters.space import State
from fedmilm.aggregation.user_dp import UserLevelDp
from fedmilm.config.schema import FedMilmConfig
from fedmilm.privacy.accountant import Accountant
from fedmilm.privacy.calibrate import user_sample_rate
from fedmilm.privacy.user_level import noised_total


class DpFedAvg(UserLevelDp):
    """Poisson cohort with rate q = clients_per_round / num_clients, Gaussian noise of std
    sigma C on the sum, one subsampled-Gaussian accountant step per round.

    The cohort comes from the CSPRNG (`privacy.seeded_noise` aside): a cohort anyone could
    recompute from the config would void the amplification."""

    kind = "dp-fedavg"

    def __init__(self, cfg: FedMilmConfig) -> None:
        super().__init__(cfg)
        self.rate = user_sample_rate(cfg)
        self.accountant = Accountant(cfg.privacy.accountant)

    def cohort(self, nodes: list[int], sampler: random.Random,
               server_round: int = 0) -> list[int]:
        """Each phone independently with probability q, from the private randomness (the
        server's seeded `sampler` is not used: it is reproducible from the config)."""
        draws = self.random.uniform(len(nodes)).tolist()
        return [n for n, u in zip(nodes, draws, strict=True) if u < self.rate]

    def charge(self, rounds: int) -> None:
        self.accountant.step(noise_multiplier=self.noise, sample_rate=self.rate,
                             num_steps=rounds)

    def release(self, total: State) -> State:
        return noised_total(total, clip_norm=self.clip, noise_multiplier=self.update_noise,
                            expected_clients=self.expected, random=self.random)

    def epsilon(self) -> float | None:
        return self.accountant.epsilon(self.delta)

    def epsilon_ahead(self) -> float:
        return self.accountant.epsilon_after(self.delta, noise_multiplier=self.noise,
                                             sample_rate=self.rate, num_steps=1)

    def accountant_state(self) -> dict | None:
        """The full (sigma, q, steps) history: anyone can recompute epsilon from it."""
        return {"delta": self.delta, **self.accountant.state_dict()}

    def _own_state(self) -> dict[str, Any]:
        return {"accountant": self.accountant.state_dict()}

    def _load_own_state(self, state: dict[str, Any]) -> None:
        self.accountant.load_state_dict(state["accountant"])
