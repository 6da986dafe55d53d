"""Token eviction in lmcache.Cache: budget, sinks, positions, attention after eviction,
quantized storage, statistics from attend, and the same choices on numpy and torch."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import require

import lmcache
from lmcache.backends import get_backend
from lmcache.eviction import Evictor, evicted
from lmcache.policies.h2o import H2O
from lmcache.policies.keydiff import KeyDiff
from lmcache.policies.knorm import KNorm
from lmcache.policies.snapkv import SnapKV
from lmcache.policies.window import Window


def attention64(q, k, v):
    """Causal attention in float64 of the newest q_len tokens; GQA by head // rep."""
    q, k, v = (np.asarray(a, np.float64) for a in (q, k, v))
    b, hq, L, d = q.shape
    rep, t = hq // k.shape[1], k.shape[2]
    kk, vv = np.repeat(k, rep, 1), np.repeat(v, rep, 1)
    s = q @ kk.swapaxes(-1, -2) / np.sqrt(d)
    s = np.where(np.arange(t)[None, :] <= np.arange(t - L, t)[:, None], s, -np.inf)
    p = np.exp(s - s.max(-1, keepdims=True))
    return (p / p.sum(-1, keepdims=True)) @ vv


def randn(rng, *shape):
    return rng.standard_normal(shape).astype(np.float32)


def kept_rows(kept, orig):
    """Indices into ``orig`` (``[B, H, n, D]``) of each row of ``kept`` (``[B, H, m, D]``), exact match."""
    b, h, m, _ = kept.shape
    out = np.empty((b, h, m), np.int64)
    for i in range(b):
        for j in range(h):
            eq = (kept[i, j][:, None, :] == orig[i, j][None]).all(-1)
            assert eq.any(-1).all(), "a kept token is not one of the original tokens"
            out[i, j] = eq.argmax(-1)
    return out


POLICIES = [Window(slack=6), H2O(window=4, slack=6), SnapKV(window=4, slack=6, observation=4, kernel=3),
            KNorm(window=4, slack=6), KeyDiff(window=4, slack=6)]


@pytest.mark.parametrize("policy", POLICIES, ids=lambda p: p.name)
def test_budget_held_sinks_kept_order_kept_and_attention_exact(policy, rng):
    """Full precision: after each step the cache holds at most budget + slack tokens, the kept
    tokens are original tokens in order, the sinks and the newest tokens are among them, and
    attend equals float64 attention over the K/V that update returned."""
    b, h, rep, d, budget, sinks = 2, 2, 2, 8, 24, 3
    cache = lmcache.Cache(backend="numpy", bits=None, policy=policy, budget=budget, sinks=sinks)
    ks, vs = [], []
    for step, (t, L) in enumerate([(40, 40), (1, 1), (5, 3)] + [(1, 1)] * 30 + [(9, 9)]):
        k, v = randn(rng, b, h, t, d), randn(rng, b, h, t, d)
        ks.append(k)
        vs.append(v)
        K, V = cache.update(0, k, v)
        allk = np.concatenate(ks, 2)
        idx = kept_rows(K, allk)
        assert (np.diff(idx, axis=-1) > 0).all()
        assert (idx[..., :sinks] == np.arange(sinks)).all()
        assert (idx[..., -t:] == np.arange(allk.shape[2] - t, allk.shape[2])).all()  # the new tokens
        np.testing.assert_array_equal(V, np.take_along_axis(np.concatenate(vs, 2), idx[..., None], 2))
        q = randn(rng, b, h * rep, L, d)
        out = cache.attend(0, q)
        np.testing.assert_allclose(out, attention64(q, K, V), rtol=1e-4, atol=1e-5)
        assert cache.seq_len(0) <= budget + policy.slack
        assert cache.seen_tokens(0) == allk.shape[2]
        if step == 0:
            assert cache.seq_len(0) == budget  # the prompt is cut to the budget right after its attention
    assert cache.stats()["tokens_evicted"] == cache.seen_tokens(0) - cache.seq_len(0) > 0


