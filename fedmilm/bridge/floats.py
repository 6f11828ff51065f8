"""Tensors on the bridge's wire: raw float32 little-endian, one after another in manifest
order. The exported programs take the adapter as inputs, so a phone needs no FlatTensor reader
or writer, only the manifest's shapes."""

from __future__ import annotations

import math

import numpy as np
import torch


def pack(tensors: list[torch.Tensor]) -> bytes:
    return b"".join(t.detach().to(torch.float32).contiguous().numpy().astype("<f4").tobytes()
                    for t in tensors)


def size_of(shapes: list[list[int]]) -> int:
    """Bytes of the tensors with these shapes."""
    return 4 * sum(math.prod(shape) for shape in shapes)


def unpack(blob: bytes, shapes: list[list[int]]) -> list[torch.Tensor]:
    """The tensors of `blob`; `ValueError` unless it has exactly their size and only finite
    values."""
    if len(blob) != size_of(shapes):
        raise ValueError(f"{len(blob):,} bytes, the tensors need {size_of(shapes):,}")
    values = np.frombuffer(blob, dtype="<f4")
    if not np.isfinite(values).all():
        raise ValueError("non-finite values")
    tensors, start = [], 0
    for shape in shapes:
        count = math.prod(shape)
        tensors.append(torch.from_numpy(values[start:start + count].astype(np.float32))
                       .reshape(shape))
        start += count
    return tensors
