"""The MLX backend against the numpy reference: identical codes, attention within tolerance.

On Linux this exercises the pure-MLX path (``ops.py``); on Apple silicon the same tests run
the Metal kernels, because the backend picks them whenever MLX sees a Metal GPU.
"""

from __future__ import annotations

import numpy as np
import pytest
from conftest import require

mx = require("mlx.core")

import lmcache  # noqa: E402
from lmcache.backends import get_backend  # noqa: E402
from lmcache.backends.base import QuantBlock  # noqa: E402
from lmcache.backends.mlx import MlxBackend, metal, ops  # noqa: E402
from lmcache.backends.numpy import pack as np_pack  # noqa: E402
from lmcache.plan import QuantPlan  # noqa: E402
from lmcache.quant import QuantSpec  # noqa: E402

# float32 accumulation on both sides; the remaining difference is summation order.
ATOL = {"float32": 2e-5, "float16": 2e-3, "bfloat16": 2e-2}


@pytest.fixture(scope="module")
def mb():
    return get_backend("mlx")


@pytest.fixture(scope="module")
def nb():
    return get_backend("numpy")


def _np_input(rng, shape, dtype):
    x = (rng.standard_normal(shape) * 2 + rng.standard_normal(shape[-1:])).astype(np.float32)
    if dtype == "bfloat16":
        ml = require("ml_dtypes")
        return x.astype(ml.bfloat16)
    return x.astype(dtype)


# Odd sizes: 15 tokens, head_dim 12, groups of 3 and 5 that do not line up with the bytes.
SPECS = [QuantSpec(b, g, a) for b in (2, 4, 8) for g, a in ((5, -2), (3, -1), (4, -1), (12, -1), (15, -2))]


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
@pytest.mark.parametrize("spec", SPECS, ids=lambda s: f"b{s.bits}g{s.group_size}ax{s.axis}")
def test_quantize_codes_match_numpy(mb, nb, rng, dtype, spec):
    x = _np_input(rng, (2, 3, 15, 12), dtype)
    ref = nb.quantize(x, spec)
    got = mb.quantize(mb.from_numpy(x), spec)
    assert got.codes.dtype == mx.uint8 and tuple(got.codes.shape) == ref.codes.shape
    np.testing.assert_array_equal(mb.to_numpy(got.codes), ref.codes)
    np.testing.assert_array_equal(mb.to_numpy(got.scale), ref.scale)
    np.testing.assert_array_equal(mb.to_numpy(got.lo), ref.lo)
    assert mb.dtype_name(got.scale) == ("float32" if dtype == "float32" else "float16")
    back = mb.dequantize(got, dtype)
    assert mb.dtype_name(back) == dtype
    np.testing.assert_array_equal(mb.to_numpy(back), nb.to_numpy(nb.dequantize(ref, dtype)))


def test_rounding_is_half_to_even_and_flat_groups_get_scale_one(mb, nb):
    # lo = 0, hi = 3 at 2 bits: scale 1, so 0.5 -> 0, 1.5 -> 2, 2.5 -> 2 (half to even).
    x = np.array([[0.0, 0.5, 1.5, 2.5, 3.0, 1.0, 2.0, 0.0], [7.0] * 8], np.float32)
    spec = QuantSpec(2, 8, -1)
    got = mb.quantize(mb.from_numpy(x), spec)
    codes = ops.unpack(got.codes, 2)
    assert mb.to_numpy(codes)[0].tolist() == [0, 0, 2, 2, 3, 1, 2, 0]
    assert mb.to_numpy(got.scale)[:, 0].tolist() == [1.0, 1.0]  # the flat row: 0 -> 1
    assert mb.to_numpy(codes)[1].tolist() == [0] * 8
    np.testing.assert_array_equal(mb.to_numpy(got.codes), nb.quantize(x, spec).codes)


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_pack_layout_matches_numpy(mb, rng, bits):
    codes = rng.integers(0, 1 << bits, size=(3, 5, 16), dtype=np.uint8)
    packed = ops.pack(mx.array(codes), bits)
    np.testing.assert_array_equal(np.array(packed), np_pack(codes, bits))
    np.testing.assert_array_equal(np.array(ops.unpack(packed, bits)), codes)
    if bits == 4:  # element 2i is the low nibble
        assert int(np.array(packed)[0, 0, 0]) == int(codes[0, 0, 0]) | int(codes[0, 0, 1]) << 4


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
@pytest.mark.parametrize("L", [1, 5])
def test_attention_matches_numpy(mb, nb, rng, dtype, L):
    q = _np_input(rng, (2, 6, L, 12), dtype)
    k = _np_input(rng, (2, 2, 13, 12), dtype)
    v = _np_input(rng, (2, 2, 13, 12), dtype)
    ref = nb.attention(q, k, v, 0.3)
    got = mb.attention(mb.from_numpy(q), mb.from_numpy(k), mb.from_numpy(v), 0.3)
    assert mb.dtype_name(got) == dtype and tuple(got.shape) == (2, 6, L, 12)
    np.testing.assert_allclose(mb.to_numpy(got), nb.to_numpy(ref), atol=ATOL[dtype], rtol=ATOL[dtype])


