"""The eager runtime's arithmetic: PyTorch + PEFT, and Opacus for DP-SGD.

`train_local` runs the shared skeleton (`fedmilm.training.skeleton`) with an `EagerEngine`. Under
DP-SGD the per-example gradients and their clipping are Opacus's (`GradSampleModule` hooks and
`DPOptimizer`); the skeleton hands each step its noise, drawn from the phone's private
randomness.
"""

from __future__ import annotations

import torch
from opacus import GradSampleModule
from opacus.optimizers import DPOptimizer

from fedmilm.data.chat import Batch, Example
from fedmilm.training.loss import per_example_loss
from fedmilm.training.skeleton import DpNoise, TrainStats, run_steps


class GivenNoiseDPOptimizer(DPOptimizer):
    """Opacus's DP optimizer adding the noise the skeleton drew from the phone's
    `PrivateRandom` (Opacus's own secure mode needs torchcsprng, which has no build for this
    torch)."""

    noise: list[torch.Tensor] | None = None

    def add_noise(self) -> None:
        assert self.noise is not None, "the skeleton hands every DP step its noise"
        for p, z in zip(self.params, self.noise, strict=True):
            p.grad = (p.summed_grad + z.to(p.summed_grad)).view_as(p)


class EagerEngine:
    """AdamW on `params` of `model`; with `dp`, Opacus's per-example clipping."""

    def __init__(self, model: torch.nn.Module, params: list[torch.nn.Parameter], *, lr: float,
                 weight_decay: float, batch_size: int, dp: DpNoise | None) -> None:
        self.params = params
        self.module: torch.nn.Module = model
        self.optimizer: torch.optim.Optimizer = torch.optim.AdamW(params, lr=lr,
                                                                  weight_decay=weight_decay)
        self.dp_optimizer: GivenNoiseDPOptimizer | None = None
        if dp is not None:
            self.module = GradSampleModule(model, batch_first=True, loss_reduction="mean")
            self.optimizer = self.dp_optimizer = GivenNoiseDPOptimizer(
                self.optimizer, noise_multiplier=dp.noise_multiplier,
                max_grad_norm=dp.max_grad_norm, expected_batch_size=batch_size)

    def adapter_shapes(self) -> list[torch.Size]:
        return [p.shape for p in self.params]

    def accumulate(self, part: Batch, *, rows: int, dp: bool) -> float:
        losses = per_example_loss(self.module, part)  # (b,)
        if self.dp_optimizer is None:  # weight 1/rows: the parts sum to the batch mean
            (losses.sum() / rows).backward()
        else:  # per-example gradients, clipped and added to the step's sum (no step yet)
            losses.mean().backward()
            self.dp_optimizer.signal_skip_step(do_skip=True)
            self.dp_optimizer.step()
            self.dp_optimizer.zero_grad(set_to_none=True)
        return float(losses.detach().sum())

    def step(self, noise: list[torch.Tensor] | None) -> None:
        if self.dp_optimizer is not None:  # nothing left to clip: add the noise, scale, step
            for p in self.params:
                p.grad_sample = torch.zeros((0, *p.shape), dtype=p.dtype, device=p.device)
            self.dp_optimizer.noise = noise
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

    def close(self) -> None:
        """Remove Opacus's hooks: the cached model serves the next phone."""
        if isinstance(self.module, GradSampleModule):
            self.module._close()


def train_local(model: torch.nn.Module, params: list[torch.nn.Parameter],
                examples: list[Example], *, epochs: int, batch_size: int, lr: float,
                weight_decay: float, pad_id: int, seed: int,
                dp: DpNoise | None = None, micro_batch: int | None = None) -> TrainStats:
    """AdamW on `params` through the eager model; deterministic given `seed` without DP.

    A fresh optimizer each round: phones keep no optimizer state between rounds (it would
    double the personal storage and go stale while the phone is not sampled). With
    `micro_batch`, each batch runs as several forward/backward passes whose gradients add up
    to the batch's (under DP-SGD: per-example gradients are clipped and summed across them and
    the step is noised once), so memory scales with the micro-batch, not the batch. Charges no
    accountant (`train_phone` does).
    """
    engine = EagerEngine(model, params, lr=lr, weight_decay=weight_decay,
                         batch_size=batch_size, dp=dp)
    model.train()
    try:
        return run_steps(engine, examples, epochs=epochs, batch_size=batch_size, pad_id=pad_id,
                         seed=seed, dp=dp, micro_batch=micro_batch)
    finally:
        model.eval()
        engine.close()