def test_attend_with_many_queries_after_eviction_is_causal_and_exact(rng):
    cache = lmcache.Cache(backend="numpy", bits=None, policy=H2O(window=8, slack=0), budget=20, sinks=2)
    k, v = randn(rng, 1, 1, 50, 16), randn(rng, 1, 1, 50, 16)
    cache.update(0, k, v)
    cache.attend(0, randn(rng, 1, 2, 50, 16))
    assert cache.seq_len(0) == 20
    k2, v2 = randn(rng, 1, 1, 6, 16), randn(rng, 1, 1, 6, 16)
    K, V = cache.update(0, k2, v2)
    np.testing.assert_array_equal(K[:, :, -6:], k2)
    q = randn(rng, 1, 2, 6, 16)
    np.testing.assert_allclose(cache.attend(0, q), attention64(q, K, V), rtol=1e-4, atol=1e-5)


def test_prompt_attention_sees_every_token_before_eviction(rng):
    """Eviction happens after the prompt's attention: its output is that of the full cache."""
    k, v, q = randn(rng, 1, 2, 64, 8), randn(rng, 1, 2, 64, 8), randn(rng, 1, 4, 64, 8)
    full = lmcache.Cache(backend="numpy", bits=None)
    full.update(0, k, v)
    lean = lmcache.Cache(backend="numpy", bits=None, policy=SnapKV(slack=0), budget=40, sinks=4)
    lean.update(0, k, v)
    np.testing.assert_array_equal(lean.attend(0, q), full.attend(0, q))
    assert lean.seq_len(0) == 40
    with pytest.raises(ValueError, match="q_len must be between 1 and the 32"):
        lean.attend(0, q)  # only the newest `window` tokens of the prompt are certain to remain


def test_h2o_accumulates_all_queries_snapkv_only_the_observation_window():
    """Early queries look at token 5, the last two at token 9: H2O keeps 5, SnapKV keeps 9."""
    d, n = 4, 40
    k = np.zeros((1, 1, n, d), np.float32)
    k[0, 0, 5, 0] = k[0, 0, 9, 1] = 10.0
    q = np.zeros((1, 1, n, d), np.float32)
    q[0, 0, :-2, 0] = 10.0
    q[0, 0, -2:, 1] = 10.0
    v = np.arange(n, dtype=np.float32)[None, None, :, None].repeat(d, -1)
    kept = {}
    for name, pol in (("h2o", H2O(window=2, slack=0, kernel=1, half_life=None)),
                      ("h2o-forgetting", H2O(window=2, slack=0, kernel=1, half_life=1)),
                      ("snapkv", SnapKV(window=2, slack=0, observation=2, kernel=1))):
        cache = lmcache.Cache(backend="numpy", bits=None, policy=pol, budget=4, sinks=1)
        cache.update(0, k, v)
        cache.attend(0, q)
        kept[name] = cache.update(0, k[:, :, :1], v[:, :, :1])[1][0, 0, :4, 0].tolist()
    assert kept["h2o"] == [0, 5, 38, 39]
    assert kept["h2o-forgetting"] == [0, 9, 38, 39]  # the last 2 queries weigh 1.5, the 36 before 0.5
    assert kept["snapkv"] == [0, 9, 38, 39]


@pytest.mark.parametrize("observe", [False, True])
def test_h2o_half_life_weighs_each_query_by_its_age(observe, rng):
    """The statistic after a prompt and decoded tokens is sum_j 2**(-age_j / half_life) p_j (float64 reference)."""
    b, h, rep, d, n = 1, 2, 2, 8, 24
    cache = lmcache.Cache(backend="numpy", bits=None, policy=H2O(window=4, slack=100, kernel=1, half_life=2),
                          budget=50, sinks=1)
    ks, qs = [], []
    for t in (n, 1, 1, 1):
        k, v, q = randn(rng, b, h, t, d), randn(rng, b, h, t, d), randn(rng, b, h * rep, t, d)
        cache.update(0, k, v)
        cache.observe(0, q) if observe else cache.attend(0, q)
        ks.append(k)
        qs.append(q)
    K, Q = np.concatenate(ks, 2).astype(np.float64), np.concatenate(qs, 2).astype(np.float64)
    T = K.shape[2]
    s = Q @ np.repeat(K, rep, 1).swapaxes(-1, -2) / np.sqrt(d)
    s = np.where(np.arange(T)[None] <= np.arange(T)[:, None], s, -np.inf)
    p = np.exp(s - s.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)  # [B, Hq, T, T]
    w = 0.5 ** ((T - 1 - np.arange(T)) / 2)  # the chunks of half_life // 2 = 1 query are exact
    want = (p * w[:, None]).sum(2).reshape(b, h, rep, T).sum(2)
    got = cache._layers[0].stats[0].stats
    np.testing.assert_allclose(got, want, rtol=1e-4)


