"""The one local training loop, shared by simulation, deployment and benchmarks.

With `dp` set it is DP-SGD (Abadi et al. 2016) through Opacus: Poisson-sampled batches,
per-example gradients clipped to `max_grad_norm`, Gaussian noise, and every noisy step charged to
the phone's accountant by Opacus's own optimizer hook.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from opacus import GradSampleModule
from opacus.optimizers import DPOptimizer

from fedmilm.data.chat import Batch, Example, batches, collate
from fedmilm.privacy.accountant import Accountant
from fedmilm.privacy.randomness import PrivateRandom
from fedmilm.training.loss import per_example_loss


@dataclass(frozen=True)
class TrainStats:
    """What one phone's local training did."""

    loss: float          # mean per-example training loss over all steps
    steps: int
    examples: int        # examples seen, counting epochs
    tokens: int          # tokens processed (inputs, not only labelled ones)
    seconds: float


@dataclass(frozen=True)
class DpSgd:
    """Per-example DP-SGD for one phone's local training."""

    noise_multiplier: float
    max_grad_norm: float
    accountant: Accountant  # charged once per noisy step
    random: PrivateRandom   # Poisson masks and noise: secret from everyone but the phone


class PrivateNoiseDPOptimizer(DPOptimizer):
    """Opacus's DP optimizer with its Gaussian noise drawn from the phone's `PrivateRandom`
    (Opacus's own secure mode needs torchcsprng, which has no build for this torch)."""

    def __init__(self, *args, random: PrivateRandom, **kwargs) -> None:  # noqa: ANN002,ANN003
        super().__init__(*args, **kwargs)
        self.private_random = random

    def add_noise(self) -> None:
        std = self.noise_multiplier * self.max_grad_norm
        for p in self.params:
            noise = self.private_random.normal(p.summed_grad.shape, std, p.summed_grad.dtype)
            p.grad = (p.summed_grad + noise.to(p.summed_grad.device)).view_as(p)


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
    Poisson draws from the phone's private randomness (DP-SGD). Every runtime (eager,
    ExecuTorch) trains on exactly this plan for the same generator and randomness."""
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


def _noise_only_step(optimizer: DPOptimizer | None, params: list[torch.nn.Parameter]) -> None:
    """The DP-SGD step of an empty batch: zero clipped gradients plus noise, charged by the
    optimizer's accountant hook like any other step."""
    assert optimizer is not None, "only Poisson sampling draws empty batches"
    for p in params:
        p.grad_sample = torch.zeros((0, *p.shape), dtype=p.dtype, device=p.device)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def train_local(model: torch.nn.Module, params: list[torch.nn.Parameter],
                examples: list[Example], *, epochs: int, batch_size: int, lr: float,
                weight_decay: float, pad_id: int, seed: int,
                dp: DpSgd | None = None, micro_batch: int | None = None) -> TrainStats:
    """AdamW on `params`; deterministic given `seed` without DP. Under DP-SGD the batches and
    the noise come from `dp.random`, which the seed does not determine.

    A fresh optimizer each round: phones keep no optimizer state between rounds (it would
    double the personal storage and go stale while the phone is not sampled). With
    `micro_batch`, each batch runs as several forward/backward passes whose gradients add up
    to the batch's (under DP-SGD: per-example gradients are clipped and summed across them and
    the step is noised once), so memory scales with the micro-batch, not the batch.
    """
    if not examples:
        raise ValueError("no training examples on this phone")
    optimizer: torch.optim.Optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    generator = torch.Generator().manual_seed(seed)
    module: torch.nn.Module = model
    plan = batch_plan(examples, epochs=epochs, batch_size=batch_size, pad_id=pad_id,
                      generator=generator, poisson=None if dp is None else dp.random)
    dp_optimizer: DPOptimizer | None = None
    if dp is not None:
        sample_rate = dp_sample_rate(len(examples), batch_size=batch_size)
        module = GradSampleModule(model, batch_first=True, loss_reduction="mean")
        optimizer = dp_optimizer = PrivateNoiseDPOptimizer(
            optimizer, noise_multiplier=dp.noise_multiplier, max_grad_norm=dp.max_grad_norm,
            expected_batch_size=batch_size, random=dp.random)
        optimizer.attach_step_hook(dp.accountant.opacus.get_optimizer_hook_fn(sample_rate))
    started = time.perf_counter()
    loss_sum, done, seen, tokens = 0.0, 0, 0, 0
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)  # LoRA dropout draws from the global generator
            module.train()
            for batch in plan:
                done += 1
                if batch is None:  # empty Poisson draw, probability (1-q)^n: a noise-only step,
                    _noise_only_step(dp_optimizer, params)  # as the accountant assumes
                    continue
                rows = batch.input_ids.size(0)
                parts = micro_batches(batch, micro_batch)
                for index, part in enumerate(parts):
                    losses = per_example_loss(module, part)  # (b,)
                    if dp_optimizer is None:  # weight 1/rows: the parts sum to the batch mean
                        (losses.sum() / rows).backward()
                    else:  # per-example gradients; clipped and summed into the step
                        losses.mean().backward()
                        if index < len(parts) - 1:
                            dp_optimizer.signal_skip_step(do_skip=True)
                            dp_optimizer.step()
                            dp_optimizer.zero_grad(set_to_none=True)
                    loss_sum += float(losses.detach().sum())
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                seen += rows
                tokens += int(batch.attention_mask.sum())
            module.eval()
    finally:
        if isinstance(module, GradSampleModule):
            module._close()  # removes Opacus hooks: the cached model serves the next phone
    return TrainStats(loss=loss_sum / max(seen, 1), steps=done, examples=seen, tokens=tokens,
                      seconds=time.perf_counter() - started)
