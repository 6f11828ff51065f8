"""Aggregation reply by reply: the same result as the whole batch at once, in one adapter's
memory, and a norm bound that needs no second pass."""

from __future__ import annotations

import gc
import random
import weakref

import pytest
import torch

from fedmilm.aggregation import DpFedAvg, FedAvg, aggregate_all
from fedmilm.aggregation.streaming import BufferedUpdates, RunningMean, StreamingNormBound
from fedmilm.privacy.randomness import SeededRandom
from fedmilm.privacy.user_level import noisy_mean
from tests.conftest import tiny_config

REF = {"l.lora_A.weight": torch.zeros(4, 6), "l.lora_B.weight": torch.zeros(6, 4),
       "head": torch.zeros(5)}


def _updates(n: int, seed: int = 0) -> list[dict[str, torch.Tensor]]:
    gen = torch.Generator().manual_seed(seed)
    return [{k: torch.randn(v.shape, generator=gen) for k, v in REF.items()} for _ in range(n)]


def test_the_running_mean_equals_the_batch_formula_bit_for_bit():
    updates, weights = _updates(50), [float(w) for w in range(1, 51)]
    running = RunningMean()
    for update, weight in zip(updates, weights, strict=True):
        running.add(update, weight)
    total = sum(weights)  # the textbook fold, written out independently
    for key in REF:
        batch = sum(w * u[key] for u, w in zip(updates, weights, strict=True)) / total
        assert torch.equal(running.mean()[key], batch)


def test_arrival_order_changes_only_float_rounding():
    updates = _updates(200)
    weights = [float(1 + i % 7) for i in range(200)]
    order = list(range(200))
    random.Random(3).shuffle(order)
    forward, shuffled = RunningMean(), RunningMean()
    for i in range(200):
        forward.add(updates[i], weights[i])
        shuffled.add(updates[order[i]], weights[order[i]])
    exact = {k: (torch.stack([u[k].double() for u in updates])
                 * torch.tensor(weights, dtype=torch.float64).view(-1, *[1] * REF[k].dim())
                 ).sum(0) / sum(weights) for k in REF}
    for key in REF:
        torch.testing.assert_close(forward.mean()[key].double(), exact[key], rtol=0, atol=1e-6)
        torch.testing.assert_close(shuffled.mean()[key], forward.mean()[key], rtol=0, atol=1e-6)


def test_the_dp_fedavg_noisy_sum_equals_the_batch_mechanism_exactly():
    """Same seeded noise: the server's streaming DP-FedAvg releases exactly what the
    independent batch implementation (`noisy_mean`) releases for the same updates."""
    cfg = tiny_config("privacy=user", "privacy.seeded_noise=true")
    agg = DpFedAvg(cfg)
    agg.random = SeededRandom(11)
    updates = _updates(9)
    streamed = aggregate_all(agg, updates, [1] * 9, REF)
    batch = noisy_mean(updates, REF, clip_norm=agg.clip, noise_multiplier=agg.noise,
                       expected_clients=agg.expected, random=SeededRandom(11))
    assert all(torch.equal(streamed[k], batch[k]) for k in REF)
    assert agg.accountant.steps == 1


def test_fedavg_streams_and_robust_rules_buffer():
    assert isinstance(FedAvg(tiny_config()).start_round(), RunningMean)
    for method in ("trimmed_mean", "median", "krum"):
        agg = FedAvg(tiny_config(f"aggregation.method={method}"))
        assert isinstance(agg.start_round(), BufferedUpdates)


def test_a_folded_update_is_not_kept():
    running = RunningMean()
    update = _updates(1)[0]
    watchers = [weakref.ref(t) for t in update.values()]
    running.add(update, 2.0)
    del update
    gc.collect()
    assert all(w() is None for w in watchers)  # memory: the sums, not the updates
    assert running.count == 1 and running.weight == 2.0


def test_mismatched_or_weightless_updates_are_refused():
    running = RunningMean()
    running.add(_updates(1)[0])
    with pytest.raises(ValueError):
        running.add({"head": torch.zeros(5)})
    with pytest.raises(ValueError):
        running.add(_updates(1)[0], 0.0)
    with pytest.raises(ValueError):
        RunningMean().mean()


def _judged(norms: list[float], multiple: float = 5.0) -> tuple[list[int], list[int]]:
    kept, rejected = [], []

    def verdict(item: object, norm: float, bound: float | None) -> None:
        (rejected if bound is not None and norm > bound else kept).append(item)

    bound = StreamingNormBound(multiple, min_updates=3)
    for i, norm in enumerate(norms):
        bound.offer(i, norm, verdict)
    bound.flush(verdict)
    return sorted(kept), rejected


def test_the_norm_bound_holds_the_first_updates_until_a_median_exists():
    """An attacker who answers first is judged once honest norms have arrived."""
    kept, rejected = _judged([40.0, 1.0, 1.1, 0.9, 1.2, 6.0])
    assert rejected == [0, 5] and kept == [1, 2, 3, 4]


def test_too_few_updates_for_a_median_are_judged_on_the_absolute_cap_alone():
    assert _judged([40.0, 1.0]) == ([0, 1], [])
