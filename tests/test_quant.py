"""The quantization format against a slow, obviously-correct per-group Python implementation."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

import lmcache
from lmcache.quant import QuantSpec, hadamard


def slow_quantize(x: np.ndarray, bits: int, group: int, axis: int):
    """One group at a time, one value at a time, exactly as DESIGN.md words it.

    Returns (codes unpacked [same shape as x], scale, lo, packed bytes).
    """
    x = np.asarray(x)
    sdt = np.float32 if x.dtype in (np.float32, np.float64) else np.float16
    qmax = 2**bits - 1
    xm = np.moveaxis(x.astype(np.float32), axis, -1)  # group axis last
    lead, n = xm.shape[:-1], xm.shape[-1]
    codes = np.zeros(xm.shape, np.uint8)
    scale = np.zeros(lead + (n // group,), sdt)
    lo_out = np.zeros(lead + (n // group,), sdt)
    for idx in itertools.product(*[range(s) for s in lead]):
        for gi in range(n // group):
            vals = xm[idx][gi * group:(gi + 1) * group]
            lo = np.float32(min(vals))
            hi = np.float32(max(vals))
            s = sdt(np.float32(hi - lo) / np.float32(qmax))
            lo_s = sdt(lo)
            if s == 0:
                s = sdt(1)
            scale[idx + (gi,)] = s
            lo_out[idx + (gi,)] = lo_s
            for j, val in enumerate(vals):
                t = np.float32(np.float32(val) - np.float32(lo_s)) / np.float32(s)
                c = round(float(t))  # Python rounds half to even
                codes[idx + (gi * group + j,)] = min(max(c, 0), qmax)
    codes = np.moveaxis(codes, -1, axis)
    scale = np.moveaxis(scale, -1, axis)
    lo_out = np.moveaxis(lo_out, -1, axis)
    # pack along the last axis, little end first
    per = 8 // bits
    flat = codes.reshape(-1, codes.shape[-1])
    packed = np.zeros((flat.shape[0], flat.shape[1] // per), np.uint8)
    for r in range(flat.shape[0]):
        for i in range(flat.shape[1]):
            packed[r, i // per] |= int(flat[r, i]) << (bits * (i % per))
    return codes, scale, lo_out, packed.reshape(codes.shape[:-1] + (codes.shape[-1] // per,))


# odd shapes: every axis length other than the grouped one is odd or prime-ish
CASES = [
    # shape, bits, group, axis
    ((3, 5, 24, 12), 4, 8, -2),
    ((3, 5, 24, 12), 2, 6, -1),
    ((2, 3, 21, 8), 8, 7, -2),
    ((1, 7, 9, 20), 4, 5, -1),
    ((5, 16), 2, 16, -1),
    ((3, 5, 7, 12), 4, 6, -1),  # groups along the last axis whose size packs whole bytes (transposed path)
    ((2, 1, 40, 4), 2, 40, -2),
]


@pytest.mark.parametrize("shape,bits,group,axis", CASES)
@pytest.mark.parametrize("dtype", [np.float32, np.float16])
def test_codes_match_slow_reference(shape, bits, group, axis, dtype, rng):
    x = (rng.standard_normal(shape) * rng.uniform(0.1, 10, size=shape[-1:])).astype(dtype)
    q = lmcache.quantize(x, bits=bits, group_size=group, axis=axis)
    codes, scale, lo, packed = slow_quantize(x, bits, group, axis)
    np.testing.assert_array_equal(q.codes, packed)
    np.testing.assert_array_equal(q.scale, scale)
    np.testing.assert_array_equal(q.lo, lo)
    assert q.scale.dtype == (np.float32 if dtype == np.float32 else np.float16)
    # reconstruction: within half a step; for float16 storage also the rounding of the stored lo
    # and scale (at most qmax times the scale's rounding), and float16 output rounding
    x2 = lmcache.dequantize(q)
    assert x2.shape == x.shape and x2.dtype == x.dtype
    xf = x.astype(np.float32)
    err = np.abs(x2.astype(np.float32) - xf)
    step = np.repeat(scale.astype(np.float32), group, axis=axis)
    if dtype == np.float32:
        assert np.all(err <= step / 2 * (1 + 1e-5) + 1e-6)
    else:
        grouped = np.moveaxis(xf, axis, -1)
        grouped = grouped.reshape(grouped.shape[:-1] + (-1, group))
        lo32 = np.moveaxis(grouped.min(-1), -1, axis)
        s32 = np.moveaxis((grouped.max(-1) - grouped.min(-1)) / (2**bits - 1), -1, axis)
        storage = np.abs(lo.astype(np.float32) - lo32) + (2**bits - 1) * np.abs(scale.astype(np.float32) - s32)
        bound = step / 2 + np.repeat(storage, group, axis=axis) + np.abs(xf) * 2**-10
        assert np.all(err <= bound + 1e-6)


def test_constant_group_gets_scale_one_and_code_zero():
    x = np.full((2, 8), 3.5, np.float32)
    q = lmcache.quantize(x, bits=4, group_size=8, axis=-1)
    assert np.all(q.scale == 1) and np.all(q.codes == 0)
    np.testing.assert_array_equal(lmcache.dequantize(q), x)


def test_round_half_even():
    # lo=0, hi=15 -> scale 1: x=0.5 -> 0, 1.5 -> 2, 2.5 -> 2 (half to even)
    x = np.array([[0.0, 0.5, 1.5, 2.5, 3.5, 15.0, 4.0, 5.0]], np.float32)
    q = lmcache.quantize(x, bits=4, group_size=8, axis=-1)
    codes, *_ = slow_quantize(x, 4, 8, -1)
    assert codes.tolist() == [[0, 0, 2, 2, 4, 15, 4, 5]]
    np.testing.assert_array_equal(q.codes, [[0x00, 0x22, 0xF4, 0x54]])


def test_packing_layout():
    x = np.arange(16, dtype=np.float32).reshape(1, 16) / 5  # 2-bit codes 0..3 spread
    q = lmcache.quantize(x, bits=2, group_size=16, axis=-1)
    codes, *_ = slow_quantize(x, 2, 16, -1)
    c = codes[0]
    assert q.codes[0, 0] == c[0] | c[1] << 2 | c[2] << 4 | c[3] << 6


def test_positive_axis_and_rotation(rng):
    x = rng.standard_normal((2, 3, 16, 8)).astype(np.float32)
    a = lmcache.quantize(x, 4, 8, axis=2)
    b = lmcache.quantize(x, 4, 8, axis=-2)
    np.testing.assert_array_equal(a.codes, b.codes)
    x[..., 3] *= 50  # an outlier channel: rotation spreads it
    plain = lmcache.dequantize(lmcache.quantize(x, 2, 8, axis=-1))
    rot = lmcache.quantize(x, 2, 8, axis=-1, rotate=True)
    back = lmcache.dequantize(rot)
    assert back.shape == x.shape
    assert np.abs(back - x).mean() < np.abs(plain - x).mean()
    h = hadamard(8)
    np.testing.assert_allclose(h @ h, np.eye(8), atol=1e-6)


@pytest.mark.parametrize("kwargs,exc,words", [
    (dict(bits=3), ValueError, "bits must be one of 2, 4 or 8"),
    (dict(bits=True), ValueError, "bits"),
    (dict(group_size=5), ValueError, "does not divide"),
    (dict(group_size=0), ValueError, "group_size must be a positive integer"),
    (dict(axis=0), ValueError, "axis must be -1 or -2"),
])
def test_bad_arguments(kwargs, exc, words, rng):
    x = rng.standard_normal((2, 4, 8, 16)).astype(np.float32)
    args = dict(bits=4, group_size=8, axis=-1) | kwargs
    with pytest.raises(exc, match=words):
        lmcache.quantize(x, **args)


def test_bad_inputs():
    with pytest.raises(TypeError, match="real floating-point"):
        lmcache.quantize(np.ones((4, 8), np.int32), 4, 8)
    with pytest.raises(TypeError, match="real floating-point"):
        lmcache.quantize(np.ones((4, 8), np.complex64), 4, 8)
    with pytest.raises(ValueError, match="multiple of 4"):
        lmcache.quantize(np.ones((4, 6), np.float32), 2, 2, axis=-1)
    with pytest.raises(ValueError, match="at least 2 dimensions"):
        lmcache.quantize(np.ones(8, np.float32), 4, 8)
    with pytest.raises(ValueError, match="power of two"):
        lmcache.quantize(np.ones((4, 12), np.float32), 4, 4, rotate=True)
    with pytest.raises(TypeError, match="QuantizedTensor"):
        lmcache.dequantize(np.ones(3))
    with pytest.raises(ValueError):
        QuantSpec(4, 8, axis=-3)
