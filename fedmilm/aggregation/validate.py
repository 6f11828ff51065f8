"""Reject bad client updates before they can touch the global adapter."""

from __future__ import annotations

from collections.abc import Mapping

import torch

from fedmilm.adapters.space import State

ALLOWED_DTYPES = (torch.float32, torch.float16)


def update_problem(update: Mapping[str, torch.Tensor], reference: State, *,
                   max_norm: float) -> str | None:
    """Why `update` must be rejected, or None if it is acceptable.

    Checks, in order: exactly the expected tensors, their shapes and dtypes, finiteness, and an
    L2 norm (over all tensors together) no larger than `max_norm`.
    """
    missing = sorted(set(reference) - set(update))
    extra = sorted(set(update) - set(reference))
    if missing or extra:
        return f"wrong tensors: {len(missing)} missing, {len(extra)} unexpected"
    squared = 0.0
    for key, ref in reference.items():
        value = update[key]
        if tuple(value.shape) != tuple(ref.shape):
            return f"{key}: shape {tuple(value.shape)}, expected {tuple(ref.shape)}"
        if value.dtype not in ALLOWED_DTYPES:
            return f"{key}: dtype {value.dtype} is not float32/float16"
        if not bool(torch.isfinite(value).all()):
            return f"{key}: contains NaN or inf"
        squared += float(value.to(torch.float32).pow(2).sum())
    norm = squared ** 0.5
    if norm > max_norm:
        return f"update norm {norm:.3g} exceeds federation.max_update_norm={max_norm:g}"
    return None
