"""lmcache.Cache on the numpy reference backend: semantics, attention, bytes and errors."""

from __future__ import annotations

import copy

import numpy as np
import pytest
from conftest import require

import lmcache
from lmcache.quant import hadamard


def attention64(q, k, v, scale=None):
    """Causal attention in float64 over the newest q_len tokens; GQA by head // rep."""
    q, k, v = (np.asarray(a, np.float64) for a in (q, k, v))
    b, hq, L, d = q.shape
    hkv, t = k.shape[1], k.shape[2]
    scale = 1 / np.sqrt(d) if scale is None else scale
    out = np.zeros((b, hq, L, d))
    for h in range(hq):
        kh, vh = k[:, h // (hq // hkv)], v[:, h // (hq // hkv)]
        for i in range(L):
            pos = t - L + i
            s = np.einsum("bd,btd->bt", q[:, h, i], kh[:, :pos + 1]) * scale
            p = np.exp(s - s.max(-1, keepdims=True))
            p /= p.sum(-1, keepdims=True)
            out[:, h, i] = np.einsum("bt,btd->bd", p, vh[:, :pos + 1])
    return out


def kv(rng, b, h, t, d, dtype=np.float32):
    k = rng.standard_normal((b, h, t, d)) + rng.standard_normal((1, h, 1, d)) * 2
    v = rng.standard_normal((b, h, t, d))
    return k.astype(dtype), v.astype(dtype)


@pytest.mark.parametrize("bits", [None, 8, 4, 2])
@pytest.mark.parametrize("kv_heads,rep,head_dim", [(1, 3, 16), (3, 3, 32), (2, 1, 8)])
def test_attend_matches_float64_attention_over_returned_kv(bits, kv_heads, rep, head_dim, rng):
    cache = lmcache.Cache(backend="numpy", bits=bits, group_size=8, residual=5)
    b = 2
    steps = [(37, 7), (1, 1), (1, 1), (9, 3), (16, 16)]  # (tokens added, q_len)
    seen_k = []
    for t, L in steps:
        k, v = kv(rng, b, kv_heads, t, head_dim)
        seen_k.append(k)
        K, V = cache.update(0, k, v)
        n = sum(x.shape[2] for x in seen_k)
        assert K.shape == V.shape == (b, kv_heads, n, head_dim) and K.dtype == np.float32
        q = rng.standard_normal((b, kv_heads * rep, L, head_dim)).astype(np.float32)
        out = cache.attend(0, q)
        assert out.shape == q.shape and out.dtype == q.dtype
        np.testing.assert_allclose(out, attention64(q, K, V), rtol=2e-4, atol=2e-5)
    assert cache.seq_len(0) == sum(t for t, _ in steps)


def test_full_precision_equals_plain_attention(rng):
    cache = lmcache.Cache(backend="numpy", bits=None)
    k, v = kv(rng, 1, 2, 50, 16)
    K, V = cache.update(0, k, v)
    np.testing.assert_array_equal(K, k)
    np.testing.assert_array_equal(V, v)
    q = rng.standard_normal((1, 4, 3, 16)).astype(np.float32)
    np.testing.assert_allclose(cache.attend(0, q), attention64(q, k, v), rtol=1e-5, atol=1e-6)


def test_residual_and_groups(rng):
    cache = lmcache.Cache(backend="numpy", bits=4, group_size=8, residual=5)
    k, v = kv(rng, 1, 1, 12, 8)
    cache.update(0, k, v)
    s = cache.stats()
    assert (s["tokens_quantized"], s["tokens_residual"]) == (0, 12)  # 12 < residual + group
    cache.update(0, *kv(rng, 1, 1, 1, 8))
    s = cache.stats()
    assert (s["tokens_quantized"], s["tokens_residual"]) == (8, 5)
    K, _ = cache.update(0, *kv(rng, 1, 1, 30, 8))
    s = cache.stats()
    assert s["tokens_quantized"] % 8 == 0 and 5 <= s["tokens_residual"] < 13
    assert s["tokens_quantized"] + s["tokens_residual"] == 43 == K.shape[2]
    # the residual is exact
    np.testing.assert_array_equal(K[:, :, -5:], cache.update(0, *kv(rng, 1, 1, 1, 8))[0][:, :, -6:-1])


def test_nbytes_counts_codes_scales_and_residual(rng):
    b, h, d, g = 2, 3, 16, 8
    cache = lmcache.Cache(backend="numpy", bits=4, group_size=g, residual=4)
    cache.update(0, *kv(rng, b, h, 36, d, np.float16))  # 32 quantized + 4 residual
    cache.update(1, *kv(rng, b, h, 36, d, np.float16))
    per_layer_k = b * h * 32 * d // 2 + 2 * (b * h * (32 // g) * d * 2)  # codes + scale + lo (fp16)
    per_layer_v = b * h * 32 * d // 2 + 2 * (b * h * 32 * (d // g) * 2)
    residual = 2 * b * h * 4 * d * 2
    assert cache.nbytes == 2 * (per_layer_k + per_layer_v + residual)
    assert cache.stats()["dense_nbytes"] == 2 * 2 * b * h * 36 * d * 2
    cache.reset()
    assert cache.nbytes == 0 and cache.num_layers == 0 and cache.seq_len(0) == 0


@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "float32"])
def test_dtypes(dtype, rng):
    if dtype == "bfloat16":
        ml_dtypes = require("ml_dtypes")
        npdt = ml_dtypes.bfloat16
    else:
        npdt = np.dtype(dtype)
    cache = lmcache.Cache(backend="numpy", bits=4, group_size=8, residual=4)
    k, v = kv(rng, 1, 2, 40, 16)
    K, V = cache.update(0, k.astype(npdt), v.astype(npdt))
    assert K.dtype == npdt
    q = rng.standard_normal((1, 2, 2, 16)).astype(npdt)
    out = cache.attend(0, q)
    assert out.dtype == npdt
    tol = 2e-2 if dtype != "float32" else 1e-4
    np.testing.assert_allclose(out.astype(np.float32), attention64(q.astype(np.float32), K.astype(np.float32),
                                                                   V.astype(np.float32)), rtol=tol, atol=tol)


