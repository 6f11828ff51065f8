"""The randomness a differential-privacy guarantee rests on.

Every draw the accountant's analysis assumes to be secret (DP-SGD's Poisson batch masks and its
noise on a phone, the server's user-level noise and its Poisson cohort) comes from a
`PrivateRandom`. The real one, `SecureRandom`, is a ChaCha20 keystream keyed with 256 bits from
the OS's CSPRNG when it is created: no config value, seed, round or id determines it, and its key
is never written anywhere. `SeededRandom` reproduces the draws from a seed and exists only for
tests (`privacy.seeded_noise=true`); anyone who knows the seed can replay it.

Gaussian noise is drawn the way Opacus's `secure_mode` draws it: the sum of four independent
normals divided by two (same variance), which defeats the floating-point attacks on a single
Gaussian sample (Holohan & Braghin 2021, section 5.1; Jin et al. 2022). Normals come from
Box-Muller in float64 over 53-bit uniforms.
"""

from __future__ import annotations

import math
import os
from abc import ABC, abstractmethod

import torch
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms

_MANTISSA = (1 << 53) - 1


class PrivateRandom(ABC):
    """Uniforms and Gaussian noise for DP mechanisms."""

    test_seed: int | None = None  # set only by `SeededRandom`: the seed anyone can replay

    @abstractmethod
    def uniform(self, n: int) -> torch.Tensor:
        """`n` float64 values uniform in [0, 1)."""

    def normal(self, shape: torch.Size | tuple[int, ...], std: float,
               dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """N(0, std^2) noise of `shape`, as a sum of four normals over two (Opacus's secure
        mode)."""
        count = math.prod(shape)
        if std == 0 or count == 0:
            return torch.zeros(shape, dtype=dtype)
        total = self._standard_normals(4 * count).view(4, count).sum(dim=0) / 2
        return (total * std).to(dtype).view(shape)

    def round_unbiased(self, values: torch.Tensor) -> torch.Tensor:
        """`values` (float64) rounded to an integer neighbour at random, up with probability
        equal to the fractional part, so the expectation is `values` itself (int64)."""
        low = torch.floor(values)
        up = self.uniform(values.numel()).view(values.shape) < (values - low)
        return low.to(torch.int64) + up.to(torch.int64)

    def _standard_normals(self, n: int) -> torch.Tensor:
        """`n` float64 standard normals by Box-Muller (both the cosine and the sine branch)."""
        pairs = (n + 1) // 2
        u = self.uniform(2 * pairs).view(2, pairs)
        radius = torch.sqrt(-2.0 * torch.log1p(-u[0]))  # 1 - u in (0, 1]: log is finite
        angle = 2.0 * math.pi * u[1]
        return torch.cat([radius * torch.cos(angle), radius * torch.sin(angle)])[:n]


class SecureRandom(PrivateRandom):
    """A CSPRNG: ChaCha20 keystream under a fresh OS-random key and nonce per instance."""

    def __init__(self) -> None:
        cipher = Cipher(algorithms.ChaCha20(os.urandom(32), os.urandom(16)), mode=None)
        self._stream = cipher.encryptor()

    def uniform(self, n: int) -> torch.Tensor:
        raw = self._stream.update(bytes(8 * n))
        words = torch.frombuffer(bytearray(raw), dtype=torch.int64)
        return (words & _MANTISSA).to(torch.float64) * 2.0**-53


class SeededRandom(PrivateRandom):
    """Reproducible draws from `seed`: tests only, never for real users."""

    def __init__(self, seed: int) -> None:
        self.test_seed = seed
        self.generator = torch.Generator().manual_seed(seed)

    def uniform(self, n: int) -> torch.Tensor:
        return torch.rand(n, dtype=torch.float64, generator=self.generator)


def private_random(test_seed: int | None = None) -> PrivateRandom:
    """`SecureRandom`, or `SeededRandom(test_seed)` when a test asked for reproducible DP."""
    return SecureRandom() if test_seed is None else SeededRandom(test_seed)
