"""User-level DP on the aggregate: clip each phone's update, noise the sum (DP-FedAvg).

McMahan et al. 2018, "Learning Differentially Private Recurrent Language Models": each user's
update is clipped to L2 norm C, the server sums them, adds N(0, (sigma C)^2) per coordinate and
divides by the *expected* cohort size q N (the fixed-denominator estimator), so one user changes
the released value by at most C / (q N) whatever the others sent.
"""

from __future__ import annotations

import math

import torch

from fedmilm.adapters.space import State


def l2_norm(update: State) -> float:
    """L2 norm of all tensors of an update taken together."""
    return math.sqrt(sum(float(v.to(torch.float32).pow(2).sum()) for v in update.values()))


def clip_update(update: State, clip_norm: float) -> State:
    """Scale the update down to norm `clip_norm` if it is longer (never up)."""
    scale = min(1.0, clip_norm / max(l2_norm(update), 1e-12))
    return {k: v * scale for k, v in update.items()}


def noisy_mean(updates: list[State], reference: State, *, clip_norm: float,
               noise_multiplier: float, expected_clients: float,
               generator: torch.Generator) -> State:
    """(sum of clipped updates + Gaussian noise of std sigma * C) / expected_clients.

    `reference` gives keys and shapes, so an empty cohort still releases (pure) noise.
    """
    std = noise_multiplier * clip_norm
    out = {}
    for key, ref in reference.items():
        total = torch.zeros_like(ref, dtype=torch.float32)
        for update in updates:
            total += update[key].to(torch.float32)
        noise = torch.normal(0.0, std, size=ref.shape, generator=generator)
        out[key] = (total + noise) / expected_clients
    return out