def test_quantized_error_shrinks_with_bits(rng):
    k, v = kv(rng, 1, 2, 300, 32)
    q = rng.standard_normal((1, 4, 4, 32)).astype(np.float32)
    ref = attention64(q, k, v)
    errs = []
    for bits in (2, 4, 8):
        cache = lmcache.Cache(backend="numpy", bits=bits, group_size=16, residual=16)
        cache.update(0, k, v)
        errs.append(np.abs(cache.attend(0, q) - ref).mean())
    assert errs[0] > errs[1] > errs[2]
    assert errs[2] < 0.01


def test_plan_mixes_bits_per_head(rng):
    plan = lmcache.QuantPlan([[2, 8, None]], [[4, None, 8]])
    cache = lmcache.Cache(backend="numpy", plan=plan, group_size=8, residual=4)
    k, v = kv(rng, 2, 3, 30, 16)
    K, V = cache.update(0, k, v)
    np.testing.assert_array_equal(K[:, 2], k[:, 2])  # head 2 keys in full precision
    np.testing.assert_array_equal(V[:, 1], v[:, 1])
    err = np.abs(K - k).reshape(2, 3, -1).mean(-1).mean(0)
    assert err[0] > err[1] > 0  # 2-bit head worse than the 8-bit one
    q = rng.standard_normal((2, 6, 3, 16)).astype(np.float32)
    np.testing.assert_allclose(cache.attend(0, q), attention64(q, K, V), rtol=2e-4, atol=2e-5)
    with pytest.raises(ValueError, match="layers 0..0"):
        cache.update(1, k, v)
    with pytest.raises(ValueError, match="3 KV heads"):
        lmcache.Cache(backend="numpy", plan=plan).update(0, *kv(rng, 1, 2, 4, 16))


@pytest.mark.parametrize("rotate", [True, "k", "v"])
def test_rotation_keeps_attention_exact_over_returned_kv(rotate, rng):
    cache = lmcache.Cache(backend="numpy", bits=2, group_size=8, residual=4, rotate=rotate)
    k, v = kv(rng, 1, 2, 40, 16)
    v[..., 5] *= 30  # an outlier channel widens every per-token value group; rotation spreads it
    K, V = cache.update(0, k, v)
    q = rng.standard_normal((1, 2, 3, 16)).astype(np.float32)
    np.testing.assert_allclose(cache.attend(0, q), attention64(q, K, V), rtol=2e-4, atol=2e-4)
    # the stored format is exactly quantize(rotate=True) of the rotated side
    nq = cache.stats()["tokens_quantized"]
    for side, x, X, axis in (("k", k, K, -2), ("v", v, V, -1)):
        rotated = rotate is True or rotate == side
        expect = lmcache.dequantize(lmcache.quantize(x[:, :, :nq], 2, 8, axis, rotate=rotated))
        np.testing.assert_allclose(X[:, :, :nq], expect, rtol=1e-5, atol=1e-5)
    assert np.abs(hadamard(16) @ hadamard(16) - np.eye(16)).max() < 1e-6


def _state(cache):
    return copy.deepcopy([(ly.seq_len, [(g.n_quant, g.n_res, len(g.k_blocks)) for g in ly.groups])
                          for ly in cache._layers]), cache.nbytes


