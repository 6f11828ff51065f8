"""The one local-training skeleton every phone runtime shares.

The skeleton owns everything that decides *what* a local training computes: the batch plan
(shuffled epochs from the task seed, or Poisson draws from the phone's private randomness under
DP-SGD), micro-batches, each step's Gaussian noise (drawn here, after the step's batch, one
N(0, (sigma C)^2) tensor per adapter tensor: Opacus's order), noise-only steps for empty Poisson
draws, and the statistics. A runtime supplies only the arithmetic, as a `StepEngine`: eager
PyTorch + Opacus (`fedmilm.training.local`) or ExecuTorch programs (`fedmilm.export.runtime`).
So both runtimes train on the same batches with the same noise by construction.

The skeleton charges no accountant: `train_phone` charges every planned step, once, for every
runtime.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Protocol

import torch

from fedmilm.data.chat import Batch, Example, batches, collate
from fedmilm.privacy.accountant import Accountant
from fedmilm.privacy.randomness import PrivateRandom


@dataclass(frozen=True)
class TrainStats:
    """What one phone's local training did."""

    loss: float          # mean per-example training loss over all steps
    steps: int
    examples: int        # examples seen, counting epochs
    tokens: int          # tokens processed (inputs, not only labelled ones)
    seconds: float


@dataclass(frozen=True)
class DpNoise:
    """What a DP-SGD step computes with: clip C, noise std sigma C, the phone's randomness."""

    noise_multiplier: float
    max_grad_norm: float
    random: PrivateRandom   # Poisson masks and noise: secret from everyone but the phone


@dataclass(frozen=True)
class DpSgd:
    """Per-example DP-SGD for one phone's local training, with the ledger's accountant."""

    noise_multiplier: float
    max_grad_norm: float
    accountant: Accountant  # charged by `train_phone` for every planned step, before training
    random: PrivateRandom

    @property
    def noise(self) -> DpNoise:
        return DpNoise(self.noise_multiplier, self.max_grad_norm, self.random)


class StepEngine(Protocol):
    """One runtime's arithmetic for the skeleton's steps."""

    def adapter_shapes(self) -> list[torch.Size]:
        """Shapes of the trainable tensors, in the order `step` takes their noise."""
        ...

    def accumulate(self, part: Batch, *, rows: int, dp: bool) -> float:
        """Add one micro-batch's gradient to the step's (no DP: of sum_i loss_i / rows, `rows`
        being the whole batch's; DP: the sum of per-example gradients clipped to C) and return
        the sum of its per-example losses."""
        ...

    def step(self, noise: list[torch.Tensor] | None) -> None:
        """One AdamW step on what was accumulated (DP: (sum + noise) / expected batch, which
        with nothing accumulated is the noise-only step of an empty draw), then clear it."""
        ...


def planned_steps(num_examples: int, *, epochs: int, batch_size: int) -> int:
    """Optimizer steps of one local training (DP or not): epochs x ceil(n / batch)."""
    return epochs * math.ceil(num_examples / batch_size)


def dp_sample_rate(num_examples: int, *, batch_size: int) -> float:
    """Poisson inclusion probability of one example in one DP-SGD step (expected batch / n)."""
    return min(1.0, batch_size / num_examples)


def _poisson_batches(examples: list[Example], *, sample_rate: float, steps: int, pad_id: int,
                     random: PrivateRandom) -> Iterator[Batch | None]:
    """Each step includes every example independently with probability `sample_rate`, the
    sampling the accountant's amplification bound assumes. None marks an empty draw."""
    for _ in range(steps):
        keep = random.uniform(len(examples)) < sample_rate
        chosen = [examples[i] for i in keep.nonzero().flatten().tolist()]
        yield collate(chosen, pad_id) if chosen else None


def batch_plan(examples: list[Example], *, epochs: int, batch_size: int, pad_id: int,
               generator: torch.Generator,
               poisson: PrivateRandom | None = None) -> Iterator[Batch | None]:
    """The batches of one local training: shuffled epochs (from the seeded `generator`), or
    Poisson draws from the phone's private randomness (DP-SGD)."""
    if poisson is None:
        return (batch for _ in range(epochs)
                for batch in batches(examples, batch_size=batch_size, pad_id=pad_id,
                                     generator=generator))
    steps = planned_steps(len(examples), epochs=epochs, batch_size=batch_size)
    return _poisson_batches(examples, sample_rate=dp_sample_rate(len(examples),
                                                                 batch_size=batch_size),
                            steps=steps, pad_id=pad_id, random=poisson)


def micro_batches(batch: Batch, size: int | None) -> list[Batch]:
    """Rows of `batch` in chunks of at most `size` (None: the batch itself)."""
    rows = batch.input_ids.size(0)
    if size is None or size >= rows:
        return [batch]
    return [Batch(batch.input_ids[i:i + size], batch.attention_mask[i:i + size],
                  batch.labels[i:i + size]) for i in range(0, rows, size)]


def run_steps(engine: StepEngine, examples: list[Example], *, epochs: int, batch_size: int,
              pad_id: int, seed: int, dp: DpNoise | None,
              micro_batch: int | None) -> TrainStats:
    """Train `engine` over one local training's batch plan; deterministic given `seed` without
    DP. Under DP-SGD the batches and the noise come from `dp.random`, which the seed does not
    determine."""
    if not examples:
        raise ValueError("no training examples on this phone")
    plan = batch_plan(examples, epochs=epochs, batch_size=batch_size, pad_id=pad_id,
                      generator=torch.Generator().manual_seed(seed),
                      poisson=None if dp is None else dp.random)
    shapes = engine.adapter_shapes()
    started = time.perf_counter()
    loss_sum, done, seen, tokens = 0.0, 0, 0, 0
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)  # LoRA dropout draws from the global generator
        for batch in plan:
            done += 1
            if batch is not None:
                rows = batch.input_ids.size(0)
                for part in micro_batches(batch, micro_batch):
                    loss_sum += engine.accumulate(part, rows=rows, dp=dp is not None)
                seen += rows
                tokens += int(batch.attention_mask.sum())
            noise = None
            if dp is not None:  # after the batch's mask, as Opacus draws it
                std = dp.noise_multiplier * dp.max_grad_norm
                noise = [dp.random.normal(shape, std) for shape in shapes]
            engine.step(noise)  # an empty Poisson draw: the noise-only step the accountant counts
    return TrainStats(loss=loss_sum / max(seen, 1), steps=done, examples=seen, tokens=tokens,
                      seconds=time.perf_counter() - started)
