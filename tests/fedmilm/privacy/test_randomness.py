"""The randomness DP rests on: secret, correctly distributed, and used on empty draws too."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from fedmilm.adapters import build_adapter_space
from fedmilm.data import encode_all, load_user
from fedmilm.privacy import Accountant
from fedmilm.privacy.randomness import PrivateRandom, SecureRandom, SeededRandom, private_random
from fedmilm.training import DpSgd, planned_steps, train_phone
from fedmilm.training.runtimes import EagerRuntime
from tests.conftest import tiny_config


def _ks_to_normal(sample: torch.Tensor, std: float) -> float:
    """Kolmogorov-Smirnov distance between `sample` and N(0, std^2)."""
    values = sample.double().sort().values / std
    n = values.numel()
    cdf = 0.5 * (1 + torch.erf(values / math.sqrt(2)))
    ranks = torch.arange(1, n + 1, dtype=torch.float64)
    return float(torch.maximum(ranks / n - cdf, cdf - (ranks - 1) / n).max())


def test_secure_draws_are_fresh_per_instance_and_uniform():
    a, b = SecureRandom().uniform(20_000), SecureRandom().uniform(20_000)
    assert not torch.equal(a, b)
    assert float(a.min()) >= 0.0 and float(a.max()) < 1.0
    assert float(a.mean()) == pytest.approx(0.5, abs=0.01)
    assert private_random().test_seed is None and private_random(3).test_seed == 3


@pytest.mark.parametrize("source", [SecureRandom(), SeededRandom(0)])
def test_noise_is_gaussian_with_the_asked_std(source: PrivateRandom):
    noise = source.normal((200, 100), std=0.7)
    assert noise.dtype == torch.float32 and noise.shape == (200, 100)
    assert float(noise.std()) == pytest.approx(0.7, rel=0.03)
    assert abs(float(noise.mean())) < 0.02
    # KS distance well below the 1% critical value 1.63 / sqrt(n) for n = 20,000
    assert _ks_to_normal(noise.flatten(), 0.7) < 1.63 / math.sqrt(noise.numel())


def test_seeded_draws_replay_exactly():
    assert torch.equal(SeededRandom(5).normal((50,), 1.0), SeededRandom(5).normal((50,), 1.0))
    assert not torch.equal(SeededRandom(5).normal((50,), 1.0), SeededRandom(6).normal((50,), 1.0))


class _NeverSamples(PrivateRandom):
    """Test double for the phone's randomness: every Poisson draw comes out empty (uniform
    values of 1), while the noise stays real."""

    def __init__(self) -> None:
        self.noise = SeededRandom(1)

    def uniform(self, n: int) -> torch.Tensor:
        return torch.ones(n, dtype=torch.float64)

    def normal(self, shape, std, dtype=torch.float32):  # noqa: ANN001
        return self.noise.normal(shape, std, dtype)


def test_empty_poisson_draws_take_noise_only_steps_and_are_charged():
    """The analysis assumes a noisy step for every draw, empty ones included: skipping them
    would make the update reveal that a draw was empty."""
    cfg = tiny_config("personalization=none", "train.lr=0.05")
    space = build_adapter_space(cfg.model, cfg.lora, mode="none", seed=0)
    examples = encode_all(space.tokenizer, load_user(cfg.data, user=0, seed=0).train, 64)
    before = space.state(space.global_keys)
    accountant = Accountant("prv")
    train = dataclasses.replace(cfg.train, epochs=1, batch_size=4, lr=0.05, weight_decay=0.0)
    stats = train_phone(EagerRuntime(space), global_state=before, personal_state={},
                        examples=examples, train=train, seed=0,
                        dp=DpSgd(1.0, 1.0, accountant, _NeverSamples())).stats
    steps = planned_steps(len(examples), epochs=1, batch_size=4)
    assert stats.steps == accountant.steps == steps and stats.examples == 0
    after = space.state(space.global_keys)
    assert any(not torch.equal(before[k], after[k]) for k in before)  # the noise moved it