def test_heads_keep_different_tokens():
    d, n = 4, 30
    k = np.zeros((1, 2, n, d), np.float32)
    k[0, 0, 7] = [0.01, 0, 0, 0]  # the smallest key of head 0
    k[0, 1, 12] = [0.01, 0, 0, 0]  # of head 1
    k[0, :, [i for i in range(n) if i not in (7, 12)]] += 3.0
    k[0, 0, 12] = k[0, 1, 7] = 3.0
    v = np.arange(n, dtype=np.float32)[None, None, :, None].repeat(d, -1).repeat(2, 1)
    cache = lmcache.Cache(backend="numpy", bits=None, policy=KNorm(window=1, slack=0, kernel=1), budget=3,
                          sinks=1)
    cache.update(0, k, v)
    cache.attend(0, np.ones((1, 2, 1, d), np.float32))
    _, V = cache.update(0, k[:, :, :1], v[:, :, :1])
    assert V[0, 0, :3, 0].tolist() == [0, 7, 29] and V[0, 1, :3, 0].tolist() == [0, 12, 29]


def test_update_without_attend_still_holds_the_budget(rng):
    """A caller that does its own attention (update only): eviction happens before each append."""
    cache = lmcache.Cache(backend="numpy", bits=4, group_size=8, residual=8, policy="knorm", budget=40, sinks=4)
    for _ in range(20):
        K, _ = cache.update(0, randn(rng, 1, 2, 7, 16), randn(rng, 1, 2, 7, 16))
        assert K.shape[2] <= 40 + 32 + 7
        assert cache.seq_len(0) <= 40 + 32 + 7
    assert cache.seen_tokens(0) == 140


@pytest.mark.parametrize("bits", [8, 4, 2])
def test_eviction_with_quantization_values_exact_keys_measured(bits, rng):
    """KNorm picks the same tokens whatever the bits (norms come from the incoming keys), so a
    full-precision twin names the kept tokens. Values keep their codes exactly; re-quantized
    keys stay within one quantization step of the original."""
    b, h, d, g = 1, 2, 16, 8
    k1 = randn(rng, b, h, 100, d) + randn(rng, 1, h, 1, d) * 3
    v1 = randn(rng, b, h, 100, d)
    k2, v2 = randn(rng, b, h, 4, d), randn(rng, b, h, 4, d)
    twin = lmcache.Cache(backend="numpy", bits=None, policy=KNorm(window=4, slack=0), budget=40, sinks=4)
    twin.update(0, k1, v1)
    idx = kept_rows(twin.update(0, k2, v2)[0][:, :, :40], k1)
    cache = lmcache.Cache(backend="numpy", bits=bits, group_size=g, residual=g, policy=KNorm(window=4, slack=0),
                          budget=40, sinks=4)
    K1, V1 = cache.update(0, k1, v1)
    K2, V2 = cache.update(0, k2, v2)
    assert K2.shape[2] == 44
    # values: dequantize(quantize(v)) per token, whenever it was quantized; residual tokens exact
    spec = lmcache.QuantSpec(bits, min(g, d), -1)
    be = get_backend("numpy")
    vq = be.dequantize(be.quantize(v1, spec), "float32")
    n_quant = cache.stats()["tokens_quantized"]
    want = np.take_along_axis(vq, idx[..., None], 2)
    np.testing.assert_array_equal(V2[:, :, :n_quant], want[:, :, :n_quant])
    np.testing.assert_array_equal(V2[:, :, n_quant:40], np.take_along_axis(V1, idx[..., None], 2)[:, :, n_quant:])
    # keys: the last update's keys are still held in full precision when the eviction comes, so
    # the kept ones are quantized once, in their new groups: within half a step of a grid no
    # coarser than the whole channel's
    orig = np.take_along_axis(k1, idx[..., None], 2)
    step = (k1.max(2, keepdims=True) - k1.min(2, keepdims=True)) / (2 ** bits - 1)
    assert (np.abs(K2[:, :, :40] - orig) <= step * 0.5 + 1e-3).all()
    assert not np.array_equal(K2[:, :, :n_quant], np.take_along_axis(K1, idx[..., None], 2)[:, :, :n_quant])
    np.testing.assert_array_equal(K2[:, :, 40:], k2)  # the new tokens are in the residual, exact


