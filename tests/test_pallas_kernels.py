"""The Pallas kernels (quantize, dequantize, decode attention) against the numpy reference.

On the CPU the kernels run in interpret mode (their logic, through XLA) at tiny, odd sizes,
and are lowered to Triton IR for CUDA to prove they compile for the GPU path. Tests marked
``cuda`` run the compiled kernels on a GPU (``nox -s tests-cuda``).
"""

from __future__ import annotations

import numpy as np
import pytest
from conftest import need_jax_gpu, pallas_interpret_device, require

from lmcache.backends.base import host_dtype
from lmcache.backends.numpy import NumpyBackend
from lmcache.quant import QuantSpec

jax = require("jax")
jnp = jax.numpy
pl_q = require("lmcache.backends.jax.pallas.quantize")
pl_dq = require("lmcache.backends.jax.pallas.dequantize")
pl_da = require("lmcache.backends.jax.pallas.decode_attention")
require("ml_dtypes")  # bfloat16 on the host (host_dtype)

NP = NumpyBackend()


# Lowering for CUDA asks for a GPU where there is one: these run on the default device.
_ON_DEFAULT_DEVICE = {"test_kernels_lower_to_triton_for_cuda"}


@pytest.fixture(autouse=True)
def _interpret_on_cpu(request):
    with pallas_interpret_device(request, _ON_DEFAULT_DEVICE):
        yield


def _data(rng, shape, dtype, spread=3.0):
    x = (rng.standard_normal(shape) * spread + rng.standard_normal(shape[:-2] + (1, shape[-1]))).astype(np.float32)
    x[..., :2, :] = 0.5  # a constant patch: scale 0 becomes 1
    return x.astype(host_dtype(dtype))


def _to_f32(a):
    return np.asarray(a).astype(np.float32)


# ---------------------------------------------------------------------------- quantize / dequantize
@pytest.mark.parametrize("bits,axis,group,dtype", [
    (4, -2, 16, "float16"), (4, -1, 8, "bfloat16"), (2, -2, 16, "float32"), (2, -1, 12, "float16"),
    (8, -2, 16, "bfloat16"), (8, -1, 24, "float32")])
def test_quantize_kernel_gives_the_reference_codes(rng, bits, axis, group, dtype):
    x = _data(rng, (3, 5, 48, 24), dtype)  # odd batch and heads, three key groups, head_dim 24
    ref = NP.quantize(x, QuantSpec(bits, group, axis))
    codes, scale, lo = pl_q.quantize(jnp.asarray(x), bits, group, axis, interpret=True)
    assert codes.dtype == jnp.uint8 and codes.shape == ref.codes.shape
    np.testing.assert_array_equal(np.asarray(codes), ref.codes)
    np.testing.assert_array_equal(np.asarray(scale), ref.scale)
    np.testing.assert_array_equal(np.asarray(lo), ref.lo)
    jc, js, jl = pl_q.quantize_reference(jnp.asarray(x), bits, group, axis)
    np.testing.assert_array_equal(np.asarray(jc), ref.codes)

    back = pl_dq.dequantize(codes, scale, lo, bits, axis, dtype, interpret=True)
    expect = NP.dequantize(ref, dtype)
    assert back.dtype == jnp.dtype(dtype) and back.shape == x.shape
    # code * scale + lo may be one fused multiply-add: at most one rounding step apart.
    np.testing.assert_allclose(_to_f32(back), expect.astype(np.float32), rtol=1e-2 if dtype != "float32" else 1e-6,
                               atol=1e-6)
    np.testing.assert_allclose(_to_f32(pl_dq.dequantize_reference(codes, scale, lo, bits, axis, dtype)),
                               expect.astype(np.float32), rtol=1e-2 if dtype != "float32" else 1e-6, atol=1e-6)


def test_quantize_rounds_half_to_even_like_numpy():
    # Values that land exactly on .5 steps: (x - lo) / scale = k + 0.5 for a scale of 1.
    x = np.zeros((1, 1, 16, 8), np.float32)
    x[0, 0, :, 0] = [0, 15] + [0.5, 1.5, 2.5, 3.5, 4.5, 5.5, 6.5, 7.5, 8.5, 9.5, 10.5, 11.5, 12.5, 13.5]
    ref = NP.quantize(x, QuantSpec(4, 16, -2))
    codes, _, _ = pl_q.quantize(jnp.asarray(x), 4, 16, -2, interpret=True)
    np.testing.assert_array_equal(np.asarray(codes), ref.codes)
    assert list(ref.codes[0, 0, 2:6, 0] & 15) == [0, 2, 2, 4]


