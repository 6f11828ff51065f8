"""Facts of SecAgg+'s integer grid that configs are checked against (no heavy imports: the
config validator uses them)."""

from __future__ import annotations

import math

FLOAT32_EXACT = 2**24   # a grid index below this is exact in float32
SECAGG_MODULUS = 2**32  # Flower's default modulus: masked sums live in Z / 2^32


def is_power_of_two(value: float) -> bool:
    """True for 2^k, k any integer (so 0.5 and 8.0 are, 6.0 is not)."""
    return value > 0 and math.frexp(value)[0] == 0.5
