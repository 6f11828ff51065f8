"""Heterogeneous LoRA ranks: truncation, zero-padding, per-component averaging, tiers."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from fedmilm.adapters import build_adapter_space
from fedmilm.adapters.hetero import lora_for_rank, pad, tier_of, truncate
from fedmilm.aggregation.streaming import RunningMean
from tests.conftest import tiny_config

A, B, BIAS = "x.lora_A.default.weight", "x.lora_B.default.weight", "x.other"


def _state(rank: int, value: float) -> dict[str, torch.Tensor]:
    return {A: torch.full((rank, 3), value), B: torch.full((2, rank), value),
            BIAS: torch.full((2,), value)}


def test_truncate_then_pad_keeps_the_leading_components_and_zeros_the_rest():
    full = {A: torch.arange(12.0).reshape(4, 3), B: torch.arange(8.0).reshape(2, 4),
            BIAS: torch.ones(2)}
    small = truncate(full, 2)
    assert small[A].shape == (2, 3) and small[B].shape == (2, 2)
    back = pad(small, full)
    assert torch.equal(back[A][:2], full[A][:2]) and not back[A][2:].any()
    assert torch.equal(back[B][:, :2], full[B][:, :2]) and not back[B][:, 2:].any()
    assert torch.equal(back[BIAS], full[BIAS])


def test_each_component_is_averaged_over_the_phones_that_hold_it():
    reference = _state(4, 0.0)
    small = pad(_state(2, 1.0), reference)   # rank 2 phone: ones in components 0-1
    large = _state(4, 3.0)                   # rank 4 phone: threes everywhere
    running = RunningMean()
    running.add(small, 1.0, rank=2)
    running.add(large, 1.0, rank=4)
    mean = running.mean()
    assert torch.allclose(mean[A][:2], torch.full((2, 3), 2.0))   # (1 + 3) / 2
    assert torch.allclose(mean[A][2:], torch.full((2, 3), 3.0))   # only the large phone
    assert torch.allclose(mean[B][:, :2], torch.full((2, 2), 2.0))
    assert torch.allclose(mean[B][:, 2:], torch.full((2, 2), 3.0))
    assert torch.allclose(mean[BIAS], torch.full((2,), 2.0))
    with pytest.raises(ValueError):
        running.add({A: small[A]}, 1.0, rank=2)  # not the same tensors as the others


def test_tiers_are_declared_or_assigned_round_robin():
    tiers = {"low": 4, "high": 8}
    assert [tier_of(d, tiers) for d in range(4)] == ["low", "high", "low", "high"]
    assert tier_of(0, tiers, declared="high") == "high"
    assert tier_of(5, {}) is None
    with pytest.raises(ValueError, match="'mid'"):
        tier_of(0, tiers, declared="mid")


def test_a_truncated_adapter_is_the_leading_part_of_the_full_one():
    cfg = tiny_config("personalization=none", "lora.r=4", "lora.rank_by_tier={low: 2, high: 4}")
    full_lora = replace(cfg.lora, rank_by_tier=None)
    small_lora = lora_for_rank(cfg.lora, 2)
    assert small_lora.alpha / small_lora.r == full_lora.alpha / full_lora.r
    full = build_adapter_space(cfg.model, full_lora, mode="none", seed=0)
    small = build_adapter_space(cfg.model, small_lora, mode="none", seed=0)
    generator = torch.Generator().manual_seed(1)
    state = {k: torch.randn(v.shape, generator=generator) * 0.1
             for k, v in full.initial_state(full.global_keys).items()}
    small.load(truncate(state, 2))
    full.load(pad(truncate(state, 2), state))  # components 2-3 zeroed
    ids = torch.randint(0, 100, (2, 12), generator=generator)
    with torch.no_grad():
        torch.testing.assert_close(small.model(input_ids=ids).logits,
                                   full.model(input_ids=ids).logits, rtol=1e-4, atol=1e-5)


def test_mixed_ranks_must_keep_r_as_the_largest_and_plain_aggregation():
    from fedmilm.config import ConfigError

    with pytest.raises(ConfigError, match="must equal the largest rank"):
        tiny_config("lora.r=8", "lora.rank_by_tier={low: 2, high: 4}")
    with pytest.raises(ConfigError, match="not combinable"):
        tiny_config("lora.r=4", "lora.rank_by_tier={low: 2, high: 4}", "privacy=user")
