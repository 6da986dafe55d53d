"""TorchBackend against the numpy reference: identical codes, dequantized values and attention.

Runs on ``LMCACHE_TEST_DEVICE`` (``cpu`` by default: the torch-only path; ``cuda``: the
Triton kernels, compiled).
"""

from __future__ import annotations

import numpy as np
import pytest
from conftest import TEST_DEVICE, require

torch = require("torch")

import lmcache  # noqa: E402
from lmcache.backends import get_backend  # noqa: E402
from lmcache.quant import QuantSpec  # noqa: E402

DEVICE = "cuda" if TEST_DEVICE == "cuda" else "cpu"
if DEVICE == "cuda" and not torch.cuda.is_available():
    pytest.skip("LMCACHE_TEST_DEVICE=cuda but torch sees no GPU", allow_module_level=True)


@pytest.fixture
def tb():
    return get_backend("torch")


@pytest.fixture
def nb():
    return get_backend("numpy")


def _pair(tb, nb, x: np.ndarray, dtype: str):
    """The same values as a torch tensor on DEVICE and as a numpy array (bfloat16 via ml_dtypes)."""
    xt = tb.from_numpy(x, dtype, DEVICE)
    xf = tb.to_numpy(xt).astype(np.float32)
    if dtype == "bfloat16":
        ml = require("ml_dtypes")
        return xt, xf.astype(ml.bfloat16)
    return xt, xf.astype(dtype)


SPECS = [QuantSpec(4, 64, -2), QuantSpec(2, 16, -2), QuantSpec(8, 32, -2), QuantSpec(4, 3, -2),
         QuantSpec(4, 64, -1), QuantSpec(2, 32, -1), QuantSpec(8, 16, -1), QuantSpec(4, 6, -1)]


@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "float32"])
@pytest.mark.parametrize("spec", SPECS, ids=str)
def test_quantize_codes_match_numpy(tb, nb, rng, dtype, spec):
    d = 96 if spec.group_size == 6 else 64
    t = 48 if spec.axis == -1 else spec.group_size * 3
    x = (rng.standard_normal((2, 3, t, d)) * 3).astype(np.float32)
    x[0, 0, :, 5] = 1.5  # a constant channel: scale 0 becomes 1
    xt, xn = _pair(tb, nb, x, dtype)
    a, b = tb.quantize(xt, spec), nb.quantize(xn, spec)
    np.testing.assert_array_equal(a.codes.cpu().numpy(), b.codes)
    np.testing.assert_array_equal(tb.to_numpy(a.scale), b.scale)
    np.testing.assert_array_equal(tb.to_numpy(a.lo), b.lo)
    np.testing.assert_array_equal(tb.to_numpy(tb.dequantize(a, dtype)),
                                  nb.to_numpy(nb.dequantize(b, dtype)).astype(np.float32 if dtype == "bfloat16"
                                                                               else dtype))


@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "float32"])
def test_cache_matches_numpy(tb, rng, bits, dtype):
    if dtype == "bfloat16":
        require("ml_dtypes")
    k = (rng.standard_normal((2, 3, 150, 64))).astype(np.float32)
    v = (rng.standard_normal((2, 3, 150, 64))).astype(np.float32)
    q = (rng.standard_normal((2, 9, 7, 64))).astype(np.float32)
    ct = lmcache.Cache(backend="torch", bits=bits, group_size=32, residual=16)
    cn = lmcache.Cache(backend="numpy", bits=bits, group_size=32, residual=16)
    kt, vt = tb.from_numpy(k, dtype, DEVICE), tb.from_numpy(v, dtype, DEVICE)
    kn, vn = tb.to_numpy(kt), tb.to_numpy(vt)
    if dtype != "bfloat16":
        kn, vn = kn.astype(dtype), vn.astype(dtype)
    else:
        import ml_dtypes
        kn, vn = kn.astype(ml_dtypes.bfloat16), vn.astype(ml_dtypes.bfloat16)
    for lo, hi in ((0, 120), (120, 143), (143, 150)):  # a prefill, then two decode steps
        K1, V1 = ct.update(0, kt[:, :, lo:hi], vt[:, :, lo:hi])
        K2, V2 = cn.update(0, kn[:, :, lo:hi], vn[:, :, lo:hi])
    np.testing.assert_array_equal(tb.to_numpy(K1), np.asarray(K2, dtype=np.float32))
    np.testing.assert_array_equal(tb.to_numpy(V1), np.asarray(V2, dtype=np.float32))
    assert ct.nbytes == cn.nbytes
    qt = tb.from_numpy(q, dtype, DEVICE)
    ot = tb.to_numpy(ct.attend(0, qt))
    on = np.asarray(cn.attend(0, np.asarray(tb.to_numpy(qt)).astype(kn.dtype)), dtype=np.float32)
    tol = {"float32": 1e-4, "float16": 2e-3, "bfloat16": 2e-2}[dtype]
    np.testing.assert_allclose(ot, on, atol=tol, rtol=tol)


