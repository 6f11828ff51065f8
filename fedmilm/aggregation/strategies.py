"""How the server picks each round's cohort and turns accepted updates into a global step.

Two implementations behind one small interface, chosen by the privacy mode:
`FedAvg` (uniform cohort without replacement, example-weighted mean) and `DpFedAvg`
(Poisson cohort, clipped updates, noised fixed-denominator mean, accounted every round).
"""

from __future__ import annotations

import base64
import random
from typing import Any, Protocol

import torch

from fedmilm.adapters.space import State
from fedmilm.aggregation.robust import robust_mean
from fedmilm.aggregation.streaming import BufferedUpdates, RoundSum, RunningMean
from fedmilm.config.schema import FedMilmConfig
from fedmilm.privacy.accountant import Accountant
from fedmilm.privacy.calibrate import user_sample_rate
from fedmilm.privacy.randomness import SeededRandom, private_random
from fedmilm.privacy.user_level import noised_total

CLIP_SLACK = 1e-3  # relative float32 slack allowed on a client's clipped norm


class Aggregator(Protocol):
    """The server's per-round decisions."""

    max_update_norm: float

    def cohort(self, nodes: list[int], sampler: random.Random) -> list[int]: ...

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

    def cohort(self, nodes: list[int], sampler: random.Random) -> list[int]:
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

    def charge_lost_rounds(self, rounds: int) -> None:
        return None

    def accountant_state(self) -> dict | None:
        return None

    def state_dict(self) -> dict[str, Any]:
        return {"kind": "fedavg"}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("kind") != "fedavg":
            raise ValueError(f"checkpoint holds a {state.get('kind')!r} aggregator, not fedavg")


class DpFedAvg:
    """User-level DP-FedAvg: Poisson cohort with rate q = clients_per_round / num_clients,
    equal weights, Gaussian noise on the sum, one accountant step per round.

    The cohort and the noise come from a CSPRNG (`privacy.seeded_noise` aside): a cohort anyone
    could recompute from the config would void the amplification by sampling. A round is never
    skipped for too few replies: the fixed-denominator mean is private whatever number arrived,
    while a skip decided on the exact count would release that count unnoised."""

    def __init__(self, cfg: FedMilmConfig) -> None:
        user, fed = cfg.privacy.user, cfg.federation
        assert user.noise_multiplier is not None, "noise is calibrated before the run starts"
        self.noise, self.clip = user.noise_multiplier, user.clip_norm
        self.rate = user_sample_rate(cfg)
        self.expected = fed.clients_per_round
        self.target = user.target_epsilon
        self.delta = cfg.privacy.delta
        self.max_update_norm = self.clip * (1 + CLIP_SLACK)  # updates must arrive clipped
        self.accountant = Accountant(cfg.privacy.accountant)
        self.seeded = cfg.privacy.seeded_noise
        self.random = private_random(cfg.seed if self.seeded else None)

    def cohort(self, nodes: list[int], sampler: random.Random) -> list[int]:
        """Each phone independently with probability q, from the private randomness (the
        server's seeded `sampler` is not used: it is reproducible from the config)."""
        draws = self.random.uniform(len(nodes)).tolist()
        return [n for n, u in zip(nodes, draws, strict=True) if u < self.rate]

    def may_continue(self) -> bool:
        if self.target is None:
            return True
        ahead = self.accountant.epsilon_after(self.delta, noise_multiplier=self.noise,
                                              sample_rate=self.rate, num_steps=1)
        return ahead <= self.target

    def start_round(self) -> RoundSum:
        return RunningMean()

    def weight_of(self, num_examples: int) -> float:
        return 1.0  # equal weights: counts are private, and the analysis assumes them

    def finish_round(self, round_sum: RoundSum, reference: State) -> State | None:
        """Charge the accountant, then noise the sum of the clipped updates."""
        self.accountant.step(noise_multiplier=self.noise, sample_rate=self.rate)
        assert isinstance(round_sum, RunningMean)
        return noised_total(round_sum.sum_over(reference), clip_norm=self.clip,
                            noise_multiplier=self.noise, expected_clients=self.expected,
                            random=self.random)

    def aggregate_secure(self, mean: State | None, count: int,
                         reference: State) -> State | None:
        """SecAgg+ gives the mean of `count` updates (none when it failed: a noise-only
        release, like an empty cohort)."""
        self.accountant.step(noise_multiplier=self.noise, sample_rate=self.rate)
        total = ({k: torch.zeros_like(v, dtype=torch.float32) for k, v in reference.items()}
                 if mean is None else {k: v * count for k, v in mean.items()})
        return noised_total(total, clip_norm=self.clip, noise_multiplier=self.noise,
                            expected_clients=self.expected, random=self.random)

    def epsilon(self) -> float | None:
        return self.accountant.epsilon(self.delta)

    def charge_lost_rounds(self, rounds: int) -> None:
        """A resume that fell back past damaged checkpoints re-runs their rounds: the lost
        rounds may have released an aggregate, so they stay charged (over-counting is sound)."""
        self.accountant.step(noise_multiplier=self.noise, sample_rate=self.rate,
                             num_steps=rounds)

    def accountant_state(self) -> dict | None:
        """The full (sigma, q, steps) history: anyone can recompute epsilon from it."""
        return {"delta": self.delta, **self.accountant.state_dict()}

    def state_dict(self) -> dict[str, Any]:
        """Accountant history, and the noise generator only when it is seeded (tests): real
        noise state never touches the disk, and a resumed run draws fresh OS entropy."""
        state: dict[str, Any] = {"kind": "dp-fedavg", "accountant": self.accountant.state_dict()}
        if isinstance(self.random, SeededRandom):
            raw = self.random.generator.get_state().numpy().tobytes()
            state["noise_generator"] = base64.b64encode(raw).decode("ascii")
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("kind") != "dp-fedavg":
            raise ValueError(f"checkpoint holds a {state.get('kind')!r} aggregator, not "
                             "dp-fedavg: resume with the run's own config")
        self.accountant.load_state_dict(state["accountant"])
        if isinstance(self.random, SeededRandom) and "noise_generator" in state:
            raw = base64.b64decode(state["noise_generator"])
            self.random.generator.set_state(torch.frombuffer(bytearray(raw), dtype=torch.uint8))


def create_aggregator(cfg: FedMilmConfig) -> Aggregator:
    """`DpFedAvg` when user-level DP is on, plain `FedAvg` otherwise."""
    return DpFedAvg(cfg) if cfg.privacy.user_level else FedAvg(cfg)


def aggregate_all(aggregator: Aggregator, updates: list[State], num_examples: list[int],
                  reference: State, ranks: list[int] | None = None) -> State | None:
    """The global step from a whole list of updates at once (tests, benchmarks): the same
    fold the server does reply by reply."""
    round_sum = aggregator.start_round()
    for i, update in enumerate(updates):
        round_sum.add(update, aggregator.weight_of(num_examples[i]),
                      None if ranks is None else ranks[i])
    return aggregator.finish_round(round_sum, reference)
