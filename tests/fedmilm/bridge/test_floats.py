"""What a bridged phone uploads is untrusted: exact size and finite values, or refused."""

from __future__ import annotations

import math
import struct

import pytest
import torch

from fedmilm.bridge import floats

SHAPES = [[2, 3], [4], [1, 1]]


def test_tensors_round_trip_in_order_as_little_endian_float32():
    tensors = [torch.randn(*shape) for shape in SHAPES]
    blob = floats.pack(tensors)
    assert len(blob) == floats.size_of(SHAPES) == 4 * 11
    assert blob[:4] == struct.pack("<f", float(tensors[0][0, 0]))
    for got, sent in zip(floats.unpack(blob, SHAPES), tensors, strict=True):
        assert got.dtype == torch.float32 and torch.equal(got, sent)


@pytest.mark.parametrize("blob", [b"", b"\0" * 43, b"\0" * 48, b"\0" * (1 << 20)])
def test_any_other_size_is_refused(blob):
    with pytest.raises(ValueError, match="bytes, the tensors need 44"):
        floats.unpack(blob, SHAPES)


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_non_finite_values_are_refused(bad):
    blob = floats.pack([torch.zeros(*shape) for shape in SHAPES])
    with pytest.raises(ValueError, match="non-finite"):
        floats.unpack(struct.pack("<f", bad) + blob[4:], SHAPES)
