"""User-level DP-FTRL (Kairouz et al. 2021): tree-aggregated noise, no sampling assumption.

Who trains may be decided by anything public (the seeded sampler, device availability), as
long as a phone trains at most once every `min_separation` rounds and at most
`max_participations` times: the server enforces both here, from participation records kept in
the checkpoint (who took part is public under this mechanism; what they sent is not).
"""

from __future__ import annotations

import logging
import random
from dataclasses import asdict
from typing import Any

from fedmilm.adapters.space import State
from fedmilm.aggregation.user_dp import UserLevelDp
from fedmilm.config.schema import FedMilmConfig
from fedmilm.privacy.distributed import distributed_noise_for
from fedmilm.privacy.tree import TreeAccountant, TreeNoise

log = logging.getLogger("fedmilm.server")


class DpFtrl(UserLevelDp):
    """Each round releases the change of the tree's noisy prefix sum over the expected cohort;
    the tree (noise std sigma C per node) restarts every `min_separation` rounds and at a
    resume (its nodes live only in memory). With adaptive clipping the clip changes only when a
    tree starts."""

    kind = "dp-ftrl"

    def __init__(self, cfg: FedMilmConfig, coordinates: int | None = None) -> None:
        super().__init__(cfg)
        user = cfg.privacy.user
        assert user.min_separation is not None, "the separation is resolved before the run"
        self.separation, self.cap = user.min_separation, user.max_participations
        self.accountant = TreeAccountant(self.noise, self.separation, self.cap)
        self.tree = TreeNoise(self.random, std=self.update_noise * self.clip,
                              leaves_per_tree=self.separation)
        self.distributed = None if coordinates is None else distributed_noise_for(
            cfg, coordinates)
        assert self.distributed is not None or not cfg.privacy.user.distributed_noise, \
            "distributed noise needs the adapter's size"
        self.last_round: dict[int, int] = {}   # device -> the last round it was sent training
        self.participations: dict[int, int] = {}

    def eligible(self, nodes: list[int], server_round: int) -> list[int]:
        """The phones the separation and the cap allow in `server_round`."""
        return [n for n in nodes
                if server_round - self.last_round.get(n, -self.separation) >= self.separation
                and (self.cap is None or self.participations.get(n, 0) < self.cap)]

    def cohort(self, nodes: list[int], sampler: random.Random, server_round: int) -> list[int]:
        """Up to `clients_per_round` eligible phones, uniformly (the sampler is public: nothing
        rests on it). A phone counts as having taken part once it is sent the round, whether
        or not it replies."""
        allowed = self.eligible(nodes, server_round)
        if len(allowed) < self.expected:
            log.warning("round %d: only %d phones may train under privacy.user.min_separation="
                        "%d%s; the cohort shrinks", server_round, len(allowed), self.separation,
                        "" if self.cap is None else f" and max_participations={self.cap}")
        chosen = sorted(sampler.sample(allowed, min(self.expected, len(allowed))))
        if self.adaptive is not None and self.tree.at_boundary:  # a tree has one clip
            self.clip = self.adaptive.clip
            self.tree.std = self.update_noise * self.clip
        for device in chosen:
            self.last_round[device] = server_round
            self.participations[device] = self.participations.get(device, 0) + 1
        return chosen

    def _clip_estimate_moved(self) -> None:
        """The estimate waits for the next tree: its nodes' noise is sized for one clip."""

    def charge(self, rounds: int) -> None:
        self.accountant.step(rounds)

    def charge_lost_rounds(self, rounds: int) -> None:
        self.accountant.charge_lost(rounds)

    def release(self, total: State) -> State:
        noise = self.tree.next_step_noise(total)
        return {k: (v + noise[k]) / self.expected for k, v in total.items()}

    def epsilon(self, rounds: int | None = None) -> float:
        """For readers of the outputs: the tree's guarantee, or the server's when tighter
        (what they read is computed from what the server saw)."""
        central = self.accountant.epsilon(self.delta, rounds)
        server = self.epsilon_server(rounds)
        return central if server is None else min(central, server)

    def epsilon_server(self, rounds: int | None = None) -> float | None:
        """The phones' Skellam noise alone, over the participations one phone can have had
        (public: a function of the rounds, the separation and the cap)."""
        if self.distributed is None:
            return None
        return self.distributed.epsilon(self.accountant.participations(rounds), self.delta)

    def epsilon_ahead(self) -> float:
        return self.epsilon(self.accountant.rounds + 1)

    def accountant_state(self) -> dict | None:
        """Noise, separation, cap and rounds: epsilon follows in closed form (and rho-zCDP);
        with distributed noise its public parameters and epsilon against the server."""
        state = {"delta": self.delta, **self.accountant.state_dict()}
        if self.distributed is not None:
            state["distributed"] = {**asdict(self.distributed),
                                    "epsilon_server": self.epsilon_server()}
        return state

    def _own_state(self) -> dict[str, Any]:
        return {"accountant": self.accountant.state_dict(),
                "last_round": {str(d): r for d, r in self.last_round.items()},
                "participations": {str(d): n for d, n in self.participations.items()}}

    def _load_own_state(self, state: dict[str, Any]) -> None:
        self.accountant.load_state_dict(state["accountant"])
        self.last_round = {int(d): int(r) for d, r in state["last_round"].items()}
        self.participations = {int(d): int(n) for d, n in state["participations"].items()}