def test_errors_leave_cache_unchanged(rng):
    cache = lmcache.Cache(backend="numpy", bits=4, group_size=8, residual=4)
    k, v = kv(rng, 2, 3, 20, 16)
    cache.update(0, k, v)
    before = _state(cache)
    bad_updates = [
        ((0, k[0], v[0]), ValueError, "shape \\[batch, kv_heads"),
        ((0, k, v[:, :, :3]), ValueError, "same shape"),
        ((0, k[:1], v[:1]), ValueError, "batch size 1"),
        ((0, k[:, :2], v[:, :2]), ValueError, "3 KV heads"),
        ((0, k[..., :8], v[..., :8]), ValueError, "head_dim 16"),
        ((0, k.astype(np.float16), v.astype(np.float16)), TypeError, "float32"),
        ((0, k, v.astype(np.float16)), TypeError, "same dtype"),
        ((0, k.astype(np.int32), v.astype(np.int32)), TypeError, "float16, bfloat16 or float32"),
        ((2, k, v), ValueError, "out of range"),
        ((-1, k, v), ValueError, "out of range"),
        (("0", k, v), TypeError, "layer must be an int"),
        ((0, k, [1, 2]), TypeError, "values must be a numpy array"),
    ]
    for args, exc, words in bad_updates:
        with pytest.raises(exc, match=words):
            cache.update(*args)
        assert _state(cache) == before
    q = rng.standard_normal((2, 6, 1, 16)).astype(np.float32)
    bad_attends = [
        ((1, q), ValueError, "out of range"),
        ((0, q[:, :4]), ValueError, "multiple of the layer's 3 KV heads"),
        ((0, q[:1]), ValueError, "batch 1"),
        ((0, q[..., :8]), ValueError, "head_dim 8"),
        ((0, np.zeros((2, 6, 21, 16), np.float32)), ValueError, "q_len must be between 1 and the 20"),
        ((0, q[0]), ValueError, "shape \\[batch, q_heads"),
        ((0, q, -1.0), ValueError, "scale must be a positive number"),
    ]
    for args, exc, words in bad_attends:
        with pytest.raises(exc, match=words):
            cache.attend(*args)
        assert _state(cache) == before


@pytest.mark.parametrize("kwargs,exc,words", [
    (dict(bits=3), ValueError, "bits must be one of 2, 4 or 8"),
    (dict(group_size=0), ValueError, "group_size must be an integer >= 1"),
    (dict(residual=-1), ValueError, "residual must be an integer >= 0"),
    (dict(rotate="q"), ValueError, "rotate must be"),
    (dict(plan={"k": 1}), TypeError, "plan must be a lmcache.QuantPlan"),
    (dict(backend="tensorflow"), ValueError, "backend must be one of"),
])
def test_bad_constructor_arguments(kwargs, exc, words):
    with pytest.raises(exc, match=words):
        lmcache.Cache(**kwargs)


def test_head_dim_constraints(rng):
    cache = lmcache.Cache(backend="numpy", bits=4, group_size=16, residual=4)
    with pytest.raises(ValueError, match="must divide head_dim 24"):
        cache.update(0, *kv(rng, 1, 1, 4, 24))
    assert cache.num_layers == 0
    with pytest.raises(ValueError, match="power of two"):
        lmcache.Cache(backend="numpy", bits=4, group_size=4, rotate=True).update(0, *kv(rng, 1, 1, 4, 12))


def test_auto_backend_follows_the_array(rng):
    cache = lmcache.Cache()
    assert cache.backend is None
    cache.update(0, *kv(rng, 1, 1, 4, 8))
    assert cache.backend.name == "numpy"


@pytest.mark.parametrize("rotate", [False, True])
def test_fp_sinks_keep_the_first_tokens_apart(rotate):
    rng = np.random.default_rng(0)
    kv = rng.standard_normal((1, 2, 300, 64)).astype(np.float32)
    kv[:, :, 0] *= 50.0  # an attention-sink-like first token far off the others' range
    out = {}
    for fs in (0, 1):
        c = lmcache.Cache(backend="numpy", bits=2, residual=64, rotate=rotate, fp_sinks=fs)
        for s in (0, 1, 7, 100, 200):
            e = {0: 1, 1: 7, 7: 100, 100: 200, 200: 300}[s]
            k, v = c.update(0, kv[:, :, s:e], kv[:, :, s:e])
        assert c.seq_len(0) == 300 and k.shape == kv.shape
        q = rng.standard_normal((1, 4, 100, 64)).astype(np.float32)
        assert c.attend(0, q).shape == (1, 4, 100, 64)
        out[fs] = (k, c)
    k1, c1 = out[1]
    np.testing.assert_allclose(k1[:, :, 0], kv[:, :, 0], rtol=1e-6, atol=1e-5)
    err = {fs: np.abs(out[fs][0] - kv)[:, :, 1:65].mean() for fs in (0, 1)}
    assert err[1] < err[0] / 4
    with pytest.raises(ValueError, match="fp_sinks=1 cannot be combined"):
        lmcache.Cache(fp_sinks=1, policy="window", budget=64)
    with pytest.raises(ValueError, match="fp_sinks must be an integer >= 0"):
        lmcache.Cache(fp_sinks=-1)
