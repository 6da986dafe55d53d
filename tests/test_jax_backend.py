"""JaxBackend against the numpy reference: the contract, identical codes, lmcache.Cache on jax arrays.

Runs on ``LMCACHE_TEST_DEVICE`` (``cpu`` by default: the jnp path; ``cuda``: the compiled
Pallas kernels).
"""

from __future__ import annotations

import numpy as np
import pytest
from conftest import TEST_DEVICE, require

jax = require("jax")
jnp = jax.numpy
require("ml_dtypes")  # bfloat16 on the host (host_dtype)

import lmcache  # noqa: E402
from lmcache.backends import get_backend  # noqa: E402
from lmcache.backends.base import host_dtype  # noqa: E402
from lmcache.quant import QuantSpec  # noqa: E402

DEVICE = "cuda" if TEST_DEVICE == "cuda" else "cpu"
if DEVICE == "cuda" and not any(d.platform == "gpu" for d in jax.devices()):
    pytest.skip("LMCACHE_TEST_DEVICE=cuda but jax sees no GPU", allow_module_level=True)


@pytest.fixture
def jb():
    return get_backend("jax", DEVICE)


@pytest.fixture
def nb():
    return get_backend("numpy")


def _pair(jb, x: np.ndarray, dtype: str):
    """The same values as a jax array on DEVICE and as a numpy array of ``dtype``."""
    xn = x.astype(host_dtype(dtype))
    return jb.from_numpy(xn, dtype, DEVICE), xn


# ---------------------------------------------------------------------------- the contract
def test_description(jb):
    assert jb.name == "jax" and DEVICE.split(":")[0] in " ".join(jb.devices())
    if DEVICE == "cpu":
        assert jb.kernel_path() == "jnp ops" and not jb.has_accelerator()
    else:
        assert jb.kernel_path() == "pallas (gpu)" and jb.has_accelerator()
    assert jb.supports_dtype("bfloat16") and not jb.supports_dtype("int8")


def test_arrays_round_trip(jb, rng):
    x = rng.standard_normal((2, 3, 5, 8)).astype(np.float32)
    for dtype in ("float16", "bfloat16", "float32"):
        a = jb.from_numpy(x, dtype, DEVICE)
        assert jb.is_array(a) and not jb.is_array(x)
        assert jb.dtype_name(a) == dtype and jb.device_of(a).startswith(DEVICE)
        back = jb.to_numpy(a)
        assert back.dtype == (np.float32 if dtype != "float16" else np.float16)
        np.testing.assert_allclose(back.astype(np.float32), x, rtol=1e-2 if dtype != "float32" else 0)
    assert jb.nbytes(jb.empty((2, 4), "bfloat16")) == 16
    assert jb.dtype_name(jb.cast(jb.from_numpy(x), "float16")) == "float16"
    assert jb.concat([jb.from_numpy(x), jb.from_numpy(x)], 2).shape == (2, 3, 10, 8)


def test_write_is_functional_and_checks_bounds(jb):
    buf = jb.from_numpy(np.zeros((1, 1, 6, 2), np.float32))
    out = jb.write(buf, 2, jb.from_numpy(np.ones((1, 1, 3, 2), np.float32)))
    assert jb.to_numpy(out)[0, 0, :, 0].tolist() == [0, 0, 1, 1, 1, 0]
    assert not jb.to_numpy(buf).any()  # the input is unchanged: jax arrays are immutable
    with pytest.raises(ValueError, match="does not fit axis 2 of length 6"):
        jb.write(buf, 4, jb.from_numpy(np.ones((1, 1, 3, 2), np.float32)))


def test_topk_and_gather_match_numpy(jb, nb, rng):
    x = rng.integers(0, 4, size=(2, 3, 17)).astype(np.float32)  # many ties: lower index first
    np.testing.assert_array_equal(jb.to_numpy(jb.topk(jb.from_numpy(x), 5)), nb.topk(x, 5))
    idx = nb.topk(x, 5)
    np.testing.assert_array_equal(jb.to_numpy(jb.gather(jb.from_numpy(x), jb.from_numpy(idx), -1)),
                                  nb.gather(x, idx, -1))


