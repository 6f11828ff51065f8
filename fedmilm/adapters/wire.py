"""Adapter states on the wire: `fp32`, `fp16`, or `int8` (one scale per tensor, unbiased
stochastic rounding), in both directions (`aggregation.upload`, `aggregation.download`).

`fp32` and `fp16` travel as Flower's numpy arrays. `int8` codes travel deflated where that
pays (zlib: the codes of an update cluster near zero, about 7 bits each instead of 8), else raw
(no `.npy` header either way), under the tensors' own names, plus one raw float32 array of
scales in sorted key order. Whatever arrives is checked from its metadata alone (`problem`)
before a byte of it is decoded, and inflating stops at the tensor's own size: a small message
cannot expand into a large one.
"""

from __future__ import annotations

import math
import zlib

import numpy as np
import torch
from flwr.app import Array, ArrayRecord

from fedmilm.adapters.space import State
from fedmilm.config.validate import WIRE_FORMATS
from fedmilm.privacy.randomness import PrivateRandom
from fedmilm.privacy.user_level import l2_norm

SCALES = "__scales__"      # int8: the per-tensor scales, float32, sorted key order
RAW = "fedmilm.raw"        # the values' bytes, little-endian, C order
DEFLATED = "fedmilm.deflate"  # stype of int8 codes where zlib makes them smaller (else RAW)
NPY_HEADER_SLACK = 4096    # bytes of .npy header allowed on top of a float tensor's own bytes
LEVELS = 127               # int8 codes in [-127, 127]: symmetric, so zero is exact
_FLOATS = {"fp32": ("float32", 4, torch.float32), "fp16": ("float16", 2, torch.float16)}
_SHRINK_TRIES = 8


def encode(state: State, fmt: str, random: PrivateRandom) -> ArrayRecord:
    """`state` in wire format `fmt`; `random` rounds int8 codes (unused by the float formats)."""
    if fmt in _FLOATS:
        dtype = _FLOATS[fmt][2]
        return ArrayRecord({k: v.detach().to(dtype) for k, v in state.items()})
    if fmt != "int8":
        raise ValueError(f"unknown wire format {fmt!r}; one of {WIRE_FORMATS}")
    arrays, scales = {}, []
    for key in sorted(state):
        codes, scale = _quantize(state[key].detach().to(torch.float64), random)
        arrays[key] = _codes(codes.numpy().astype(np.int8))
        scales.append(scale)
    arrays[SCALES] = _raw(np.array(scales, dtype=np.float32))
    return ArrayRecord(arrays)


def _quantize(values: torch.Tensor, random: PrivateRandom) -> tuple[torch.Tensor, float]:
    """int8 codes and the float32 scale of one tensor. The scale is rounded up to float32 so
    every |value| / scale <= 127: no code is ever clamped, so rounding stays unbiased."""
    peak = float(values.abs().max()) if values.numel() else 0.0
    if peak == 0.0:
        return torch.zeros(values.shape, dtype=torch.int64), 0.0
    scale = np.float32(peak / LEVELS)
    if float(scale) < peak / LEVELS:
        scale = np.nextafter(scale, np.float32(np.inf))
    return random.round_unbiased(values / float(scale)), float(scale)


def _codes(codes: np.ndarray) -> Array:
    """Deflated, or raw where deflating does not pay (a small tensor of spread-out codes)."""
    raw = codes.tobytes()
    packed = zlib.compress(raw, 6)
    smaller, stype = (packed, DEFLATED) if len(packed) < len(raw) else (raw, RAW)
    return Array(dtype="int8", shape=tuple(codes.shape), stype=stype, data=smaller)


def _raw(array: np.ndarray) -> Array:
    data = np.ascontiguousarray(array).astype(array.dtype.newbyteorder("<")).tobytes()
    return Array(dtype=str(array.dtype), shape=tuple(array.shape), stype=RAW, data=data)