def test_key_requantization_error_compared_with_quantizing_once(rng):
    """What re-quantizing thinned key groups costs, measured: 4-bit, many evictions while decoding."""
    d, g, budget = 32, 16, 64
    cache = lmcache.Cache(backend="numpy", bits=4, group_size=g, residual=g, policy=KNorm(window=8, slack=16),
                          budget=budget, sinks=4)
    twin = lmcache.Cache(backend="numpy", bits=None, policy=KNorm(window=8, slack=16), budget=budget, sinks=4)
    base = randn(rng, 1, 2, 1, d) * 2
    for t in [96] + [1] * 200:
        k, v = randn(rng, 1, 2, t, d) + base, randn(rng, 1, 2, t, d)
        K, _ = cache.update(0, k, v)
        Kt, _ = twin.update(0, k, v)
    assert cache.stats()["tokens_evicted"] == twin.stats()["tokens_evicted"] > 150
    once = lmcache.dequantize(lmcache.quantize(Kt[:, :, :cache.stats()["tokens_quantized"]], 4, g, axis=-2))
    n = once.shape[2]
    err_evicted = np.sqrt(np.mean((K[:, :, :n] - Kt[:, :, :n]) ** 2))
    err_once = np.sqrt(np.mean((once - Kt[:, :, :n]) ** 2))
    # Re-quantized keys are worse than keys quantized once over the kept tokens, but by a bounded factor.
    assert err_once < err_evicted < 3 * err_once


def test_rotation_and_a_per_head_plan_with_eviction(rng):
    plan = lmcache.QuantPlan([[4, None, 2]], [[8, 4, None]])
    cache = lmcache.Cache(backend="numpy", bits=4, plan=plan, group_size=8, residual=8, rotate=True,
                          policy=H2O(window=4, slack=4), budget=32, sinks=2)
    for t, L in [(60, 60), (1, 1), (3, 2)] * 4:
        K, V = cache.update(0, randn(rng, 1, 3, t, 16), randn(rng, 1, 3, t, 16))
        q = randn(rng, 1, 6, L, 16)
        np.testing.assert_allclose(cache.attend(0, q), attention64(q, K, V), rtol=1e-4, atol=1e-4)
        assert cache.seq_len(0) <= 36


def test_errors_leave_no_cache_and_say_what_is_accepted():
    with pytest.raises(ValueError, match="unknown eviction policy 'lfu'"):
        lmcache.Cache(backend="numpy", policy="lfu", budget=100)
    with pytest.raises(ValueError, match=r"budget=10 is too small.*sinks \(4\) \+ the recent window \(32\) = 36"):
        lmcache.Cache(backend="numpy", policy="h2o", budget=10)
    with pytest.raises(ValueError, match="too small"):
        lmcache.Cache(backend="numpy", policy="window", budget=3, sinks=4)  # budget below sinks
    with pytest.raises(ValueError, match="needs budget="):
        lmcache.Cache(backend="numpy", policy="h2o")
    with pytest.raises(ValueError, match="needs an eviction policy"):
        lmcache.Cache(backend="numpy", budget=100)
    with pytest.raises(ValueError, match="budget must be a positive integer"):
        lmcache.Cache(backend="numpy", policy="knorm", budget=99.5)
    with pytest.raises(TypeError, match="policy must be"):
        lmcache.Cache(backend="numpy", policy=object(), budget=100)
    with pytest.raises(ValueError, match="sinks >= 1"):
        lmcache.Cache(backend="numpy", policy="sink", budget=100, sinks=0)


def test_a_failed_update_leaves_statistics_and_tokens_as_they_were(rng):
    cache = lmcache.Cache(backend="numpy", bits=None, policy=H2O(window=4, slack=0), budget=16, sinks=2)
    cache.update(0, randn(rng, 1, 1, 30, 8), randn(rng, 1, 1, 30, 8))
    cache.attend(0, randn(rng, 1, 1, 30, 8))
    before = (cache.seq_len(0), cache.seen_tokens(0))
    with pytest.raises(ValueError):
        cache.update(0, randn(rng, 1, 2, 1, 8), randn(rng, 1, 2, 1, 8))
    assert (cache.seq_len(0), cache.seen_tokens(0)) == before == (16, 30)