def test_attention_and_scores_match_numpy(jb, nb, rng):
    q = rng.standard_normal((2, 4, 3, 16)).astype(np.float32)
    k = rng.standard_normal((2, 2, 11, 16)).astype(np.float32)
    v = rng.standard_normal((2, 2, 11, 16)).astype(np.float32)
    out = jb.attention(jb.from_numpy(q), jb.from_numpy(k), jb.from_numpy(v), 0.3)
    np.testing.assert_allclose(jb.to_numpy(out), nb.attention(q, k, v, 0.3), rtol=1e-5, atol=1e-6)
    out, scores = jb.attention_scores(jb.from_numpy(q), jb.from_numpy(k), jb.from_numpy(v), 0.3, 2)
    ref_out, ref_scores = nb.attention_scores(q, k, v, 0.3, 2)
    np.testing.assert_allclose(jb.to_numpy(scores), ref_scores, rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------------- quantization
SPECS = [QuantSpec(4, 64, -2), QuantSpec(2, 16, -2), QuantSpec(8, 32, -2), QuantSpec(4, 3, -2),
         QuantSpec(4, 64, -1), QuantSpec(2, 32, -1), QuantSpec(8, 16, -1), QuantSpec(4, 6, -1)]


@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "float32"])
@pytest.mark.parametrize("spec", SPECS, ids=str)
def test_quantize_codes_match_numpy(jb, nb, rng, dtype, spec):
    d = 96 if spec.group_size == 6 else 64
    t = 48 if spec.axis == -1 else spec.group_size * 3
    x = (rng.standard_normal((3, 5, t, d)) * 3).astype(np.float32)
    x[0, 0, :, 5] = 1.5  # a constant channel: scale 0 becomes 1
    xj, xn = _pair(jb, x, dtype)
    a, b = jb.quantize(xj, spec), nb.quantize(xn, spec)
    np.testing.assert_array_equal(np.asarray(a.codes), b.codes)
    np.testing.assert_array_equal(jb.to_numpy(a.scale), b.scale)
    np.testing.assert_array_equal(jb.to_numpy(a.lo), b.lo)
    back = jb.dequantize(a, dtype)
    assert jb.dtype_name(back) == dtype
    np.testing.assert_allclose(jb.to_numpy(back).astype(np.float32), nb.dequantize(b, dtype).astype(np.float32),
                               rtol=1e-2 if dtype != "float32" else 1e-6, atol=1e-6)


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_host_quantization_gives_the_reference_codes(jb, nb, rng, dtype):
    """The path a GPU takes for shapes its kernel does not tile: exact, on the array's device."""
    spec = QuantSpec(4, 6, -1)
    xj, xn = _pair(jb, (rng.standard_normal((2, 3, 5, 96)) * 3).astype(np.float32), dtype)
    a, b = jb._quantize_host(xj, spec), nb.quantize(xn, spec)
    assert isinstance(a.codes, jax.Array) and jb.device_of(a.codes) == jb.device_of(xj)
    np.testing.assert_array_equal(np.asarray(a.codes), b.codes)
    np.testing.assert_array_equal(np.asarray(a.scale), b.scale)
    np.testing.assert_array_equal(np.asarray(a.lo), b.lo)


