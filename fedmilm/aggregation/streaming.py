"""Aggregation one reply at a time: the server folds each update into running sums as it
arrives and drops it, so its memory is one adapter whatever the cohort (1,000 phones at the
default model would otherwise be 1.9 GB of updates held at once).

`RunningMean` is the weighted (and heterogeneous-rank) mean; `BufferedUpdates` keeps every
update for the rules that need them all at once (trimmed mean, median, Krum: O(cohort)).
"""

from __future__ import annotations

import statistics
from collections.abc import Callable

import torch

from fedmilm.adapters.hetero import rank_axis
from fedmilm.adapters.space import State


class RunningMean:
    """sum_i w_i u_i and, per coordinate, the weight of the phones that trained it.

    Without ranks every coordinate is covered by every update (FedAvg). With ranks (HetLoRA)
    a rank-r update covers only the first r components of each LoRA factor, so each component
    is averaged over the phones that hold it."""

    def __init__(self) -> None:
        self.total: State = {}
        self._cover: dict[str, torch.Tensor] = {}  # ranked keys: weight along the rank axis
        self.weight = 0.0
        self.count = 0

    def add(self, update: State, weight: float = 1.0, rank: int | None = None) -> None:
        """Fold one update in (it can be dropped afterwards)."""
        if weight <= 0:
            raise ValueError("need a positive weight per update")
        if self.total and set(update) != set(self.total):
            raise ValueError("an update with different tensors than the others")
        for key, value in update.items():
            term = weight * value.to(torch.float32)
            if key in self.total:
                self.total[key] += term
            else:
                self.total[key] = term.clone()
            axis = rank_axis(key)
            if axis is None or (rank is None and key not in self._cover):
                continue  # covered uniformly so far: the scalar weight says it all
            size = value.shape[axis]
            cover = self._cover.get(key)
            if cover is None:  # the first ranked update: earlier ones covered everything
                cover = self._cover[key] = torch.full((size,), self.weight, dtype=torch.float64)
            cover[: size if rank is None else rank] += weight
        self.weight += weight
        self.count += 1

    def mean(self) -> State:
        """The weighted mean (components nobody trained stay 0)."""
        if not self.count:
            raise ValueError("nothing to average")
        out = {}
        for key, total in self.total.items():
            cover = self._cover.get(key)
            if cover is None:
                out[key] = total / self.weight
                continue
            shape = [1] * total.dim()
            shape[rank_axis(key)] = -1  # type: ignore[index]
            out[key] = total / cover.clamp_min(1e-12).to(torch.float32).reshape(shape)
        return out

    def sum_over(self, reference: State) -> State:
        """The plain sum, zeros shaped like `reference` when nothing arrived (DP releases
        noise even then)."""
        return {key: self.total[key] if key in self.total
                else torch.zeros_like(ref, dtype=torch.float32) for key, ref in reference.items()}


class BufferedUpdates:
    """Every update kept until the round ends, for rules that need them all (robust means)."""

    def __init__(self) -> None:
        self.updates: list[State] = []
        self.count = 0

    def add(self, update: State, weight: float = 1.0, rank: int | None = None) -> None:
        self.updates.append(update)
        self.count += 1


RoundSum = RunningMean | BufferedUpdates


class StreamingNormBound:
    """Rejects an update longer than `multiple` x the median norm of the round's updates
    seen so far (itself included), once `min_updates` have arrived; the first ones wait for
    that many (or the round's end) before they are judged. One phone cannot place the global
    step where it likes, and only norms (floats) and at most `min_updates - 1` updates are
    held, never the whole cohort's."""

    def __init__(self, multiple: float, min_updates: int) -> None:
        self.multiple, self.min_updates = multiple, min_updates
        self.norms: list[float] = []
        self._waiting: list[tuple[object, float]] = []

    def offer(self, item: object, norm: float,
              verdict: Callable[[object, float, float | None], None]) -> None:
        """Judge `item` of L2 norm `norm` now, or hold it until enough norms are known;
        `verdict(item, norm, bound)` gets the bound (None: no relative bound applied)."""
        self.norms.append(norm)
        if len(self.norms) < self.min_updates:
            self._waiting.append((item, norm))
            return
        bound = self.multiple * statistics.median(self.norms)
        for held, held_norm in self._waiting:
            verdict(held, held_norm, bound)
        self._waiting.clear()
        verdict(item, norm, bound)

    def flush(self, verdict: Callable[[object, float, float | None], None]) -> None:
        """Round over with fewer than `min_updates` updates: a median of so few says nothing,
        so the held ones are judged on the absolute cap alone."""
        for held, held_norm in self._waiting:
            verdict(held, held_norm, None)
        self._waiting.clear()
