"""Adapter states as ordered numpy arrays: the layout Flower's legacy APIs (SecAgg+) carry."""

from __future__ import annotations

import numpy as np
import torch

from fedmilm.adapters.space import State


def to_ndarrays(state: State) -> list[np.ndarray]:
    """float32 arrays in sorted key order: the layout both ends of SecAgg+ agree on."""
    return [state[k].detach().to(torch.float32).cpu().numpy() for k in sorted(state)]


def from_ndarrays(arrays: list[np.ndarray], reference: State) -> State:
    """Inverse of `to_ndarrays`; refuses a count or shape that does not fit `reference`."""
    keys = sorted(reference)
    if len(arrays) != len(keys):
        raise ValueError(f"{len(arrays)} arrays for {len(keys)} adapter tensors")
    out = {}
    for key, array in zip(keys, arrays, strict=True):
        if tuple(np.shape(array)) != tuple(reference[key].shape):
            raise ValueError(f"{key}: shape {tuple(np.shape(array))}, expected "
                             f"{tuple(reference[key].shape)}")
        out[key] = torch.from_numpy(np.array(array, dtype=np.float32))
    return out
