"""What every user-level DP mechanism shares: clipped equal-weight updates, a fixed denominator,
the accountant charged before each release, and private randomness that never reaches disk.

A mechanism (`DpFedAvg`, `DpFtrl`) says who trains (`cohort`), how a round is charged
(`charge`), how a round's sum of clipped updates becomes a released step (`release`), and what
its accountant reports.
"""

from __future__ import annotations

import base64
from abc import ABC, abstractmethod
from typing import Any

import torch

from fedmilm.adapters.space import State
from fedmilm.aggregation.streaming import RoundSum, RunningMean
from fedmilm.config.schema import FedMilmConfig
from fedmilm.privacy.adaptive_clip import (
    QuantileClip,
    default_count_noise,
    update_noise_multiplier,
)
from fedmilm.privacy.randomness import SeededRandom, private_random

CLIP_SLACK = 1e-3  # relative float32 slack allowed on a client's clipped norm


class UserLevelDp(ABC):
    """The shared skeleton; subclasses name their checkpoint `kind`.

    A round is never skipped for too few replies: the fixed-denominator release is private
    whatever number arrived, while a skip decided on the exact count would release that count
    unnoised."""

    kind: str

    def __init__(self, cfg: FedMilmConfig) -> None:
        user = cfg.privacy.user
        assert user.noise_multiplier is not None, "noise is calibrated before the run starts"
        self.noise, self.clip = user.noise_multiplier, user.clip_norm
        self.expected = cfg.federation.clients_per_round
        self.target, self.delta = user.target_epsilon, cfg.privacy.delta
        self.random = private_random(cfg.seed if cfg.privacy.seeded_noise else None)
        self.update_noise = self.noise  # the update's share of the noise (all of it ...)
        self.adaptive: QuantileClip | None = None
        self._votes = 0.0
        if user.adaptive_clip:  # ... unless the clip count takes its part
            count_noise = user.clip_count_noise or default_count_noise(self.expected, self.noise)
            self.update_noise = update_noise_multiplier(self.noise, count_noise)
            self.adaptive = QuantileClip(clip=self.clip, quantile=user.clip_quantile,
                                         lr=user.clip_lr, count_noise=count_noise,
                                         expected=self.expected)

    @property
    def max_update_norm(self) -> float:
        return self.clip * (1 + CLIP_SLACK)  # updates must arrive clipped to this round's clip

    @property
    def round_clip(self) -> float | None:
        """The clip phones are told this round (adaptive clipping), None: the config's."""
        return None if self.adaptive is None else self.clip

    def vote(self, within_clip: float) -> None:
        """A phone's b - 1/2 (adaptive clipping): its update fitted under the clip or not."""
        self._votes += within_clip

    def _clip_estimate_moved(self) -> None:
        """Where the new estimate takes effect: at once, unless the mechanism says later."""
        assert self.adaptive is not None
        self.clip = self.adaptive.clip

    @abstractmethod
    def charge(self, rounds: int) -> None:
        """Account `rounds` rounds (always before what they release leaves)."""

    @abstractmethod
    def release(self, total: State) -> State:
        """The global step from a round's sum of clipped updates: noised, over `expected`."""

    @abstractmethod
    def epsilon(self) -> float | None: ...

    def epsilon_server(self) -> float | None:
        """Against the server operator: no bound unless phones add noise (DP-FTRL overrides)."""
        return None

    @abstractmethod
    def epsilon_ahead(self) -> float:
        """Epsilon if one more round ran (nothing is charged)."""

    @abstractmethod
    def accountant_state(self) -> dict | None:
        """What anyone may recompute epsilon from (written beside the run's metrics)."""

    @abstractmethod
    def _own_state(self) -> dict[str, Any]: ...

    @abstractmethod
    def _load_own_state(self, state: dict[str, Any]) -> None: ...

    def may_continue(self) -> bool:
        return self.target is None or self.epsilon_ahead() <= self.target

    def start_round(self) -> RoundSum:
        self._votes = 0.0
        return RunningMean()

    def weight_of(self, num_examples: int) -> float:
        return 1.0  # equal weights: counts are private, and the analysis assumes them

    def finish_round(self, round_sum: RoundSum, reference: State) -> State | None:
        """Charge the accountant, then release the noised sum of the clipped updates."""
        self.charge(1)
        assert isinstance(round_sum, RunningMean)
        step = self.release(round_sum.sum_over(reference))
        if self.adaptive is not None:  # the count is released with the step, same charge
            self.adaptive.update(self._votes, self.random)
            self._clip_estimate_moved()
        return step

    def aggregate_secure(self, mean: State | None, count: int,
                         reference: State) -> State | None:
        """SecAgg+ gives the mean of `count` updates (none when it failed: a noise-only
        release, like an empty cohort)."""
        self.charge(1)
        total = ({k: torch.zeros_like(v, dtype=torch.float32) for k, v in reference.items()}
                 if mean is None else {k: v * count for k, v in mean.items()})
        return self.release(total)

    def charge_lost_rounds(self, rounds: int) -> None:
        """A resume that fell back past damaged checkpoints re-runs their rounds: the lost
        rounds may have released an aggregate, so they stay charged (over-counting is sound)."""
        self.charge(rounds)

    def state_dict(self) -> dict[str, Any]:
        """The mechanism's public state, and the noise generator only when it is seeded
        (tests): real noise state never touches the disk, a resumed run draws fresh entropy."""
        state: dict[str, Any] = {"kind": self.kind, **self._own_state(), "clip": self.clip}
        if self.adaptive is not None:  # released values (the count is noised): public
            state["clip_estimate"] = self.adaptive.clip
        if isinstance(self.random, SeededRandom):
            raw = self.random.generator.get_state().numpy().tobytes()
            state["noise_generator"] = base64.b64encode(raw).decode("ascii")
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("kind") != self.kind:
            raise ValueError(f"checkpoint holds a {state.get('kind')!r} aggregator, not "
                             f"{self.kind}: resume with the run's own config")
        self._load_own_state(state)
        self.clip = float(state["clip"])
        if self.adaptive is not None:
            self.adaptive.clip = float(state["clip_estimate"])
        if isinstance(self.random, SeededRandom) and "noise_generator" in state:
            raw = base64.b64decode(state["noise_generator"])
            self.random.generator.set_state(torch.frombuffer(bytearray(raw), dtype=torch.uint8))