def test_kernel_wrappers_reject_bad_input():
    x = jnp.zeros((2, 16, 8), jnp.float16)
    with pytest.raises(TypeError, match="float16, bfloat16 or float32"):
        pl_q.quantize(x.astype(jnp.int32), 4, 16, -2, interpret=True)
    with pytest.raises(ValueError, match="group=5"):
        pl_q.quantize(x, 4, 5, -2, interpret=True)
    with pytest.raises(ValueError, match="bits must be 2, 4 or 8"):
        pl_q.quantize(x, 3, 16, -2, interpret=True)
    with pytest.raises(TypeError, match="uint8"):
        pl_dq.dequantize(x, x, x, 4, -2, "float16", interpret=True)
    codes = jnp.zeros((1, 1, 32, 8), jnp.uint8)
    scale = jnp.ones((1, 1, 2, 16), jnp.float16)
    with pytest.raises(ValueError, match="q must be"):
        pl_da.decode_attention(jnp.zeros((1, 1, 1, 16)), codes, scale, scale, codes, scale, scale, k_bits=4,
                               v_bits=4, interpret=True)
    with pytest.raises(ValueError, match="splits"):
        pl_da.decode_attention(jnp.zeros((1, 1, 16)), codes, scale, scale, codes, jnp.ones((1, 1, 32, 1)),
                               jnp.ones((1, 1, 32, 1)), k_bits=4, v_bits=4, splits=3, interpret=True)


# ---------------------------------------------------------------------------- decode attention
def _quantized_kv(rng, b, hkv, t, d, k_bits, v_bits, gk, gv, dtype="float16"):
    k = _data(rng, (b, hkv, t, d), dtype, 1.0)
    v = _data(rng, (b, hkv, t, d), dtype, 1.0)
    kq = NP.quantize(k, QuantSpec(k_bits, gk, -2))
    vq = NP.quantize(v, QuantSpec(v_bits, gv, -1))
    args = [jnp.asarray(a) for a in (kq.codes, kq.scale, kq.lo, vq.codes, vq.scale, vq.lo)]
    return kq, vq, args


def _numpy_decode(q, kq, vq, length, scale, dtype="float32"):
    k = NP.dequantize(kq, dtype)[:, :, :length]
    v = NP.dequantize(vq, dtype)[:, :, :length]
    return NP.attention(q[:, :, None].astype(np.float32), k.astype(np.float32), v.astype(np.float32), scale)[:, :, 0]


@pytest.mark.parametrize("k_bits,v_bits,length,splits,gps,prefetch,prescale,words", [
    (4, 4, 96, 1, 3, True, True, False), (4, 4, 70, 3, 1, False, False, True),
    (2, 8, 96, 1, 1, True, True, True), (8, 2, 33, 1, 1, True, False, False)])
def test_decode_kernel_matches_attention_over_the_reference_dequantization(rng, k_bits, v_bits, length, splits,
                                                                           gps, prefetch, prescale, words):
    # GQA (6 query heads on 2 KV heads), head_dim 48, three key groups of 32 tokens, three
    # value groups of 16 channels (whole 32-bit words at any width, for words=True).
    b, hkv, rep, t, d = 3, 2, 3, 96, 48
    kq, vq, args = _quantized_kv(rng, b, hkv, t, d, k_bits, v_bits, 32, 16)
    q = rng.standard_normal((b, hkv * rep, d)).astype(np.float32)
    scale = 0.3
    out, lse = pl_da.decode_attention(jnp.asarray(q), *args, k_bits=k_bits, v_bits=v_bits, scale=scale,
                                      length=length, splits=splits, groups_per_step=gps, prefetch=prefetch,
                                      prescale=prescale, words=words, interpret=True)
    expect = _numpy_decode(q, kq, vq, length, scale)
    np.testing.assert_allclose(np.asarray(out), expect, rtol=2e-5, atol=2e-5)
    ref_out, ref_lse = pl_da.decode_attention_reference(jnp.asarray(q), *args, k_bits=k_bits, v_bits=v_bits,
                                                        scale=scale, length=length)
    np.testing.assert_allclose(np.asarray(ref_out), expect, rtol=2e-5, atol=2e-5)
    np.testing.assert_allclose(np.asarray(lse), np.asarray(ref_lse), rtol=1e-5, atol=1e-5)


