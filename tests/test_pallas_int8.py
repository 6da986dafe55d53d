"""The int8 matrix-unit Pallas decode kernel (``pallas/decode_int8.py``) against the jnp reference.

On the CPU the kernel runs in interpret mode (its logic, through XLA) at small, odd sizes, and
is lowered to Triton IR for CUDA to prove it compiles for the GPU path (the benchmark's shape,
every exposed launch setting). Tests marked ``cuda`` run the compiled kernel on a GPU.
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
pl_da = require("lmcache.backends.jax.pallas.decode_attention")
pl_i8 = require("lmcache.backends.jax.pallas.decode_int8")
require("ml_dtypes")  # bfloat16 on the host (host_dtype)

NP = NumpyBackend()


# Lowering for CUDA asks for a GPU where there is one: these run on the default device.
_ON_DEFAULT_DEVICE = {"test_kernel_lowers_to_triton_for_cuda"}


@pytest.fixture(autouse=True)
def _interpret_on_cpu(request):
    with pallas_interpret_device(request, _ON_DEFAULT_DEVICE):
        yield


def _quantized(rng, b, hkv, t, d, k_bits, v_bits, gk, gv, dtype="float16", k=None, v=None):
    """(k_codes, k_scale, k_lo, v_codes, v_scale, v_lo) as jnp arrays, quantized by the numpy reference."""
    k = rng.standard_normal((b, hkv, t, d)).astype(np.float32) if k is None else k
    v = rng.standard_normal((b, hkv, t, d)).astype(np.float32) if v is None else v
    kq = NP.quantize(k.astype(host_dtype(dtype)), QuantSpec(k_bits, gk, -2))
    vq = NP.quantize(v.astype(host_dtype(dtype)), QuantSpec(v_bits, gv, -1))
    return [jnp.asarray(a) for a in (kq.codes, kq.scale, kq.lo, vq.codes, vq.scale, vq.lo)]


def _check(q, args, k_bits, v_bits, length=None, scale=None, rtol=2e-5, atol=2e-5, **launch):
    out, lse = pl_i8.decode_attention(q, *args, k_bits=k_bits, v_bits=v_bits, length=length, scale=scale,
                                      interpret=True, **launch)
    ref_out, ref_lse = pl_da.decode_attention_reference(q, *args, k_bits=k_bits, v_bits=v_bits, length=length,
                                                        scale=scale)
    assert out.dtype == jnp.float32 and out.shape == q.shape and lse.shape == q.shape[:2]
    if atol is None:  # relative to the output scale: at outputs ~550 the float32 reference is 2.5e-3 from
        # float64, this kernel 1.6e-3 (measured on the climbing-scores case)
        atol = rtol * float(jnp.abs(ref_out).max())
    np.testing.assert_allclose(np.asarray(out), np.asarray(ref_out), rtol=rtol, atol=atol)
    np.testing.assert_allclose(np.asarray(lse), np.asarray(ref_lse), rtol=1e-5, atol=1e-5)
    return out, lse


# 3 query heads per KV head; head_dim 48 (odd for a matrix unit) in three value groups of 16;
# 96 tokens in three key groups of 32; lengths that end inside a tile, a group and a split.
@pytest.mark.parametrize("k_bits,v_bits,hkv,dtype,length,launch", [
    (4, 4, 1, "float16", 70, dict(tile=32, splits=1)),
    (8, 8, 3, "bfloat16", 96, dict(tile=32, splits=3)),
    (4, 8, 8, "float16", 33, dict(tile=96, key_operands="prepass")),
    (8, 4, 3, "float16", 95, dict(tile=16)),
    (4, 4, 3, "bfloat16", 1, dict(key_operands="prepass", splits=3)),
    (8, 8, 1, "float16", 61, dict(tile=96, key_operands="prepass")),
    (4, 4, 3, "float16", 77, dict(tile=32, dot_tokens=16, splits=3)),
    (8, 4, 1, "bfloat16", 90, dict(tile=96, dot_tokens=8)),
])
def test_int8_kernel_matches_the_reference(rng, k_bits, v_bits, hkv, dtype, length, launch):
    b, rep, t, d = 2, 3, 96, 48
    args = _quantized(rng, b, hkv, t, d, k_bits, v_bits, 32, 16)
    q = jnp.asarray(rng.standard_normal((b, hkv * rep, d)), dtype)
    _check(q, args, k_bits, v_bits, length=length, scale=0.3, **launch)


def test_int8_kernel_with_a_traced_length_and_the_default_launch(rng):
    # head_dim 128 in value groups of 64 and key groups of 64: the Cache's layout, default tile and splits.
    args = _quantized(rng, 1, 2, 256, 128, 4, 4, 64, 64)
    q = jnp.asarray(rng.standard_normal((1, 2, 128)), jnp.float16)
    step = jax.jit(lambda q, n, *a: pl_i8.decode_attention(q, *a, k_bits=4, v_bits=4, length=n, interpret=True))
    for n in (200, 256):
        out, lse = step(q, jnp.int32(n), *args)
        ref_out, ref_lse = pl_da.decode_attention_reference(q, *args, k_bits=4, v_bits=4, length=n)
        np.testing.assert_allclose(np.asarray(out), np.asarray(ref_out), rtol=2e-5, atol=2e-5)
        np.testing.assert_allclose(np.asarray(lse), np.asarray(ref_lse), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("k_bits,v_bits", [(4, 4), (8, 8)])
def test_int8_kernel_with_climbing_scores_and_value_scales_1000x_apart(rng, k_bits, v_bits):
    # Scores grow along the sequence (the softmax reference moves again and again: each move
    # flushes the integer sums), and value groups alternate between scales 1000x apart every 8
    # tokens (the fixed-point scale of p * scale must move both ways within a split).
    b, hkv, t, d = 1, 1, 256, 64
    direction = rng.standard_normal(d).astype(np.float32)
    direction /= np.linalg.norm(direction)
    ramp = np.linspace(0.0, 60.0, t, dtype=np.float32)[:, None]
    k = (ramp * direction + 0.3 * rng.standard_normal((t, d)).astype(np.float32))[None, None]
    v = rng.standard_normal((b, hkv, t, d)).astype(np.float32)
    big = (np.arange(t) // 8) % 2 == 1
    v[:, :, big] *= 1000.0
    args = _quantized(rng, b, hkv, t, d, k_bits, v_bits, 32, 32, "float32", k=k, v=v)
    q = jnp.asarray(direction[None, None] * np.sqrt(d))  # scale 1/sqrt(d): scores follow the ramp
    out, _ = _check(q, args, k_bits, v_bits, length=250, atol=None, tile=32, splits=2)
    assert float(jnp.abs(out).max()) > 10.0  # the large-scale tokens matter to the result
    # Falling scores over large-scale tokens, then small ones: F is set by the first tiles and
    # kept for the rest; and with rising scores the reverse, F shrinking at every tile.
    v2 = rng.standard_normal((b, hkv, t, d)).astype(np.float32)
    v2[:, :, : t // 2] *= 1000.0
    for keys in (k[:, :, ::-1].copy(), k):
        args2 = _quantized(rng, b, hkv, t, d, k_bits, v_bits, 32, 32, "float32", k=keys, v=v2)
        _check(q, args2, k_bits, v_bits, atol=None, tile=64, splits=1)


def test_int8_kernel_with_nothing_to_attend_gives_zero_and_minus_inf(rng):
    args = _quantized(rng, 1, 1, 64, 64, 8, 4, 32, 32)
    out, lse = pl_i8.decode_attention(jnp.ones((1, 2, 64)), *args, k_bits=8, v_bits=4, length=0, interpret=True)
    assert np.all(np.asarray(out) == 0) and np.all(np.isneginf(np.asarray(lse)))


def test_int8_kernel_rejects_bad_input(rng):
    q = jnp.zeros((1, 1, 64))
    args4 = _quantized(rng, 1, 1, 64, 64, 4, 4, 32, 32)
    with pytest.raises(ValueError, match="4- or 8-bit"):
        args2 = _quantized(rng, 1, 1, 64, 64, 2, 4, 32, 32)
        pl_i8.decode_attention(q, *args2, k_bits=2, v_bits=4, interpret=True)
    with pytest.raises(ValueError, match="q must be"):
        pl_i8.decode_attention(q[0], *args4, k_bits=4, v_bits=4, interpret=True)
    with pytest.raises(TypeError, match="uint8"):
        pl_i8.decode_attention(q, args4[0].astype(jnp.int32), *args4[1:], k_bits=4, v_bits=4, interpret=True)
    with pytest.raises(ValueError, match="tile"):
        pl_i8.decode_attention(q, *args4, k_bits=4, v_bits=4, tile=24, interpret=True)
    with pytest.raises(ValueError, match="splits"):
        pl_i8.decode_attention(q, *args4, k_bits=4, v_bits=4, tile=32, splits=3, interpret=True)
    with pytest.raises(ValueError, match="key_operands"):
        pl_i8.decode_attention(q, *args4, k_bits=4, v_bits=4, key_operands="both", interpret=True)
    with pytest.raises(ValueError, match="dot_tokens"):
        pl_i8.decode_attention(q, *args4, k_bits=4, v_bits=4, dot_tokens=24, interpret=True)
    with pytest.raises(ValueError, match="dot_tokens"):  # compiled: the int8 matrix step takes 32 tokens
        pl_i8.decode_attention(q, *args4, k_bits=4, v_bits=4, dot_tokens=16)
    with pytest.raises(ValueError, match="int8 decode kernel needs"):  # compiled: key groups of 16 are too small
        pl_i8.decode_attention(q, *_quantized(rng, 1, 1, 64, 64, 4, 4, 16, 32), k_bits=4, v_bits=4, tile=16)
    assert pl_i8.kernel_supported(128, 4, 8, 64, 64)
    assert not pl_i8.kernel_supported(128, 2, 4, 64, 64)
    assert not pl_i8.kernel_supported(128, 4, 4, 64, 64, tile=16)
    assert not pl_i8.kernel_supported(48, 4, 4, 32, 16)
    assert pl_i8.kernel_supported(48, 4, 4, 32, 16, compiled=False)


def test_kernel_lowers_to_triton_for_cuda():
    """Pallas lowers the kernel to Triton IR for CUDA, at the benchmark's shape (batch 16, 40
    heads, 32K tokens, head_dim 128) for 4- and 8-bit codes and every launch setting the
    benchmark sweeps, and at head_dim 64 with GQA."""
    chk = [jax.export.DisabledSafetyCheck.custom_call("__gpu$xla.gpu.triton")]
    s = jax.ShapeDtypeStruct

    def lower(b, hq, hkv, t, d, k_bits, v_bits, **launch):
        avals = [s((b, hq, d), jnp.float16),
                 s((b, hkv, t, d * k_bits // 8), jnp.uint8), s((b, hkv, t // 64, d), jnp.float16),
                 s((b, hkv, t // 64, d), jnp.float16),
                 s((b, hkv, t, d * v_bits // 8), jnp.uint8), s((b, hkv, t, d // 64), jnp.float16),
                 s((b, hkv, t, d // 64), jnp.float16)]
        fn = lambda q, *a: pl_i8.decode_attention(q, *a, k_bits=k_bits, v_bits=v_bits, **launch)
        text = jax.export.export(jax.jit(fn), platforms=["cuda"], disabled_checks=chk)(*avals).mlir_module()
        assert "__gpu$xla.gpu.triton" in text

    for bits in (4, 8):
        for launch in (dict(), dict(num_warps=2), dict(tile=128), dict(key_operands="prepass"), dict(tile=32),
                       dict(num_warps=4), dict(num_warps=2, tile=128), dict(dot_tokens=64), dict(asm_codes=False)):
            lower(16, 40, 40, 32768, 128, bits, bits, **launch)
    lower(2, 6, 2, 1024, 64, 4, 8)


# ---------------------------------------------------------------------------- compiled, on a GPU
@pytest.mark.cuda
@pytest.mark.parametrize("k_bits,v_bits", [(4, 4), (8, 8), (4, 8)])
def test_compiled_int8_kernel_on_gpu_matches_the_reference(rng, k_bits, v_bits):
    need_jax_gpu()
    b, h, t, d = 2, 4, 1024, 128
    args = _quantized(rng, b, h, t, d, k_bits, v_bits, 64, 64)
    q = jnp.asarray(rng.standard_normal((b, 2 * h, d)), jnp.float16)
    for length, launch in ((t, {}), (700, dict(tile=32, num_warps=2)), (t, dict(tile=128, splits=2)),
                           (900, dict(key_operands="prepass", num_warps=4))):
        out, lse = pl_i8.decode_attention(q, *args, k_bits=k_bits, v_bits=v_bits, length=length, **launch)
        ref_out, ref_lse = pl_da.decode_attention_reference(q, *args, k_bits=k_bits, v_bits=v_bits, length=length)
        np.testing.assert_allclose(np.asarray(out), np.asarray(ref_out), rtol=1e-4, atol=1e-4)
        np.testing.assert_allclose(np.asarray(lse), np.asarray(ref_lse), rtol=1e-5, atol=1e-5)


def test_fused_kernel_picks_the_fastest_that_applies():
    """The backend and the functional API take the lanes kernel for 4-bit K/V of head_dim 128, this
    kernel where it applies otherwise, the float kernel for 2-bit codes, and none where no kernel
    tiles the sizes."""
    pl_lanes = require("lmcache.backends.jax.pallas.decode_lanes")
    assert pl_i8.fused_kernel(128, 4, 4, 64, 64, 4096) is pl_lanes
    assert pl_i8.fused_kernel(128, 4, 4, 64, 32, 4096) is pl_i8  # value groups of 32: not the lanes kernel's
    assert pl_i8.fused_kernel(64, 4, 4, 64, 64, 4096) is pl_i8
    assert pl_i8.fused_kernel(128, 8, 4, 32, 64, 96) is pl_i8
    assert pl_i8.fused_kernel(128, 2, 4, 64, 64, 4096) is pl_da
    assert pl_i8.fused_kernel(128, 2, 2, 64, 64, 4096) is pl_da
    assert pl_i8.fused_kernel(24, 2, 2, 8, 8, 64) is None


def test_wave_splits_fill_the_last_wave():
    """Where the heads fill the GPU several times, the slices leave no nearly empty last wave (the
    fastest measured at batch 16 / 32K on an H200: 17 slices); too few heads leave it to choose_splits."""
    assert pl_i8.wave_splits(16, 40, 510, 132, 12) == 17
    assert pl_i8.wave_splits(16, 40, 62, 132, 12) == 2
    assert pl_i8.wave_splits(1, 40, 510, 132, 12) is None
    # a single step cannot be split below MIN_STEPS per slice
    assert pl_i8.wave_splits(64, 40, 1, 132, 12) == 1


def test_default_splits_keep_two_steps_per_slice():
    """The int8 kernel's default slices: about TARGET_PROGRAMS programs, but never slices of one
    loop step (batch 1 / 4K: 31 slices of two steps, not 62 of one); the float kernel's as before."""
    assert pl_da.choose_splits(1, 40, 62, 1, pl_i8.TARGET_PROGRAMS, pl_i8.MIN_STEPS) == 31
    assert pl_da.choose_splits(16, 40, 510, 1, pl_i8.TARGET_PROGRAMS, pl_i8.MIN_STEPS) == 10
    assert pl_da.choose_splits(1, 40, 62) == 62
    assert pl_da.choose_splits(1, 40, 1, 1, pl_i8.TARGET_PROGRAMS, pl_i8.MIN_STEPS) == 1
