"""Adapter states on the wire: round trips, unbiased int8, the DP norm bound, and refusals."""

from __future__ import annotations

import math
import zlib

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord

from fedmilm.adapters import wire
from fedmilm.privacy.randomness import SecureRandom, SeededRandom
from fedmilm.privacy.user_level import l2_norm

REF = {"q.lora_A.weight": torch.zeros(8, 48), "q.lora_B.weight": torch.zeros(48, 8),
       "v.lora_B.weight": torch.zeros(16, 8)}


def _state(seed: int = 0, scale: float = 0.01) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return {k: torch.randn(v.shape, generator=gen) * scale for k, v in REF.items()}


def test_the_float_formats_round_trip_at_their_precision():
    state = _state()
    exact = wire.decode(wire.encode(state, "fp32", SeededRandom(0)), REF, "fp32")
    assert all(torch.equal(exact[k], state[k]) for k in REF)
    half = wire.encode(state, "fp16", SeededRandom(0))
    assert all(a.dtype == "float16" for a in half.values())
    back = wire.decode(half, REF, "fp16")
    for key in REF:
        assert back[key].dtype == torch.float32
        torch.testing.assert_close(back[key], state[key], rtol=2**-10, atol=1e-7)
    assert all(len(half[k].data) <= 2 * REF[k].numel() + 128 for k in REF)  # 2 bytes + header


def test_int8_is_at_most_one_byte_a_value_plus_one_scale_a_tensor():
    state = _state()
    state["q.lora_B.weight"][0, 0] = 1.0  # one outlier: the others' codes cluster near zero
    arrays = wire.encode(state, "int8", SeededRandom(0))
    values = sum(v.numel() for v in REF.values())
    assert arrays["q.lora_B.weight"].stype == wire.DEFLATED  # deflating paid
    assert len(arrays["q.lora_B.weight"].data) < REF["q.lora_B.weight"].numel() / 2
    assert sum(len(a.data) for a in arrays.values()) < values + 4 * len(REF)
    back = wire.decode(arrays, REF, "int8")
    scales = np.frombuffer(arrays[wire.SCALES].data, dtype="<f4")
    for key, scale in zip(sorted(REF), scales, strict=True):
        assert float(scale) >= float(state[key].abs().max()) / 127  # rounded up, never below
        assert float((back[key] - state[key]).abs().max()) <= float(scale) * (1 + 1e-6)
        data = arrays[key].data
        codes = np.frombuffer(zlib.decompress(data) if arrays[key].stype == wire.DEFLATED
                              else data, dtype=np.int8)
        assert codes.size == REF[key].numel()
        assert codes.min() >= -127 and codes.max() <= 127
        assert 127 in np.abs(codes)  # the largest value uses the whole range


def test_int8_rounding_is_unbiased():
    """The mean of many decodings converges to the value itself; rounding to the nearest
    code would stay off by up to half a step for most values."""
    state = {"t": torch.linspace(-1, 1, 301) ** 3}
    trials = 2000
    random = SeededRandom(5)
    total = torch.zeros(301, dtype=torch.float64)
    for _ in range(trials):
        total += wire.decode(wire.encode(state, "int8", random), {"t": state["t"]},
                             "int8")["t"].to(torch.float64)
    step = 1 / 127
    sigma = step / 2 / math.sqrt(trials)  # the largest standard deviation of the mean
    assert float((total / trials - state["t"]).abs().max()) < 6 * sigma
    nearest = torch.round(state["t"] / step) * step
    assert float((nearest - state["t"]).abs().max()) > 20 * sigma  # what the test would catch


def test_int8_rounding_draws_are_not_reproducible_from_public_values():
    state = _state()
    first, again = (wire.encode(state, "int8", SecureRandom()) for _ in range(2))
    assert any(first[k].data != again[k].data for k in REF)


def test_a_zero_tensor_travels_as_zeros():
    state = {**_state(), "v.lora_B.weight": torch.zeros(16, 8)}
    back = wire.decode(wire.encode(state, "int8", SeededRandom(0)), REF, "int8")
    assert torch.equal(back["v.lora_B.weight"], torch.zeros(16, 8))


@pytest.mark.parametrize("fmt", ["fp16", "int8"])
def test_an_encoded_update_stays_within_the_dp_clip(fmt):
    """Clipped to exactly C, then quantised: what the server decodes must still have norm <= C
    (plain encoding crosses it: the check would catch a codec that forgot)."""
    clip = 1.0
    crossed = 0
    for seed in range(40):
        state = _state(seed)
        norm = l2_norm(state)
        state = {k: v * (clip / norm) for k, v in state.items()}
        random = SeededRandom(seed)
        within = wire.decode(wire.encode_within(state, fmt, clip, random), REF, fmt)
        assert l2_norm(within) <= clip
        plain = wire.decode(wire.encode(state, fmt, random), REF, fmt)
        crossed += l2_norm(plain) > clip
    assert crossed > 0


