"""The lane-explicit Pallas decode kernel (``pallas/decode_lanes.py``, work in progress) against the
jnp reference: interpreted on the CPU (inline PTX through its numpy emulations), and lowered to
Triton IR for CUDA at the benchmark's shape."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import need_jax_gpu, pallas_interpret_device, require

jax = require("jax")
jnp = jax.numpy
pl_da = require("lmcache.backends.jax.pallas.decode_attention")
pl_lanes = require("lmcache.backends.jax.pallas.decode_lanes")
from test_pallas_int8 import _quantized  # noqa: E402

_ON_DEFAULT_DEVICE = {"test_lanes_kernel_lowers_to_triton_for_cuda"}


@pytest.fixture(autouse=True)
def _interpret_on_cpu(request):
    with pallas_interpret_device(request, _ON_DEFAULT_DEVICE):
        yield


# 4-bit K/V, head_dim 128; lengths that end inside a tile and inside a split; 2 query heads per
# KV head; key groups of 32, 64 and 128; float16 and bfloat16 scales; the default slices.
@pytest.mark.parametrize("hkv,gk,length,splits,dtype", [(1, 64, 256, 1, "float16"), (2, 64, 200, 2, "float16"),
                                                        (1, 32, 37, 1, "float16"), (1, 64, 0, 2, "float16"),
                                                        (2, 128, 130, 2, "bfloat16"), (1, 64, 100, None, "float16")])
def test_lanes_kernel_matches_the_reference(rng, hkv, gk, length, splits, dtype):
    b, rep, t, d = 1, 2, 256, 128
    args = _quantized(rng, b, hkv, t, d, 4, 4, gk, 64, dtype=dtype)
    q = jnp.asarray(rng.standard_normal((b, hkv * rep, d)), jnp.float16)
    ref_out, ref_lse = pl_da.decode_attention_reference(q, *args, k_bits=4, v_bits=4, scale=0.3, length=length)
    out, lse = pl_lanes.decode_attention(q, *args, k_bits=4, v_bits=4, scale=0.3, length=length, splits=splits,
                                         interpret=True)
    np.testing.assert_allclose(np.asarray(out), np.asarray(ref_out), rtol=2e-4, atol=5e-5)
    np.testing.assert_allclose(np.asarray(lse), np.asarray(ref_lse), rtol=1e-5, atol=1e-5)


def test_lanes_kernel_rejects_what_it_does_not_take(rng):
    q = jnp.zeros((1, 1, 128), jnp.float16)
    with pytest.raises(ValueError, match="4-bit K and V"):
        pl_lanes.decode_attention(q, *_quantized(rng, 1, 1, 64, 128, 8, 8, 64, 64), k_bits=8, v_bits=8,
                                  interpret=True)
    with pytest.raises(ValueError, match="splits"):
        pl_lanes.decode_attention(q, *_quantized(rng, 1, 1, 128, 128, 4, 4, 64, 64), k_bits=4, v_bits=4, splits=3,
                                  interpret=True)


def test_lanes_kernel_lowers_to_triton_for_cuda():
    """Pallas lowers the kernel (with its multi-output inline PTX) to Triton IR for CUDA at batch 16,
    40 heads, 32K tokens."""
    chk = [jax.export.DisabledSafetyCheck.custom_call("__gpu$xla.gpu.triton")]
    s = jax.ShapeDtypeStruct
    b, h, t, d = 16, 40, 32640, 128
    avals = [s((b, h, d), jnp.float16), s((b, h, t, 64), jnp.uint8), s((b, h, t // 64, d), jnp.float16),
             s((b, h, t // 64, d), jnp.float16), s((b, h, t, 64), jnp.uint8), s((b, h, t, 2), jnp.float16),
             s((b, h, t, 2), jnp.float16)]
    fn = lambda q, *a: pl_lanes.decode_attention(q, *a, k_bits=4, v_bits=4, splits=17)
    text = jax.export.export(jax.jit(fn), platforms=["cuda"], disabled_checks=chk)(*avals).mlir_module()
    assert "__gpu$xla.gpu.triton" in text


# ---------------------------------------------------------------------------- compiled, on a GPU
@pytest.mark.cuda
def test_compiled_lanes_kernel_on_gpu_matches_the_reference(rng):
    need_jax_gpu()
    b, h, t, d = 2, 4, 1024, 128
    args = _quantized(rng, b, h, t, d, 4, 4, 64, 64)
    q = jnp.asarray(rng.standard_normal((b, 2 * h, d)), jnp.float16)
    for length, splits in ((t, None), (700, 2), (33, 1), (0, 4)):
        out, lse = pl_lanes.decode_attention(q, *args, k_bits=4, v_bits=4, length=length, splits=splits)
        ref_out, ref_lse = pl_da.decode_attention_reference(q, *args, k_bits=4, v_bits=4, length=length)
        np.testing.assert_allclose(np.asarray(out), np.asarray(ref_out), rtol=1e-4, atol=1e-4)
        np.testing.assert_allclose(np.asarray(lse), np.asarray(ref_lse), rtol=1e-5, atol=1e-5)
