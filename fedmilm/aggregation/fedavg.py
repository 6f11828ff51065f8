"""Weighted averaging of adapter updates (FedAvg on the global part)."""

from __future__ import annotations

from collections.abc import Sequence

from fedmilm.adapters.space import State
from fedmilm.aggregation.streaming import RunningMean


def weighted_mean(updates: Sequence[State], weights: Sequence[float]) -> State:
    """sum_i w_i * u_i / sum_i w_i, key by key, in float32: the running mean of all of them."""
    if not updates:
        raise ValueError("nothing to average")
    if len(updates) != len(weights) or any(w <= 0 for w in weights):
        raise ValueError("need one positive weight per update")
    running = RunningMean()
    for update, weight in zip(updates, weights, strict=True):
        running.add(update, float(weight))
    return running.mean()


def apply_update(state: State, update: State) -> State:
    """The new global state: state + update."""
    return {k: state[k] + update[k] for k in state}