def test_public_quantize_on_jax_arrays(rng):
    x = rng.standard_normal((2, 4, 128)).astype(np.float32)
    q = lmcache.quantize(jnp.asarray(x), bits=4, group_size=32, rotate=True)
    ref = lmcache.quantize(x, bits=4, group_size=32, rotate=True)
    np.testing.assert_array_equal(np.asarray(q.codes), ref.codes)
    back = lmcache.dequantize(q)
    assert isinstance(back, jax.Array) and back.shape == x.shape
    np.testing.assert_allclose(np.asarray(back), lmcache.dequantize(ref), rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------- Cache on jax arrays
@pytest.mark.parametrize("dtype,rotate,q_heads", [("bfloat16", False, 6), ("float32", "k", 3),
                                                  ("float16", True, 3)])
def test_cache_matches_the_numpy_cache(jb, rng, dtype, rotate, q_heads):
    b, h, d = 2, 3, 64
    cj = lmcache.Cache(backend=jb, bits=4, group_size=32, residual=32, rotate=rotate)
    cn = lmcache.Cache(backend="numpy", bits=4, group_size=32, residual=32, rotate=rotate)
    tol = dict(rtol=2e-2, atol=2e-2) if dtype != "float32" else dict(rtol=1e-4, atol=1e-5)
    for n in (90, 1, 1, 40, 1):
        k = rng.standard_normal((b, h, n, d)).astype(np.float32)
        v = rng.standard_normal((b, h, n, d)).astype(np.float32)
        (kj, kn), (vj, vn) = _pair(jb, k, dtype), _pair(jb, v, dtype)
        ko, vo = cj.update(0, kj, vj)
        kr, vr = cn.update(0, kn, vn)
        assert isinstance(ko, jax.Array) and jb.dtype_name(ko) == dtype and ko.shape == kr.shape
        np.testing.assert_allclose(jb.to_numpy(ko).astype(np.float32), kr.astype(np.float32), **tol)
        np.testing.assert_allclose(jb.to_numpy(vo).astype(np.float32), vr.astype(np.float32), **tol)
        qlen = min(n, 4)
        qj, qn = _pair(jb, rng.standard_normal((b, q_heads, qlen, d)).astype(np.float32), dtype)
        oj, on = cj.attend(0, qj), cn.attend(0, qn)
        assert jb.dtype_name(oj) == dtype and oj.shape == on.shape
        np.testing.assert_allclose(jb.to_numpy(oj).astype(np.float32), on.astype(np.float32), **tol)
    assert cj.seq_len(0) == cn.seq_len(0) == 133 and cj.nbytes == cn.nbytes
    assert cj.stats()["kernel_path"] == jb.kernel_path()


@pytest.mark.parametrize("dtype,rotate", [("float16", False), ("bfloat16", True), ("float32", False)])
def test_cache_decode_at_head_dim_128_matches_the_numpy_cache(jb, rng, dtype, rotate):
    """Single-token decode at head_dim 128, 4 bits, groups of 64: on a GPU the lanes kernel
    (16-bit scales) or the int8 kernel (float32 scales), here the jnp path; against numpy."""
    b, h, d, q_heads = 1, 2, 128, 4
    opts = dict(bits=4, group_size=64, residual=64, rotate=rotate)
    cj, cn = lmcache.Cache(backend=jb, **opts), lmcache.Cache(backend="numpy", **opts)
    tol = dict(rtol=2e-2, atol=2e-2) if dtype != "float32" else dict(rtol=1e-4, atol=1e-5)
    for n in (300, 1, 1):
        k = rng.standard_normal((b, h, n, d)).astype(np.float32)
        v = rng.standard_normal((b, h, n, d)).astype(np.float32)
        (kj, kn), (vj, vn) = _pair(jb, k, dtype), _pair(jb, v, dtype)
        cj.update(0, kj, vj)
        cn.update(0, kn, vn)
        qj, qn = _pair(jb, rng.standard_normal((b, q_heads, 1, d)).astype(np.float32), dtype)
        oj, on = cj.attend(0, qj), cn.attend(0, qn)
        assert jb.dtype_name(oj) == dtype and oj.shape == on.shape
        np.testing.assert_allclose(jb.to_numpy(oj).astype(np.float32), on.astype(np.float32), **tol)


def test_cache_picks_jax_for_jax_arrays(rng):
    c = lmcache.Cache(bits=4, group_size=32, residual=32)
    k = jnp.asarray(rng.standard_normal((1, 2, 40, 32)), jnp.float16)
    c.update(0, k, k)
    assert c.backend.name == "jax"
    with pytest.raises(TypeError, match="must be a jax array"):
        c.update(0, np.zeros((1, 2, 1, 32), np.float16), k[:, :, :1])
    assert c.seq_len(0) == 40  # the failed update left the cache as it was


def test_unknown_device_is_refused():
    from lmcache.backends.jax import JaxBackend

    with pytest.raises(ValueError, match="device='npu:3' is not available"):
        JaxBackend("npu:3")
