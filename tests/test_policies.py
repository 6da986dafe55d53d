"""Eviction policies: the registry, and each policy's choice on hand-built statistics."""

from __future__ import annotations

import numpy as np
import pytest

from lmcache.eviction import Evictor
from lmcache.policies.base import Policy, available, get_policy
from lmcache.policies.h2o import H2O
from lmcache.policies.keydiff import KeyDiff, key_similarity
from lmcache.policies.knorm import KNorm
from lmcache.policies.sink import Sink
from lmcache.policies.snapkv import SnapKV, pool
from lmcache.policies.window import Window


def choose(policy, budget, sinks, stats, n=None):
    ev = Evictor(policy, budget, sinks)
    stats = None if stats is None else np.asarray(stats, np.float32)
    n = (stats.shape[2] if stats.ndim == 4 else stats.shape[-1]) if n is None else n
    shape = (1, 1) if stats is None else stats.shape[:2]
    return ev.choose(stats, n, shape)


def test_registry_names_and_instances():
    assert available() == ["window", "sink", "h2o", "snapkv", "knorm", "keydiff"]
    for name, cls in zip(available(), (Window, Sink, H2O, SnapKV, KNorm, KeyDiff)):
        p = get_policy(name)
        assert type(p) is cls and p.name == name
    assert get_policy(" H2O ").name == "h2o"
    mine = SnapKV(window=8, observation=4)
    assert get_policy(mine) is mine


def test_unknown_policy_name_is_a_value_error_listing_the_known_ones():
    with pytest.raises(ValueError, match="unknown eviction policy 'lru'.*window, sink, h2o, snapkv, knorm, keydiff"):
        get_policy("lru")


def test_policy_of_wrong_type_is_a_type_error():
    with pytest.raises(TypeError, match="policy must be"):
        get_policy(3)


@pytest.mark.parametrize("kwargs", [{"window": 0}, {"window": 2.5}, {"slack": -1}, {"window": True}, {"kernel": 0},
                                    {"half_life": 0}, {"half_life": 1.5}])
def test_policy_arguments_are_checked(kwargs):
    with pytest.raises(ValueError):
        H2O(**kwargs)


def test_snapkv_arguments_are_checked():
    with pytest.raises(ValueError, match="pooling"):
        SnapKV(pooling="median")
    with pytest.raises(ValueError, match="observation"):
        SnapKV(observation=0)


def test_window_keeps_sinks_and_newest():
    idx = choose("window", budget=10, sinks=2, stats=None, n=20)
    assert idx.tolist() == [[[0, 1] + list(range(12, 20))]]


def test_window_without_sinks_is_a_plain_sliding_window():
    idx = choose(Window(), budget=5, sinks=0, stats=None, n=9)
    assert idx.tolist() == [[[4, 5, 6, 7, 8]]]


def test_sink_needs_a_sink_token():
    assert choose("sink", budget=6, sinks=1, stats=None, n=10).tolist() == [[[0, 5, 6, 7, 8, 9]]]
    with pytest.raises(ValueError, match="sinks >= 1"):
        Evictor("sink", 6, 0)


def test_h2o_keeps_heavy_hitters_per_head():
    stats = np.full((1, 2, 16), 0.1)
    stats[0, 0, [5, 7]] = 3.0  # head 0's heavy hitters
    stats[0, 1, [3, 9]] = 2.0  # head 1's
    stats[0, :, 0] = 0.0  # a sink keeps its place whatever its score
    idx = choose(H2O(window=2, kernel=1), budget=5, sinks=1, stats=stats)
    assert idx[0, 0].tolist() == [0, 5, 7, 14, 15]
    assert idx[0, 1].tolist() == [0, 3, 9, 14, 15]


def test_h2o_pools_so_a_heavy_hitter_keeps_its_neighbours():
    stats = np.zeros((1, 1, 30))
    stats[0, 0, 12] = 2.0
    stats[0, 0, 20] = 1.0
    assert choose(H2O(window=1, kernel=3), budget=5, sinks=1, stats=stats).tolist() == [[[0, 11, 12, 13, 29]]]
    assert H2O().kernel == 11 and H2O().half_life == 32 and H2O(half_life=None).half_life is None


def test_ties_go_to_the_older_token():
    stats = np.ones((1, 1, 12))
    idx = choose(H2O(window=1, kernel=1), budget=4, sinks=1, stats=stats)
    assert idx.tolist() == [[[0, 1, 2, 11]]]


def test_recent_window_is_kept_even_with_zero_scores():
    stats = np.zeros((1, 1, 12))
    stats[0, 0, 2] = 5
    idx = choose(H2O(window=3, kernel=1), budget=5, sinks=1, stats=stats)
    assert idx.tolist() == [[[0, 2, 9, 10, 11]]]


def test_snapkv_pooling_keeps_a_hit_with_its_neighbours():
    stats = np.zeros((1, 1, 30))
    stats[0, 0, 12] = 1.0  # one strongly attended token
    stats[0, 0, 20] = 0.5  # a weaker one
    idx = choose(SnapKV(window=2, kernel=3, pooling="max"), budget=7, sinks=0, stats=stats)
    assert idx.tolist() == [[[11, 12, 13, 19, 20, 28, 29]]]


