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
from fedmilm.privacy.randomness import PrivateRandom


def l2_norm(update: State) -> float:
    """L2 norm of all tensors of an update taken together."""
    return math.sqrt(sum(float(v.to(torch.float32).pow(2).sum()) for v in update.values()))


def clip_update(update: State, clip_norm: float) -> State:
    """Scale the update down to norm `clip_norm` if it is longer (never up)."""
    scale = min(1.0, clip_norm / max(l2_norm(update), 1e-12))
    return {k: v * scale for k, v in update.items()}


def noisy_mean(updates: list[State], reference: State, *, clip_norm: float,
               noise_multiplier: float, expected_clients: float,
               random: PrivateRandom) -> State:
    """(sum of clipped updates + Gaussian noise of std sigma * C) / expected_clients.

    `reference` gives keys and shapes, so an empty cohort still releases (pure) noise.
    """
    total = {key: sum((u[key].to(torch.float32) for u in updates),
                      torch.zeros_like(ref, dtype=torch.float32))
             for key, ref in reference.items()}
    return noised_total(total, clip_norm=clip_norm, noise_multiplier=noise_multiplier,
                        expected_clients=expected_clients, random=random)


def noised_total(total: State, *, clip_norm: float, noise_multiplier: float,
                 expected_clients: float, random: PrivateRandom) -> State:
    """(total + Gaussian noise of std sigma * C) / expected_clients, for a sum the server got
    either by adding the clipped updates itself or from secure aggregation."""
    std = noise_multiplier * clip_norm
    return {key: (value.to(torch.float32) + random.normal(value.shape, std)) / expected_clients
            for key, value in total.items()}


def upload_clip_norm(clip_norm: float, *, num_values: int, secagg_clip_range: float | None = None,
                     secagg_quant_range: int | None = None) -> float:
    """The norm a phone clips its update to before it leaves.

    Plain uploads: the accounted `clip_norm`. Through SecAgg+ each coordinate is stochastically
    rounded to a grid of step 2 * clip_range / quant_range, which can move an update by up to
    one step per coordinate, i.e. step * sqrt(num_values) in L2: the phone clips to `clip_norm`
    minus that, so what the server sums never exceeds the sensitivity the accountant assumes.
    """
    if secagg_clip_range is None or secagg_quant_range is None:
        return clip_norm
    room = 2 * secagg_clip_range / secagg_quant_range * math.sqrt(num_values)
    if room >= clip_norm / 2:
        raise ValueError(f"SecAgg+ quantisation error up to {room:.3g} leaves no room under "
                         f"privacy.user.clip_norm={clip_norm:g}; raise "
                         "aggregation.secagg_quant_range or lower aggregation.secagg_clip_range")
    return clip_norm - room
