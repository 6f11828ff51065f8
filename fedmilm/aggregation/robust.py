"""Byzantine-robust alternatives to the mean, delegated to Flower's published implementations.

Flower's `flwr.server.strategy.aggregate` functions work on lists of numpy arrays; this module
only converts our `State` (name -> tensor) to and from that layout, in a fixed key order.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from flwr.server.strategy.aggregate import (
    aggregate_krum,
    aggregate_median,
    aggregate_trimmed_avg,
)

from fedmilm.adapters.space import State


def robust_mean(updates: Sequence[State], *, method: str, trim_fraction: float = 0.2,
                byzantine: int = 1) -> State:
    """Coordinate-wise trimmed mean, coordinate-wise median, or Krum's single most central
    update. Example counts are ignored on purpose: a liar could inflate them."""
    if not updates:
        raise ValueError("nothing to aggregate")
    keys = list(updates[0])
    results = [([u[k].to(torch.float32).numpy() for k in keys], 1) for u in updates]
    if method == "trimmed_mean":
        arrays = aggregate_trimmed_avg(results, trim_fraction)
    elif method == "median":
        arrays = aggregate_median(results)
    elif method == "krum":
        arrays = aggregate_krum(results, num_malicious=byzantine, to_keep=0)
    else:
        raise ValueError(f"unknown robust aggregation method {method!r}")
    return {k: torch.from_numpy(np.asarray(a, dtype=np.float32)) for k, a in
            zip(keys, arrays, strict=True)}
