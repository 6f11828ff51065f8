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
    total = {key: sum((u[key].to(torch.float32) for u in updates),
                      torch.zeros_like(ref, dtype=torch.float32))
             for key, ref in reference.items()}
    return noised_total(total, clip_norm=clip_norm, noise_multiplier=noise_multiplier,
                        expected_clients=expected_clients, generator=generator)


def noised_total(total: State, *, clip_norm: float, noise_multiplier: float,
                 expected_clients: float, generator: torch.Generator) -> State:
    """(total + Gaussian noise of std sigma * C) / expected_clients, for a sum the server got
    either by adding the clipped updates itself or from secure aggregation."""
    std = noise_multiplier * clip_norm
    return {key: (value.to(torch.float32)
                  + torch.normal(0.0, std, size=value.shape, generator=generator))
            / expected_clients for key, value in total.items()}
