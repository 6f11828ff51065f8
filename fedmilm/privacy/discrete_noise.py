"""Integer noise for distributed DP: exact Poisson and Skellam draws from a `PrivateRandom`.

Phones add Skellam noise (the difference of two Poissons) to their integer SecAgg+ vectors: a
sum of independent Skellams is again Skellam, so whatever subset of phones arrives, the server
sees one Skellam mechanism whose variance is the sum of the shares that arrived.

Poisson draws use Hoermann's transformed rejection (PTRS, 1993) for means of 10 and more and
inversion below. The acceptance test needs log p(k) near the mode of a Poisson whose mean may be
1e10: `-lam + k log lam - lgamma(k + 1)` loses about 1e-5 there to cancellation, so
`log_poisson_pmf` writes it as `t - k log1p(t / lam)` (t = k - lam) plus Stirling's series,
accurate to about 1e-12 in the range used.
"""

from __future__ import annotations

import math

import torch

from fedmilm.privacy.randomness import PrivateRandom

_PTRS_MIN_MEAN = 10.0  # PTRS's constants are valid from here on
_STIRLING_MIN_K = 10   # below: lgamma directly (no cancellation at small k)


def log_poisson_pmf(k: torch.Tensor, lam: float) -> torch.Tensor:
    """log P(K = k) for K ~ Poisson(lam), k >= 0 (float64), stable for huge `lam`."""
    k = k.to(torch.float64)
    direct = -lam + k * math.log(lam) - torch.lgamma(k + 1)
    big = k.clamp(min=_STIRLING_MIN_K)
    t = big - lam
    series = (1 / (12 * big) - 1 / (360 * big**3) + 1 / (1260 * big**5)
              - 1 / (1680 * big**7))  # Stirling's series of lgamma(k + 1)
    stable = t - big * torch.log1p(t / lam) - 0.5 * torch.log(2 * math.pi * big) - series
    return torch.where(k >= _STIRLING_MIN_K, stable, direct)


def poisson(count: int, lam: float, random: PrivateRandom) -> torch.Tensor:
    """`count` independent Poisson(lam) draws (int64)."""
    if lam < 0 or not math.isfinite(lam):
        raise ValueError(f"Poisson mean must be finite and >= 0, got {lam}")
    if count == 0 or lam == 0:
        return torch.zeros(count, dtype=torch.int64)
    if lam < _PTRS_MIN_MEAN:
        return _inversion(count, lam, random)
    return _ptrs(count, lam, random)


def skellam(shape: tuple[int, ...], variance: float, random: PrivateRandom) -> torch.Tensor:
    """Symmetric Skellam noise (Poisson(variance/2) - Poisson(variance/2)), int64."""
    count = math.prod(shape)
    return (poisson(count, variance / 2, random) - poisson(count, variance / 2, random)).view(shape)


def _inversion(count: int, lam: float, random: PrivateRandom) -> torch.Tensor:
    """Sequential search of the CDF: exact, and short for small means."""
    u = random.uniform(count)
    k = torch.zeros(count, dtype=torch.int64)
    p = torch.full((count,), math.exp(-lam), dtype=torch.float64)
    cdf = p.clone()
    active = u >= cdf
    n = 0
    while bool(active.any()):
        n += 1
        p = p * (lam / n)
        k = k + active.to(torch.int64)
        cdf = cdf + p
        active = active & (u >= cdf)
        if n > 1000:  # cdf has reached 1 - 2^-53: the remaining u are rounding artefacts
            break
    return k


def _ptrs(count: int, lam: float, random: PrivateRandom) -> torch.Tensor:
    """Transformed rejection with squeeze (Hoermann 1993): about 1.15 pairs of uniforms per draw."""
    b = 0.931 + 2.53 * math.sqrt(lam)
    a = -0.059 + 0.02483 * b
    log_inv_alpha = math.log(1.1239 + 1.1328 / (b - 3.4))
    v_r = 0.9277 - 3.6224 / (b - 2)
    out = torch.empty(count, dtype=torch.int64)
    todo = torch.arange(count)
    while todo.numel():
        n = todo.numel()
        u = random.uniform(n) - 0.5
        v = random.uniform(n)
        us = 0.5 - u.abs()
        k = torch.floor((2 * a / us + b) * u + lam + 0.43)
        quick = (us >= 0.07) & (v <= v_r)
        valid = (k >= 0) & ~((us < 0.013) & (v > us))
        log_accept = torch.log(v) + log_inv_alpha - torch.log(a / (us * us) + b)
        slow = valid & (log_accept <= log_poisson_pmf(k.clamp(min=0), lam))
        accepted = quick | slow
        out[todo[accepted]] = k[accepted].to(torch.int64)
        todo = todo[~accepted]
    return out