def _int8() -> ArrayRecord:
    return wire.encode(_state(), "int8", SeededRandom(0))


def _with(record: ArrayRecord, key: str, array: Array) -> ArrayRecord:
    out = ArrayRecord({k: v for k, v in record.items()})
    out[key] = array
    return out


BAD = {
    "float32 where int8 is expected": ("int8", lambda: wire.encode(_state(), "fp32",
                                                                   SeededRandom(0))),
    "int8 where float32 is expected": ("fp32", _int8),
    "float16 where float32 is expected": ("fp32", lambda: wire.encode(_state(), "fp16",
                                                                      SeededRandom(0))),
    "oversized codes": ("int8", lambda: _with(_int8(), "q.lora_A.weight", Array(
        dtype="int8", shape=(8, 48), stype=wire.DEFLATED, data=b"\0" * 10_000_000))),
    "short raw codes": ("int8", lambda: _with(_int8(), "q.lora_A.weight", Array(
        dtype="int8", shape=(8, 48), stype=wire.RAW, data=b"\0" * 383))),
    "numpy-typed codes": ("int8", lambda: _with(_int8(), "q.lora_A.weight", Array(
        dtype="int8", shape=(8, 48), stype="numpy.ndarray", data=b"\0" * 384))),
    "wrong shape": ("int8", lambda: _with(_int8(), "q.lora_A.weight", Array(
        dtype="int8", shape=(48, 8), stype=wire.DEFLATED, data=zlib.compress(b"\0" * 384)))),
    "no scales": ("int8", lambda: ArrayRecord({k: v for k, v in _int8().items()
                                               if k != wire.SCALES})),
    "numpy codes": ("int8", lambda: _with(_int8(), "q.lora_A.weight",
                                          Array(np.zeros((8, 48), dtype=np.int8)))),
    "an extra tensor": ("int8", lambda: _with(_int8(), "lm_head.weight", Array(
        dtype="int8", shape=(2,), stype=wire.DEFLATED, data=zlib.compress(b"\0\0")))),
    "oversized float payload": ("fp32", lambda: _with(
        wire.encode(_state(), "fp32", SeededRandom(0)), "q.lora_A.weight",
        Array(dtype="float32", shape=(8, 48), stype="numpy.ndarray", data=b"\0" * 10_000_000))),
}


@pytest.mark.parametrize("name", sorted(BAD))
def test_a_malformed_message_is_refused_from_its_metadata(name):
    fmt, build = BAD[name]
    assert wire.problem(build(), REF, fmt) is not None


@pytest.mark.parametrize("scale", [float("nan"), float("inf"), -1.0])
def test_bad_int8_scales_are_refused(scale):
    arrays = _with(_int8(), wire.SCALES, Array(
        dtype="float32", shape=(3,), stype=wire.RAW,
        data=np.array([1.0, scale, 1.0], dtype="<f4").tobytes()))
    assert wire.problem(arrays, REF, "int8") is None  # well-formed: refused when decoded
    with pytest.raises(ValueError, match="scales"):
        wire.decode(arrays, REF, "int8")


INFLATE = {
    "a bomb": zlib.compress(b"\0" * 300_000),  # 300 KB from 0.3 KB: stops at 385 bytes
    "too short": zlib.compress(b"\0" * 100),
    "cut off": zlib.compress(bytes(range(256)) + bytes(128))[:-6],
    "trailing bytes": zlib.compress(b"\0" * 384) + b"more",
    "not zlib": b"\x00\x01\x02" * 50,
}


@pytest.mark.parametrize("name", sorted(INFLATE))
def test_int8_codes_inflate_to_exactly_their_size_or_are_refused(name):
    """Small enough to pass the metadata check, the codes are refused when decoded, and
    decoding never produces more than the tensor's own bytes."""
    arrays = _with(_int8(), "q.lora_A.weight", Array(
        dtype="int8", shape=(8, 48), stype=wire.DEFLATED, data=INFLATE[name]))
    assert wire.problem(arrays, REF, "int8") is None  # smaller than 384 bytes: it passes
    with pytest.raises(ValueError, match="q.lora_A.weight"):
        wire.decode(arrays, REF, "int8")