def _run_cache(backend, xs, **kw):
    """Prefill then decode one layer; returns every update's K/V and every attend's output."""
    c = lmcache.Cache(backend=backend, **kw)
    be = c.backend if c.backend is not None else get_backend(backend)
    outs = []
    for q, k, v in xs:
        if backend == "mlx":
            q, k, v = (get_backend("mlx").from_numpy(a) for a in (q, k, v))
        kk, vv = c.update(0, k, v)
        att = c.attend(0, q)
        outs.append(tuple(be.to_numpy(a) for a in (kk, vv, att)))
    return outs, c


def _steps(rng, dtype, d=16, hq=4, hkv=2, prefill=11, decode=9):
    xs = [tuple(_np_input(rng, (1, h, prefill, d), dtype) for h in (hq, hkv, hkv))]
    xs += [tuple(_np_input(rng, (1, h, 1, d), dtype) for h in (hq, hkv, hkv)) for _ in range(decode)]
    return xs


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
@pytest.mark.parametrize("bits", [2, 4, 8, None])
def test_cache_matches_numpy(rng, dtype, bits):
    """Quantized blocks, merges, the residual and the decode path, against the reference."""
    xs = _steps(rng, dtype)
    kw = dict(bits=bits, group_size=4, residual=3)
    ref, _ = _run_cache("numpy", xs, **kw)
    got, cache = _run_cache("mlx", xs, **kw)
    assert cache.stats()["backend"] == "mlx"
    for (rk, rv, ra), (gk, gv, ga) in zip(ref, got):
        np.testing.assert_array_equal(gk, rk)  # the dequantized K/V are bit-identical
        np.testing.assert_array_equal(gv, rv)
        np.testing.assert_allclose(ga, ra, atol=ATOL[dtype], rtol=ATOL[dtype])


@pytest.mark.parametrize("rotate", [True, "k", "v"])
def test_rotation_and_decode_match_numpy(rng, rotate):
    xs = _steps(rng, "float32", d=16)
    kw = dict(bits=4, group_size=4, residual=2, rotate=rotate)
    ref, _ = _run_cache("numpy", xs, **kw)
    got, _ = _run_cache("mlx", xs, **kw)
    for (rk, rv, ra), (gk, gv, ga) in zip(ref, got):
        np.testing.assert_allclose(gk, rk, atol=1e-5)
        np.testing.assert_allclose(gv, rv, atol=1e-5)
        np.testing.assert_allclose(ga, ra, atol=1e-4)


def test_mixed_plan_with_full_precision_heads(rng):
    """Head groups of different bits (and a full-precision K side) through take/concat."""
    plan = QuantPlan([[2, None, 8]], [[4, 4, None]])
    xs = _steps(rng, "float16", hq=6, hkv=3, d=8)
    kw = dict(group_size=4, residual=2, plan=plan)
    ref, _ = _run_cache("numpy", xs, **kw)
    got, _ = _run_cache("mlx", xs, **kw)
    for (rk, rv, ra), (gk, gv, ga) in zip(ref, got):
        np.testing.assert_array_equal(gk, rk)
        np.testing.assert_array_equal(gv, rv)
        np.testing.assert_allclose(ga, ra, atol=2e-3)


def test_decode_partials_combine_to_attention(mb, rng):
    """The flash-decoding merge of spans equals attention over their concatenation."""
    q = mx.array(rng.standard_normal((2, 4, 8)).astype(np.float32))
    k = mx.array(rng.standard_normal((2, 2, 10, 8)).astype(np.float32))
    v = mx.array(rng.standard_normal((2, 2, 10, 8)).astype(np.float32))
    parts = [ops.decode_partial(q, k[:, :, a:b], v[:, :, a:b], 0.5) for a, b in ((0, 3), (3, 4), (4, 10))]
    whole = ops.attention(q[:, :, None], k, v, 0.5)[:, :, 0]
    np.testing.assert_allclose(np.array(ops.combine(parts)), np.array(whole), atol=1e-5)