@pytest.mark.parametrize("rotate", ["k", "v", True])
def test_rotation_matches_numpy(tb, rng, rotate):
    k = rng.standard_normal((1, 2, 90, 64)).astype(np.float32)
    v = rng.standard_normal((1, 2, 90, 64)).astype(np.float32)
    q = rng.standard_normal((1, 4, 1, 64)).astype(np.float32)
    ct = lmcache.Cache(backend="torch", bits=4, group_size=16, residual=8, rotate=rotate)
    cn = lmcache.Cache(backend="numpy", bits=4, group_size=16, residual=8, rotate=rotate)
    ct.update(0, tb.from_numpy(k, device=DEVICE), tb.from_numpy(v, device=DEVICE))
    cn.update(0, k, v)
    ot = tb.to_numpy(ct.attend(0, tb.from_numpy(q, device=DEVICE)))
    np.testing.assert_allclose(ot, cn.attend(0, q), atol=1e-4, rtol=1e-4)


def test_attention_matches_numpy(tb, nb, rng):
    q = rng.standard_normal((2, 6, 3, 16)).astype(np.float32)
    k = rng.standard_normal((2, 2, 11, 16)).astype(np.float32)
    v = rng.standard_normal((2, 2, 11, 16)).astype(np.float32)
    out = tb.attention(*(tb.from_numpy(a, device=DEVICE) for a in (q, k, v)), 0.3)
    np.testing.assert_allclose(tb.to_numpy(out), nb.attention(q, k, v, 0.3), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("last", [None, 2])
def test_attention_scores_match_numpy(tb, rng, last):
    from lmcache.backends.base import attention_scores_numpy

    q = rng.standard_normal((2, 6, 3, 16)).astype(np.float32)
    k = rng.standard_normal((2, 2, 11, 16)).astype(np.float32)
    v = rng.standard_normal((2, 2, 11, 16)).astype(np.float32)
    out, scores = tb.attention_scores(*(tb.from_numpy(a, device=DEVICE) for a in (q, k, v)), 0.3, last)
    ref_out, ref_scores = attention_scores_numpy(q, k, v, 0.3, last)
    np.testing.assert_allclose(tb.to_numpy(out), ref_out, atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(tb.to_numpy(scores), ref_scores, atol=1e-5, rtol=1e-5)


def test_array_helpers(tb, nb):
    x = tb.from_numpy(np.array([[3.0, 1.0, 3.0, 2.0, 3.0]], np.float32), device=DEVICE)
    np.testing.assert_array_equal(tb.topk(x, 2).cpu().numpy(), nb.topk(tb.to_numpy(x), 2))
    idx = tb.from_numpy(np.array([[4, 0]]), device=DEVICE)
    assert tb.to_numpy(tb.gather(x, idx, 1)).tolist() == [[3.0, 3.0]]
    assert tb.to_numpy(tb.take(x, [3, 1], 1)).tolist() == [[2.0, 1.0]]
    buf = tb.empty((1, 1, 4, 2), "float16", DEVICE)
    buf = tb.write(buf, 1, tb.from_numpy(np.ones((1, 1, 2, 2)), "float16", DEVICE))
    assert tb.to_numpy(buf)[0, 0, 1:3].tolist() == [[1, 1], [1, 1]]
    assert tb.dtype_name(buf) == "float16" and tb.nbytes(buf) == 16
    assert tb.device_of(buf).startswith(DEVICE)


def test_bfloat16_roundtrip(tb):
    ml = require("ml_dtypes")
    a = np.array([1.5, -2.25, 3.0], dtype=ml.bfloat16)
    t = tb.from_numpy(a)
    assert t.dtype == torch.bfloat16 and tb.dtype_name(t) == "bfloat16"
    np.testing.assert_array_equal(tb.to_numpy(t), a.astype(np.float32))
    assert tb.supports_dtype("bfloat16")


def test_description(tb):
    assert tb.has_accelerator() == torch.cuda.is_available()
    assert tb.devices()[0] == "cpu"
    path = tb.kernel_path()
    if torch.cuda.is_available() and tb.uses_triton(torch.zeros(1, device="cuda")):
        assert path.startswith("triton (rocm)" if torch.version.hip else "triton (cuda)")
    else:
        assert path.startswith("torch ops")


def test_bad_device_is_rejected():
    from lmcache.backends.torch import TorchBackend

    with pytest.raises(ValueError, match="device"):
        TorchBackend("not-a-device")
