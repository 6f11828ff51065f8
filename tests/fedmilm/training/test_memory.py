"""Memory budgets: micro-batching and re-entrant checkpointing change memory, not training."""

from __future__ import annotations

import pytest
import torch

from fedmilm.adapters import build_adapter_space
from fedmilm.data import encode_all, load_user
from fedmilm.privacy.randomness import SeededRandom
from fedmilm.training import DpNoise, train_local
from fedmilm.training.memory import (
    MIB,
    MemoryBudgetError,
    estimate_peak_bytes,
    gradient_checkpointing,
    plan_memory,
)
from tests.conftest import tiny_config

pytestmark = pytest.mark.filterwarnings("ignore:Full backward hook is firing")


@pytest.fixture(scope="module")
def setup():
    cfg = tiny_config("personalization=dual", "train.lr=0.02")
    space = build_adapter_space(cfg.model, cfg.lora, mode="dual", seed=0)
    gen = torch.Generator().manual_seed(3)
    start = {k: torch.randn(v.shape, generator=gen) * 0.05 for k, v in space.initial.items()}
    examples = encode_all(space.tokenizer, load_user(cfg.data, user=2, seed=0).train,
                          cfg.data.max_length)
    return space, start, examples


def _train(space, start, examples, *, micro_batch=None, checkpointing=False, dp=False):
    space.load(start)
    with gradient_checkpointing(space.model, checkpointing):
        stats = train_local(space.model, space.trainable_parameters(), examples, epochs=1,
                            batch_size=8, lr=0.02, weight_decay=0.0,
                            pad_id=space.tokenizer.pad_token_id, seed=4,
                            dp=DpNoise(0.7, 1.0, SeededRandom(4)) if dp else None,
                            micro_batch=micro_batch)
    return space.state(tuple(space.initial)), stats


@pytest.mark.parametrize("dp", [False, True])
def test_micro_batches_and_checkpointing_leave_training_unchanged(setup, dp):
    space, start, examples = setup
    whole, stats = _train(space, start, examples, dp=dp)
    moved = max(float((whole[k] - start[k]).abs().max()) for k in start)
    assert moved > 1e-3
    for variant in ({"micro_batch": 3}, {"checkpointing": True},
                    {"micro_batch": 2, "checkpointing": True}):
        other, other_stats = _train(space, start, examples, dp=dp, **variant)
        for key in start:
            torch.testing.assert_close(other[key], whole[key], rtol=1e-5, atol=1e-6,
                                       msg=lambda m, v=variant: f"{v}: {m}")
        assert (other_stats.steps, other_stats.examples) == (stats.steps, stats.examples)
    assert not space.model.get_base_model().is_gradient_checkpointing  # switched off again


def test_estimates_grow_with_micro_batch_and_shrink_with_checkpointing(setup):
    space, _, _ = setup
    model = space.model

    def est(rows, ckpt=False, dp=False):
        return estimate_peak_bytes(model, micro_batch=rows, seq_len=128, checkpointing=ckpt,
                                   dp=dp)

    assert est(1) < est(2) < est(8)
    assert est(8, ckpt=True) < est(8)
    assert est(8, dp=True) > est(8)


def test_plan_prefers_big_micro_batches_then_checkpointing_then_refuses(setup):
    space, _, _ = setup
    model = space.model

    def est(rows, ckpt):
        return estimate_peak_bytes(model, micro_batch=rows, seq_len=128, checkpointing=ckpt,
                                   dp=False)

    def plan(budget_bytes, checkpointing="auto", micro_batch=None):
        return plan_memory(model, budget_mb=budget_bytes / MIB, batch_size=8, seq_len=128,
                           micro_batch=micro_batch, checkpointing=checkpointing, dp=False)

    free = plan_memory(model, budget_mb=None, batch_size=8, seq_len=128, micro_batch=None,
                       checkpointing="auto", dp=False)
    assert (free.micro_batch, free.checkpointing) == (8, False)
    assert (plan(est(8, False)).micro_batch, plan(est(8, False)).checkpointing) == (8, False)
    middle = plan(est(3, False) + 1)
    assert (middle.micro_batch, middle.checkpointing) == (3, False)
    assert middle.estimated_bytes <= est(3, False) + 1
    assert plan(est(8, False), micro_batch=2).micro_batch == 2  # the configured cap holds
    tight = plan((est(1, True) + est(1, False)) // 2)
    assert tight.checkpointing and tight.micro_batch >= 1
    with pytest.raises(MemoryBudgetError, match="checkpointing=auto"):
        plan((est(1, True) + est(1, False)) // 2, checkpointing="off")
    with pytest.raises(MemoryBudgetError, match=r"too small: even micro-batch 1 with gradient"):
        plan(est(1, True) - MIB)
