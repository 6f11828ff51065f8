"""The one local training loop, shared by simulation, deployment and benchmarks."""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from fedmilm.data.chat import Example, batches
from fedmilm.training.loss import token_loss_sum


@dataclass(frozen=True)
class TrainStats:
    """What one phone's local training did."""

    loss: float          # mean per-token training loss over all steps
    steps: int
    examples: int        # examples seen, counting epochs
    tokens: int          # tokens processed (inputs, not only labelled ones)
    seconds: float


def train_local(model: torch.nn.Module, params: list[torch.nn.Parameter],
                examples: list[Example], *, epochs: int, batch_size: int, lr: float,
                weight_decay: float, pad_id: int, seed: int) -> TrainStats:
    """AdamW on `params` over `epochs` shuffled passes; deterministic given `seed`.

    A fresh optimizer each round: phones keep no optimizer state between rounds (it would
    double the personal storage and go stale while the phone is not sampled).
    """
    if not examples:
        raise ValueError("no training examples on this phone")
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    generator = torch.Generator().manual_seed(seed)
    started = time.perf_counter()
    loss_sum, label_count, steps, seen, tokens = 0.0, 0, 0, 0, 0
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)  # LoRA dropout draws from the global generator
        model.train()
        for _ in range(epochs):
            for batch in batches(examples, batch_size=batch_size, pad_id=pad_id,
                                 generator=generator):
                total, count = token_loss_sum(model, batch)
                (total / max(count, 1)).backward()
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                loss_sum, label_count = loss_sum + float(total.detach()), label_count + count
                steps, seen = steps + 1, seen + batch.input_ids.size(0)
                tokens += int(batch.attention_mask.sum())
        model.eval()
    return TrainStats(loss=loss_sum / max(label_count, 1), steps=steps, examples=seen,
                      tokens=tokens, seconds=time.perf_counter() - started)