def test_array_helpers(mb, nb):
    buf = mb.empty((1, 2, 5, 3), "float16")
    val = mb.from_numpy(np.ones((1, 2, 2, 3), np.float32), "float16")
    out = mb.write(buf, 1, val, axis=2)
    got = mb.to_numpy(out)
    assert got[:, :, 1:3].tolist() == np.ones((1, 2, 2, 3)).tolist() and got[:, :, [0, 3, 4]].sum() == 0
    assert mb.dtype_name(out) == "float16" and mb.nbytes(out) == 1 * 2 * 5 * 3 * 2
    x = mb.from_numpy(np.array([[0.1, 0.9, 0.5, 0.9, 0.2]], np.float32))
    idx = mb.topk(x, 2)
    assert np.array(idx).tolist() == [[1, 3]] and idx.dtype == mx.int64  # ties to the lower index
    np.testing.assert_array_equal(mb.to_numpy(mb.gather(x, idx, -1)), np.float32([[0.9, 0.9]]))
    y = mb.from_numpy(np.arange(12, dtype=np.float32).reshape(1, 4, 3))
    assert mb.to_numpy(mb.take(y, [2, 0], 1)).tolist() == [[[6, 7, 8], [0, 1, 2]]]
    assert mb.to_numpy(mb.concat([y, y], 2)).shape == (1, 4, 6)
    assert mb.cast(y, "float32") is y
    a = np.arange(6, dtype=np.float32).reshape(2, 3)
    np.testing.assert_array_equal(mb.to_numpy(mb.matmul(mb.from_numpy(a), mb.from_numpy(a.T))), a @ a.T)
    assert mb.is_array(y) and not mb.is_array(a)


def test_bfloat16_roundtrip(mb):
    ml = require("ml_dtypes")
    a = np.array([1.5, -2.25, 3.0], dtype=ml.bfloat16)
    x = mb.from_numpy(a)
    assert mb.dtype_name(x) == "bfloat16" and mb.supports_dtype("bfloat16")
    back = mb.to_numpy(x)
    assert back.dtype == np.float32 and back.tolist() == [1.5, -2.25, 3.0]


def test_description(mb):
    assert isinstance(mb, MlxBackend) and mb.name == "mlx"
    if metal.available():
        assert mb.kernel_path() == "metal" and mb.has_accelerator() and mb.devices() == ["cpu", "gpu"]
    else:
        assert mb.kernel_path() == "mlx ops (no Metal on this machine)"
        assert not mb.has_accelerator() and mb.devices() == ["cpu"]


def test_bad_device_is_rejected():
    with pytest.raises(ValueError, match="device='tpu' is not an mlx device"):
        MlxBackend("tpu")
    if not metal.available():
        with pytest.raises(ValueError, match="needs a Metal GPU"):
            MlxBackend("gpu")
    cpu = MlxBackend("cpu")
    assert cpu.device == "cpu" and cpu.device_of(mx.zeros(1)) == "cpu" and not cpu.use_metal


def test_quantblock_round_trip_through_the_public_api(mb):
    x = mx.array(np.linspace(-1, 1, 2 * 16, dtype=np.float32).reshape(2, 16))
    q = lmcache.quantize(x, bits=4, group_size=8)
    assert q.backend is mb and isinstance(q.codes, mx.array)
    back = lmcache.dequantize(q)
    assert isinstance(back, mx.array) and float(mx.abs(back - x).max()) <= 2 / 15 / 2 + 1e-6
    assert isinstance(mb.quantize(x, QuantSpec(4, 8, -1)), QuantBlock)


def test_attend_with_scores_matches_numpy(mb, nb, rng):
    """``attend(..., want_scores=...)``: the output of the fused path and the base composite's scores."""
    k = rng.standard_normal((1, 2, 40, 16)).astype(np.float32)
    v = rng.standard_normal((1, 2, 40, 16)).astype(np.float32)
    q = rng.standard_normal((1, 4, 1, 16)).astype(np.float32)
    caches = {}
    for name, be in (("mlx", mb), ("numpy", nb)):
        c = lmcache.Cache(backend=be, bits=4, group_size=8, residual=4)
        c.update(0, be.from_numpy(k), be.from_numpy(v))
        caches[name] = (c, be)
    (cm, _), (cn, _) = caches["mlx"], caches["numpy"]
    gm, gn = cm._layers[0].groups[0].view(), cn._layers[0].groups[0].view()
    plain = mb.attend(mb.from_numpy(q), gm, 0.25)
    out, scores = mb.attend(mb.from_numpy(q), gm, 0.25, want_scores=True)
    ref_out, ref_scores = nb.attend(q, gn, 0.25, want_scores=True)
    np.testing.assert_allclose(np.array(out), ref_out, atol=2e-5)
    np.testing.assert_allclose(np.array(plain), ref_out, atol=2e-5)
    assert tuple(scores.shape) == (1, 2, 40)
    np.testing.assert_allclose(np.array(scores), ref_scores, atol=2e-5)
