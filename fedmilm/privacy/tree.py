"""DP-FTRL's noise and its accounting: tree aggregation over runs of `min_separation` rounds.

Kairouz et al. 2021, "Practical and Private (Deep) Learning without Sampling or Shuffling": the
server releases noisy prefix sums of the clipped updates. Each node of a binary tree over the
rounds (a leaf per round, a node per dyadic block of rounds) carries its own Gaussian noise of
std sigma C, and the prefix sum of round t is read off the popcount(t) nodes that cover 1..t, so
the noise in the model grows like sqrt(log t) instead of DP-FedAvg's sqrt(t).

The tree restarts every `min_separation` rounds and a phone trains at most once in that many
rounds, so it is in each tree at most once. One participation moves `depth` nodes by C (depth
of a tree over min(min_separation, rounds so far) leaves): a
Gaussian mechanism of noise multiplier sigma / sqrt(depth). P participations compose to
mu = sqrt(P depth) / sigma (mu-GDP, exact epsilon in `gaussian`), under replace-one-phone's-
data neighbours. No sampling is assumed: who trains may be decided by anyone, availability
included, as long as the separation holds.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from fedmilm.adapters.space import State
from fedmilm.privacy.gaussian import gaussian_epsilon, gaussian_mu_for
from fedmilm.privacy.randomness import PrivateRandom


def tree_depth(leaves: int) -> int:
    """Nodes of a tree over `leaves` rounds that contain one leaf: ceil(log2(leaves + 1))."""
    if leaves < 1:
        raise ValueError("a tree needs at least one leaf")
    return leaves.bit_length()


class TreeNoise:
    """The noise of each round's step under tree aggregation, in memory only (its nodes are the
    secret the guarantee rests on: never checkpointed; a resumed run starts a fresh tree).

    A stack holds the noise of the nodes covering the rounds of the current tree so far (at
    most `depth` adapters). A new round pops the completed siblings its node replaces and pushes
    that node with fresh noise, so the step's noise is (new node) - (popped nodes): the change
    of the prefix sum's noise."""

    def __init__(self, random: PrivateRandom, *, std: float, leaves_per_tree: int) -> None:
        self.random, self.std, self.leaves_per_tree = random, std, leaves_per_tree
        self._stack: list[tuple[int, State]] = []  # (level, node noise)
        self._leaves = 0

    @property
    def at_boundary(self) -> bool:
        """The next round starts a tree (the std may change only here)."""
        return self._leaves in (0, self.leaves_per_tree)

    def next_step_noise(self, reference: State) -> State:
        """The noise to add to this round's sum (shapes of `reference`)."""
        if self._leaves == self.leaves_per_tree:  # restart: the finished tree stays released
            self._stack, self._leaves = [], 0
        level, popped = 0, list[State]()
        while self._stack and self._stack[-1][0] == level:
            popped.append(self._stack.pop()[1])
            level += 1
        node = {key: self.random.normal(value.shape, self.std)
                for key, value in reference.items()}
        self._stack.append((level, node))
        self._leaves += 1
        return {key: node[key] - sum((p[key] for p in popped), torch.zeros_like(node[key]))
                for key in node}


@dataclass
class TreeAccountant:
    """Epsilon of DP-FTRL from how many times one phone can have trained.

    Participations of any phone are at most ceil(rounds / min_separation) (the server enforces
    the separation) and at most `max_participations`. Rounds lost on a resume (their
    checkpoint damaged after their release) were run with participation records the resumed
    server never saw: each such stretch of L rounds adds up to ceil(L / separation) + 1."""

    noise_multiplier: float
    min_separation: int
    max_participations: int | None
    rounds: int = 0
    lost: list[int] = field(default_factory=list)

    def step(self, rounds: int = 1) -> None:
        """Charge `rounds` rounds (before their release)."""
        self.rounds += rounds

    def charge_lost(self, rounds: int) -> None:
        self.rounds += rounds
        self.lost.append(rounds)

    def participations(self, rounds: int | None = None) -> int:
        """The most trees one phone can have been in after `rounds` (default: so far)."""
        rounds = self.rounds if rounds is None else rounds
        b = self.min_separation
        unseen = sum(math.ceil(length / b) for length in self.lost)
        bound = math.ceil(rounds / b) + unseen + len(self.lost)
        if self.max_participations is not None:
            bound = min(bound, self.max_participations + unseen)
        return bound

    def mu(self, rounds: int | None = None) -> float:
        rounds = self.rounds if rounds is None else rounds
        depth = tree_depth(max(1, min(self.min_separation, rounds)))  # a tree has <= both
        if self.noise_multiplier == 0:
            return math.inf
        return math.sqrt(self.participations(rounds) * depth) / self.noise_multiplier

    def epsilon(self, delta: float, rounds: int | None = None) -> float:
        rounds = self.rounds if rounds is None else rounds
        return 0.0 if rounds == 0 else gaussian_epsilon(self.mu(rounds), delta)

    def state_dict(self) -> dict:
        return {"mechanism": "tree", "noise_multiplier": self.noise_multiplier,
                "min_separation": self.min_separation,
                "max_participations": self.max_participations, "rounds": self.rounds,
                "lost": list(self.lost), "rho_zcdp": self.mu() ** 2 / 2 if self.rounds else 0.0}

    def load_state_dict(self, state: dict) -> None:
        if state.get("mechanism") != "tree":
            raise ValueError(f"accountant state is for {state.get('mechanism')!r}, not tree")
        self.rounds, self.lost = int(state["rounds"]), [int(n) for n in state["lost"]]


def default_separation(population: int, cohort: int) -> int:
    """The separation when none is set: N // m, the longest that leaves a full cohort."""
    return max(1, population // cohort)


def ftrl_participations(rounds: int, min_separation: int,
                        max_participations: int | None) -> int:
    """The most times one phone trains in `rounds` rounds under the separation and the cap."""
    bound = math.ceil(rounds / min_separation)
    return bound if max_participations is None else min(bound, max_participations)


def ftrl_noise_for(target_epsilon: float, *, delta: float, rounds: int, min_separation: int,
                   max_participations: int | None) -> float:
    """The noise multiplier that meets `target_epsilon` after `rounds` rounds: exact, in closed
    form (sigma = sqrt(P depth) / mu*, mu* the largest mu within the target)."""
    participations = ftrl_participations(rounds, min_separation, max_participations)
    mu = gaussian_mu_for(target_epsilon, delta)
    return math.sqrt(participations * tree_depth(min(min_separation, rounds))) / mu