def problem(arrays: ArrayRecord, reference: State, fmt: str) -> str | None:
    """Why `arrays` is not `reference` in format `fmt`, from metadata alone (names, dtypes,
    serialisation, shapes, byte sizes), or None: a sender cannot make the receiver decode an
    extra, oversized or mistyped tensor."""
    expected = set(reference) | ({SCALES} if fmt == "int8" else set())
    if len(arrays) != len(expected):
        return f"wrong tensors: {len(arrays)} arrays, expected {len(expected)} ({fmt})"
    unknown = [k for k in arrays if k not in expected]
    if unknown:
        return f"wrong tensors: {len(unknown)} unexpected (e.g. {unknown[0][:80]!r})"
    for key, array in arrays.items():
        shape = (len(reference),) if key == SCALES else tuple(reference[key].shape)
        if tuple(array.shape) != shape:
            return f"{key}: shape {tuple(array.shape)}, expected {shape}"
        if fmt == "int8":
            dtype, stypes = ("float32", (RAW,)) if key == SCALES else ("int8", (RAW, DEFLATED))
            if array.stype not in stypes or array.dtype != dtype:
                return f"{key}: dtype {array.dtype} ({array.stype}), but int8 carries {dtype}"
            size = math.prod(shape) * (4 if key == SCALES else 1)
            if (len(array.data) != size if array.stype == RAW
                    else len(array.data) >= size):  # deflated only where it is smaller
                return f"{key}: {len(array.data)} bytes for {size} values ({array.stype})"
            continue
        dtype, width, _ = _FLOATS[fmt]
        if array.stype != "numpy.ndarray" or array.dtype != dtype:
            return f"{key}: dtype {array.dtype} ({array.stype}), but {fmt} carries {dtype}"
        if len(array.data) > math.prod(shape) * width + NPY_HEADER_SLACK:
            return f"{key}: {len(array.data)} bytes for a {shape} tensor"
    return None


def decode(arrays: ArrayRecord, reference: State, fmt: str) -> State:
    """float32 tensors from `arrays`, which `problem` has passed. Raises ValueError on
    anything it cannot decode (a malformed `.npy`, a non-finite scale)."""
    if fmt in _FLOATS:
        try:
            return {k: v.to(torch.float32) for k, v in arrays.to_torch_state_dict().items()}
        except Exception as err:  # noqa: BLE001 - any undecodable payload is a bad message
            raise ValueError(f"undecodable arrays ({type(err).__name__})") from None
    scales = np.frombuffer(arrays[SCALES].data, dtype="<f4")
    if not np.isfinite(scales).all() or (scales < 0).any():
        raise ValueError("int8 scales must be finite and non-negative")
    out = {}
    for key, scale in zip(sorted(reference), scales.tolist(), strict=True):
        shape = reference[key].shape
        data = arrays[key].data
        if arrays[key].stype == DEFLATED:
            data = _inflate(data, math.prod(shape), key)
        codes = np.frombuffer(data, dtype=np.int8)
        out[key] = torch.from_numpy(codes.reshape(shape).astype(np.float32)) * scale
    return out


def _inflate(data: bytes, size: int, key: str) -> bytes:
    """Exactly `size` bytes out of a zlib stream, never more: refuses a stream that is cut
    short, runs on past `size`, or carries anything after its end."""
    inflater = zlib.decompressobj()
    try:
        out = inflater.decompress(data, size)
        beyond = b"" if inflater.eof else inflater.decompress(inflater.unconsumed_tail, 1)
    except zlib.error as err:
        raise ValueError(f"{key}: undecodable int8 codes ({err})") from None
    if len(out) != size or beyond or not inflater.eof or inflater.unused_data:
        raise ValueError(f"{key}: int8 codes do not inflate to exactly {size} bytes")
    return out


def encode_within(state: State, fmt: str, max_norm: float,
                  random: PrivateRandom) -> ArrayRecord:
    """`encode`, shrunk until what the receiver decodes has norm <= `max_norm`: user-level
    DP's sensitivity bound holds for the decoded update itself, quantisation error included.
    (int8 rounding lengthens a clipped update by about 1% at the default model; fp16 by
    float16's rounding.) Shrinking happens only when the encoded update is too long."""
    scaled = state
    for _ in range(_SHRINK_TRIES):
        arrays = encode(scaled, fmt, random)
        norm = l2_norm(decode(arrays, state, fmt))  # as the server measures it
        if norm <= max_norm:
            return arrays
        factor = max_norm / norm * (1 - 1e-6)
        scaled = {k: v.to(torch.float64) * factor for k, v in scaled.items()}
    raise RuntimeError(f"could not encode an update within norm {max_norm:g} as {fmt}")