def test_reset_forgets_evicted_tokens(rng):
    cache = lmcache.Cache(backend="numpy", bits=None, policy="window", budget=8, sinks=1)
    cache.update(0, randn(rng, 1, 1, 50, 4), randn(rng, 1, 1, 50, 4))
    cache.update(0, randn(rng, 1, 1, 1, 4), randn(rng, 1, 1, 1, 4))
    assert cache.seen_tokens(0) == 51
    cache.reset()
    assert cache.seen_tokens(0) == 0 and cache.stats()["tokens_evicted"] == 0


def test_evicted_rebuild_keeps_the_flush_rule(rng):
    """The rebuilt group has whole key groups quantized and a residual of at least ``residual``."""
    cache = lmcache.Cache(backend="numpy", bits=4, group_size=8, residual=5)
    cache.update(0, randn(rng, 1, 2, 77, 16), randn(rng, 1, 2, 77, 16))
    group = cache._layers[0].groups[0]
    idx = np.sort(rng.permutation(77)[:37].reshape(1, 1, 37).repeat(2, 1), -1)
    new = evicted(get_backend("numpy"), group, idx)
    assert new.seq_len == 37 and new.n_quant == 32 and new.n_res == 5


@pytest.mark.parametrize("policy", ["window", "sink", "h2o", "snapkv", "knorm", "keydiff"])
@pytest.mark.parametrize("bits", [None, 4])
def test_numpy_and_torch_keep_the_same_tokens(policy, bits, rng):
    torch = require("torch")
    caches = {name: lmcache.Cache(backend=name, bits=bits, group_size=8, residual=8, policy=policy, budget=40,
                                  sinks=4) for name in ("numpy", "torch")}
    for t, L in [(90, 90), (1, 1), (4, 4)] + [(1, 1)] * 36:
        k, v, q = randn(rng, 1, 2, t, 16), randn(rng, 1, 2, t, 16), randn(rng, 1, 4, L, 16)
        Kn, Vn = caches["numpy"].update(0, k, v)
        Kt, Vt = caches["torch"].update(0, torch.from_numpy(k), torch.from_numpy(v))
        np.testing.assert_array_equal(Kn, Kt.numpy())
        np.testing.assert_array_equal(Vn, Vt.numpy())
        on = caches["numpy"].attend(0, q)
        ot = caches["torch"].attend(0, torch.from_numpy(q))
        np.testing.assert_allclose(on, ot.numpy(), rtol=1e-5, atol=1e-6)
    assert caches["numpy"].stats()["tokens_evicted"] == caches["torch"].stats()["tokens_evicted"] > 0