def test_pool_avg_and_max_on_a_spike():
    x = np.array([0.0, 0, 3, 0, 0])
    np.testing.assert_allclose(pool(x, 3, "max"), [0, 3, 3, 3, 0])
    np.testing.assert_allclose(pool(x, 3, "avg"), [0, 1, 1, 1, 0])
    np.testing.assert_allclose(pool(np.array([2.0, 4]), 3, "avg"), [3, 3])  # edges average what exists
    np.testing.assert_array_equal(pool(x, 1, "avg"), x)


def test_knorm_keeps_the_smallest_key_norms():
    norms = np.full((1, 2, 10), 4.0)
    norms[0, 0, 6] = 0.5
    norms[0, 1, 3] = 0.1
    norms[0, 1, 4] = 0.2
    idx = choose(KNorm(window=1, kernel=1), budget=4, sinks=1, stats=norms)
    assert idx[0, 0].tolist() == [0, 1, 6, 9]  # then the tie between 4.0s goes to the oldest
    assert idx[0, 1].tolist() == [0, 3, 4, 9]


def test_knorm_pools_so_a_low_norm_token_keeps_its_neighbours():
    norms = np.full((1, 1, 20), 4.0)
    norms[0, 0, 10] = 0.5
    norms[0, 0, 3] = 3.0
    idx = choose(KNorm(window=1, kernel=3), budget=5, sinks=1, stats=norms)
    assert idx.tolist() == [[[0, 9, 10, 11, 19]]]


def test_choice_is_sorted_unique_and_exactly_budget(rng):
    stats = rng.random((2, 3, 50))
    for name in available():
        pol = get_policy(name)
        pol.window = 3
        st = None if pol.statistic is None else rng.random((2, 3, 50, 4)) if pol.statistic == "keys" else stats
        idx = choose(pol, budget=20, sinks=4, stats=st, n=50)
        assert idx.shape[-1] == 20
        assert (np.diff(idx, axis=-1) > 0).all() and idx.min() >= 0 and idx.max() < 50
        assert (idx[..., :4] == np.arange(4)).all() and (idx[..., -1] == 49).all()


def test_a_custom_policy_plugs_in():
    class Oldest(Policy):
        name = "oldest"

        def scores(self, stats, n, shape):
            return np.broadcast_to(-np.arange(n, dtype=np.float64), tuple(shape) + (n,))

    assert choose(Oldest(window=1), budget=4, sinks=0, stats=None, n=10).tolist() == [[[0, 1, 2, 9]]]


def test_scores_of_the_wrong_shape_are_refused():
    class Bad(Policy):
        def scores(self, stats, n, shape):
            return np.zeros(n)

    with pytest.raises(ValueError, match="scores of shape"):
        choose(Bad(window=1), budget=2, sinks=0, stats=None, n=5)


def test_keydiff_keeps_the_keys_unlike_the_average_per_head():
    keys = np.zeros((1, 2, 12, 4))
    keys[..., 0] = 1.0  # most keys point along axis 0 ...
    keys[0, 0, 5] = [0.0, 2.0, 0.0, 0.0]  # ... head 0's odd ones out
    keys[0, 0, 8] = [1.0, 1.0, 0.0, 0.0]
    keys[0, 1, 3] = [0.0, 0.0, -3.0, 0.0]  # head 1's
    keys[0, 1, 7] = [0.0, 0.0, 0.0, 0.5]
    keys[0, :, 0] = [1.0, 0.0, 0.0, 0.0]  # the sink is kept whatever its score
    idx = choose(KeyDiff(window=1, kernel=1), budget=4, sinks=1, stats=keys)
    assert idx[0, 0].tolist() == [0, 5, 8, 11]
    assert idx[0, 1].tolist() == [0, 3, 7, 11]


def test_key_similarity_is_the_cosine_to_the_mean_unit_key_and_ignores_scale_and_rotation(rng):
    keys = rng.standard_normal((2, 3, 20, 8))
    cos = key_similarity(keys)
    unit = keys / np.linalg.norm(keys, axis=-1, keepdims=True)
    anchor = unit.mean(2, keepdims=True)
    want = (unit * anchor).sum(-1) / np.linalg.norm(anchor, axis=-1)
    np.testing.assert_allclose(cos, want, rtol=1e-12)
    q, _ = np.linalg.qr(rng.standard_normal((8, 8)))  # an orthogonal rotation, like the cache's Hadamard
    np.testing.assert_allclose(key_similarity(keys @ q), cos, atol=1e-12)
    np.testing.assert_allclose(key_similarity(keys * 7.5), cos, atol=1e-12)
    keys[0, 0, 4] = 0.0  # a zero key has no direction: similarity 0, no NaN
    assert key_similarity(keys)[0, 0, 4] == 0.0 and np.isfinite(key_similarity(keys)).all()


def test_keydiff_pools_and_checks_its_arguments():
    keys = np.zeros((1, 1, 20, 2))
    keys[..., 0] = 1.0
    keys[0, 0, 10] = [0.0, 1.0]
    assert choose(KeyDiff(window=1, kernel=3), budget=5, sinks=1, stats=keys).tolist() == [[[0, 9, 10, 11, 19]]]
    with pytest.raises(ValueError, match="kernel"):
        KeyDiff(kernel=0)
    with pytest.raises(ValueError, match="held keys of shape"):
        KeyDiff().scores(np.zeros((1, 1, 20)), 20, (1, 1))