def test_decode_kernel_with_nothing_to_attend_gives_zero_and_minus_inf(rng):
    _, _, args = _quantized_kv(rng, 1, 1, 32, 16, 4, 4, 16, 16)
    out, lse = pl_da.decode_attention(jnp.ones((1, 2, 16)), *args, k_bits=4, v_bits=4, length=0, interpret=True)
    assert np.all(np.asarray(out) == 0) and np.all(np.isneginf(np.asarray(lse)))


def test_kernels_lower_to_triton_for_cuda():
    """Pallas lowers each kernel to Triton IR for a CUDA target: no unsupported op, on any machine."""
    chk = [jax.export.DisabledSafetyCheck.custom_call("__gpu$xla.gpu.triton")]
    s = jax.ShapeDtypeStruct

    def lower(fn, *avals):
        text = jax.export.export(jax.jit(fn), platforms=["cuda"], disabled_checks=chk)(*avals).mlir_module()
        assert "__gpu$xla.gpu.triton" in text

    b, h, t, d = 1, 2, 128, 128
    lower(lambda x: pl_q.quantize(x, 4, 64, -2), s((b, h, t, d), jnp.bfloat16))
    lower(lambda x: pl_q.quantize(x, 2, 64, -1), s((b, h, t, d), jnp.float16))
    lower(lambda c, sc, lo: pl_dq.dequantize(c, sc, lo, 4, -2, jnp.float16), s((b, h, t, d // 2), jnp.uint8),
          s((b, h, t // 64, d), jnp.float16), s((b, h, t // 64, d), jnp.float16))
    kv = [s((b, h, t, d // 2), jnp.uint8), s((b, h, t // 64, d), jnp.float16), s((b, h, t // 64, d), jnp.float16),
          s((b, h, t, d // 2), jnp.uint8), s((b, h, t, d // 64), jnp.float16), s((b, h, t, d // 64), jnp.float16)]
    for launch in (dict(splits=2), dict(prescale=False, words=True, groups_per_step=2)):
        lower(lambda q, *a, launch=launch: pl_da.decode_attention(q, *a, k_bits=4, v_bits=4, **launch),
              s((b, 2 * h, d), jnp.float16), *kv)


# ---------------------------------------------------------------------------- compiled, on a GPU
@pytest.mark.cuda
@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_compiled_kernels_on_gpu_match_the_reference(rng, dtype):
    need_jax_gpu()
    b, h, t, d = 2, 4, 1024, 128
    for bits in (2, 4, 8):
        for axis, group in ((-2, 64), (-1, 64)):
            x = _data(rng, (b, h, t, d), dtype)
            ref = NP.quantize(x, QuantSpec(bits, group, axis))
            codes, scale, lo = pl_q.quantize(jnp.asarray(x), bits, group, axis)
            np.testing.assert_array_equal(np.asarray(codes), ref.codes)
            np.testing.assert_array_equal(np.asarray(scale), ref.scale)
            np.testing.assert_array_equal(np.asarray(lo), ref.lo)
            back = pl_dq.dequantize(codes, scale, lo, bits, axis, dtype)
            np.testing.assert_allclose(_to_f32(back), NP.dequantize(ref, dtype).astype(np.float32), rtol=1e-2,
                                       atol=1e-6)
    every_launch = ((t, {}), (700, dict(prescale=False, num_warps=4, groups_per_step=2)),
                    (t, dict(prefetch=False, splits=4, words=True)), (900, dict(num_warps=16)))
    for k_bits, v_bits in ((4, 4), (2, 8)):
        kq, vq, args = _quantized_kv(rng, b, h, t, d, k_bits, v_bits, 64, 64, dtype)
        q = rng.standard_normal((b, 2 * h, d)).astype(np.float32)
        # Every launch setting once (4-bit float16), the defaults elsewhere: each is a compilation.
        for length, launch in every_launch if (k_bits, dtype) == (4, "float16") else every_launch[:1]:
            out, _ = pl_da.decode_attention(jnp.asarray(q, dtype), *args, k_bits=k_bits, v_bits=v_bits,
                                            length=length, **launch)
            expect = _numpy_decode(q.astype(host_dtype(dtype)).astype(np.float32), kq, vq, length, d ** -0.5)
            np.testing.assert_allclose(np.asarray(out), expect, rtol=1e-4, atol=1e-4)
