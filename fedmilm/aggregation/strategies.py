"""How the server picks each round's cohort and turns accepted updates into a global step.

Implementations behind one small interface, chosen by the privacy settings: `FedAvg` (uniform
cohort without replacement, example-weighted mean, here) and, under user-level DP,
`DpFedAvg` (Poisson cohort, `dp_fedavg.py`) or `DpFtrl` (tree aggregation under a minimum
separation between a phone's rounds, `dp_ftrl.py`).
"""

from __future__ import annotations

import random
from typing import Any, Protocol

from fedmilm.adapters.space import State
from fedmilm.aggregation.robust import robust_mean
from fedmilm.aggregation.streaming import BufferedUpdates, RoundSum, RunningMean
from fedmilm.config.schema import FedMilmConfig


class Aggregator(Protocol):
    """The server's per-round decisions."""

    max_update_norm: float
    round_clip: float | None  # adaptive clipping: the clip phones are told this round

    def vote(self, within_clip: float) -> None:
        """A phone's +-0.5 clip vote (adaptive clipping)."""
        ...

    def cohort(self, nodes: list[int], sampler: random.Random, server_round: int) -> list[int]:
        """This round's phones among the eligible `nodes`."""
        ...

    def may_continue(self) -> bool: ...

    def start_round(self) -> RoundSum:
        """An empty round: replies are folded into it as they arrive."""
        ...

    def weight_of(self, num_examples: int) -> float:
        """The weight a reply claiming `num_examples` examples gets."""
        ...

    def finish_round(self, round_sum: RoundSum, reference: State) -> State | None:
        """The global step from everything folded in (None: the round is skipped)."""
        ...

    def aggregate_secure(self, mean: State | None, count: int,
                         reference: State) -> State | None:
        """The global step from a securely aggregated mean of `count` updates."""
        ...

    def epsilon(self) -> float | None: ...

    def epsilon_server(self) -> float | None:
        """Epsilon against the server operator itself (distributed noise), None: no bound."""
        ...

    def charge_lost_rounds(self, rounds: int) -> None:
        """Account `rounds` rounds whose state was lost but whose release may have happened."""
        ...

    def accountant_state(self) -> dict | None: ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


class FedAvg:
    """Uniform sampling of a fixed-size cohort; mean of updates weighted by examples, or one of
    Flower's robust rules (`aggregation.method`)."""

    def __init__(self, cfg: FedMilmConfig) -> None:
        self.k, self.min_replies = cfg.federation.clients_per_round, cfg.federation.min_replies
        self.max_update_norm = cfg.federation.max_update_norm
        # A phone's example count is its own claim: it weighs at most what a phone can hold
        # (data.train_per_user, plus planted canaries in an audit), never more.
        data = cfg.data
        self.max_weight = data.train_per_user + (data.canary_repeats if data.canary_users else 0)
        self.method = cfg.aggregation.method
        self.trim_fraction = cfg.aggregation.trim_fraction
        self.byzantine = cfg.aggregation.krum_byzantine

    round_clip = None

    def vote(self, within_clip: float) -> None:
        return None

    def cohort(self, nodes: list[int], sampler: random.Random,
               server_round: int = 0) -> list[int]:
        return sorted(sampler.sample(nodes, min(self.k, len(nodes))))

    def may_continue(self) -> bool:
        return True

    def start_round(self) -> RoundSum:
        """A running mean (memory of one adapter; per rank component with heterogeneous
        ranks), except for the robust rules, which need every update at once."""
        return RunningMean() if self.method == "fedavg" else BufferedUpdates()

    def weight_of(self, num_examples: int) -> float:
        return float(min(num_examples, self.max_weight))

    def finish_round(self, round_sum: RoundSum, reference: State) -> State | None:
        if round_sum.count < self.min_replies:
            return None
        if isinstance(round_sum, RunningMean):
            return round_sum.mean()
        return robust_mean(round_sum.updates, method=self.method,
                           trim_fraction=self.trim_fraction, byzantine=self.byzantine)

    def aggregate_secure(self, mean: State | None, count: int,
                         reference: State) -> State | None:
        return mean if mean is not None and count >= self.min_replies else None

    def epsilon(self) -> float | None:
        return None

    def epsilon_server(self) -> float | None:
        return None

    def charge_lost_rounds(self, rounds: int) -> None:
        return None

    def accountant_state(self) -> dict | None:
        return None

    def state_dict(self) -> dict[str, Any]:
        return {"kind": "fedavg"}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("kind") != "fedavg":
            raise ValueError(f"checkpoint holds a {state.get('kind')!r} aggregator, not fedavg")


def create_aggregator(cfg: FedMilmConfig, coordinates: int | None = None) -> Aggregator:
    """Under user-level DP the mechanism `privacy.user.mechanism` names, else plain `FedAvg`.
    `coordinates`: numbers in the global adapter (needed with distributed noise)."""
    if not cfg.privacy.user_level:
        return FedAvg(cfg)
    from fedmilm.aggregation.dp_fedavg import DpFedAvg
    from fedmilm.aggregation.dp_ftrl import DpFtrl

    return (DpFtrl(cfg, coordinates) if cfg.privacy.user.mechanism == "ftrl"
            else DpFedAvg(cfg))


def aggregate_all(aggregator: Aggregator, updates: list[State], num_examples: list[int],
                  reference: State, ranks: list[int] | None = None) -> State | None:
    """The global step from a whole list of updates at once (tests, benchmarks): the same
    fold the server does reply by reply."""
    round_sum = aggregator.start_round()
    for i, update in enumerate(updates):
        round_sum.add(update, aggregator.weight_of(num_examples[i]),
                      None if ranks is None else ranks[i])
    return aggregator.finish_round(round_sum, reference)