def test_evictor_attention_scores_match_the_probabilities(rng):
    """``attend(want_scores=n)`` sums the softmax over the group's query heads and the last n queries."""
    be = get_backend("numpy")
    q, k, v = randn(rng, 1, 4, 6, 8), randn(rng, 1, 2, 10, 8), randn(rng, 1, 2, 10, 8)
    out, sc = be.attention_scores(q, k, v, 0.3, 2)
    np.testing.assert_array_equal(out, be.attention(q, k, v, 0.3))
    s = np.repeat(k, 2, 1).astype(np.float64)
    s = q.astype(np.float64) @ s.swapaxes(-1, -2) * 0.3
    s = np.where(np.arange(10)[None] <= np.arange(4, 10)[:, None], s, -np.inf)
    p = np.exp(s - s.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    want = p[:, :, -2:].sum(2).reshape(1, 2, 2, 10).sum(2)
    np.testing.assert_allclose(sc, want, rtol=1e-5)
    assert sc.dtype == np.float32 and sc.shape == (1, 2, 10)
    _, all_ = be.attention_scores(q, k, v, 0.3)
    np.testing.assert_allclose(all_.sum(-1), [[12.0, 12.0]], rtol=1e-5)  # 2 heads x 6 queries, each sums to 1


def test_evictor_threshold_and_score_queries():
    ev = Evictor(SnapKV(observation=16, slack=10), 100, 4)
    assert ev.threshold == 110 and ev.score_queries == 16
    assert Evictor("h2o", 100, 4).score_queries is True
    assert Evictor("knorm", 100, 4).score_queries is False


@pytest.mark.parametrize("bits", [4, 2])
def test_keys_evicted_after_the_prompt_are_quantized_once(bits, rng):
    """The prompt's eviction takes the kept keys from full precision: the stored keys are exactly
    those of quantizing the kept tokens once, in their new groups."""
    k, v = randn(rng, 1, 2, 200, 16) * 2, randn(rng, 1, 2, 200, 16)
    twin = lmcache.Cache(backend="numpy", bits=None, policy=KNorm(window=8, slack=0), budget=72, sinks=4)
    cache = lmcache.Cache(backend="numpy", bits=bits, group_size=16, residual=8,
                          policy=KNorm(window=8, slack=0), budget=72, sinks=4)
    q = randn(rng, 1, 2, 1, 16)
    for c in (twin, cache):
        c.update(0, k, v)
        c.attend(0, q)
    Kt = twin.update(0, k[:, :, :1], v[:, :, :1])[0]
    K = cache.update(0, k[:, :, :1], v[:, :, :1])[0]
    n = cache.stats()["tokens_quantized"]
    assert n == 64 and cache.stats()["tokens_evicted"] == 128
    once = lmcache.dequantize(lmcache.quantize(Kt[:, :, :n], bits, 16, axis=-2))
    np.testing.assert_array_equal(K[:, :, :n], once)
    np.testing.assert_array_equal(K[:, :, n:], Kt[:, :, n:])


def test_a_backend_whose_attend_predates_want_scores_gets_the_composite(rng):
    """A backend overriding ``attend(q, view, scale)`` without ``want_scores`` still feeds H2O."""
    from lmcache.backends.numpy import NumpyBackend

    class FusedOnly(NumpyBackend):
        def attend(self, q, view, scale):
            return super().attend(q, view, scale)

    caches = [lmcache.Cache(backend=be, bits=4, group_size=8, residual=8, policy=H2O(window=4, slack=4), budget=24,
                            sinks=2) for be in ("numpy", FusedOnly())]
    for t in (40, 1, 1, 3, 1):
        k, v, q = randn(rng, 1, 2, t, 16), randn(rng, 1, 2, t, 16), randn(rng, 1, 4, t, 16)
        kv = [c.update(0, k, v) for c in caches]
        np.testing.assert_array_equal(kv[0][0], kv[1][0])
        np.testing.assert_array_equal(caches[0].attend(0, q), caches[1].attend(0, q))


@pytest.mark.parametrize("policy", [H2O(window=4, slack=4), SnapKV(window=4, slack=4, observation=3),
                                    KNorm(window=4, slack=4)])
def test_observe_feeds_the_policy_like_attend(policy, rng):
    """A model that computes attention itself calls ``observe``: the same tokens are kept as with ``attend``."""
    by_attend = lmcache.Cache(backend="numpy", bits=4, group_size=8, residual=8, policy=policy, budget=30, sinks=2)
    by_observe = lmcache.Cache(backend="numpy", bits=4, group_size=8, residual=8, policy=policy, budget=30, sinks=2)
    for t in (50, 1, 1, 5, 1, 1, 1, 1, 1):
        k, v, q = randn(rng, 1, 2, t, 16), randn(rng, 1, 2, t, 16), randn(rng, 1, 4, t, 16)
        K1, _ = by_attend.update(0, k, v)
        K2, _ = by_observe.update(0, k, v)
        np.testing.assert_array_equal(K1, K2)
        by_attend.attend(0, q)
        assert by_observe.observe(0, q) is None
    assert by_attend.stats()["tokens_evicted"] == by_observe.stats()["tokens_evicted"] > 0


def test_observe_checks_its_arguments_and_is_a_no_op_without_policy(rng):
    cache = lmcache.Cache(backend="numpy", bits=None)
    cache.update(0, randn(rng, 1, 1, 5, 8), randn(rng, 1, 1, 5, 8))
    cache.observe(0, randn(rng, 1, 1, 5, 8))
    assert cache.seq_len(0) == 5
    with pytest.raises(ValueError, match="q_len"):
        cache.observe(0, randn(rng, 1, 1, 6, 8))


def test_chunked_scores_equal_one_pass_and_skip_nothing(rng):
    """``observe``'s statistic in chunks of queries, each over the keys it sees, equals the one-pass sum."""
    from lmcache.eviction import chunked_scores

    be = get_backend("numpy")
    q, k, v = randn(rng, 1, 4, 11, 8), randn(rng, 1, 2, 15, 8), randn(rng, 1, 2, 15, 8)
    one = be.attention_scores(q, k, v, 0.3)[1]
    for chunk in (1, 3, 4, 11, 64):
        np.testing.assert_allclose(chunked_scores(be, q, k, v, 0.3, chunk=chunk), one, rtol=1e-5, atol=1e-6)
