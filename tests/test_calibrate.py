"""lmcache.calibrate: errors per head, the budget solver, plans that Cache accepts."""

from __future__ import annotations

import itertools
import json

import numpy as np
import pytest
from conftest import require, test_backends

import lmcache
from lmcache.calibrate import calibrate, element_cost, head_errors, measure, solve_budget
from lmcache.plan import QuantPlan

L, H, T, D = 3, 4, 320, 64
HARD = {(0, 1), (1, 3), (2, 0)}  # (layer, head) made hard to quantize


def synthetic(rng, with_queries: bool):
    """KV where the HARD heads carry rare large outliers (they widen every group's range)."""
    out = []
    for layer in range(L):
        k = rng.standard_normal((1, H, T, D)).astype(np.float32)
        v = rng.standard_normal((1, H, T, D)).astype(np.float32)
        for h in range(H):
            if (layer, h) in HARD:
                for x in (k, v):
                    spikes = rng.random((T, D)) < 0.02
                    x[0, h][spikes] *= 40.0
        s = {"keys": k, "values": v}
        if with_queries:
            s["queries"] = rng.standard_normal((1, 2 * H, T, D)).astype(np.float32) * 0.5
        out.append(s)
    return out


@pytest.mark.parametrize("with_queries", [False, True])
def test_hard_heads_get_more_bits_and_budget_is_met(rng, with_queries):
    samples = synthetic(rng, with_queries)
    plan = calibrate(samples, avg_bits=3.5, residual=64, max_queries=32)
    bits = {(i, h): (plan.k_bits[i][h] + plan.v_bits[i][h]) / 2 for i in range(L) for h in range(H)}
    hard = np.mean([b for key, b in bits.items() if key in HARD])
    easy = np.mean([b for key, b in bits.items() if key not in HARD])
    assert hard > easy
    assert all(bits[key] >= 4 for key in HARD)
    assert plan.average_bits(head_dim=D, group_size=64) <= 3.5 + 1e-9
    assert plan.meta["avg_bits"] <= 3.5 + 1e-9
    assert plan.meta["metric"] == ("attention-output" if with_queries else "reconstruction")
    # a bigger budget never does worse
    richer = calibrate(None, avg_bits=5.0, errors=plan.meta["errors"])
    assert richer.meta["total_error"] <= plan.meta["total_error"]
    assert richer.average_bits(head_dim=D) <= 5.0 + 1e-9


def test_budget_edges(rng):
    samples = synthetic(rng, False)[:1]
    errs = measure(samples, residual=64)
    low = calibrate(None, avg_bits=element_cost(2, 64), errors=errs)
    assert all(b == 2 for row in low.k_bits + low.v_bits for b in row)
    high = calibrate(None, avg_bits=20, errors=errs)
    assert all(b == 8 for row in high.k_bits + high.v_bits for b in row)
    with pytest.raises(ValueError, match="avg_bits=2.4 is below the cheapest plan"):
        calibrate(None, avg_bits=2.4, errors=errs)
    with pytest.raises(ValueError, match="avg_bits must be a positive number"):
        calibrate(samples, avg_bits=0)
    with pytest.raises(ValueError, match="at least fp_sinks \\+ residual \\+ group_size"):
        calibrate([{"keys": np.zeros((1, 2, 100, 64), np.float32), "values": np.zeros((1, 2, 100, 64), np.float32)}])
    with pytest.raises(ValueError, match="missing \\['values'\\]"):
        calibrate([{"keys": np.zeros((1, 2, 300, 64), np.float32)}])
    with pytest.raises(ValueError, match="same number of KV heads"):
        calibrate([(np.zeros((1, 2, 300, 64), np.float32),) * 2, (np.zeros((1, 3, 300, 64), np.float32),) * 2])


def test_solver_is_exact(rng):
    errors = rng.random((6, 3)) * np.array([4.0, 1.0, 0.1])
    costs = np.tile([2.5, 4.5, 8.5], (6, 1))
    for budget in (15.0, 20.0, 27.0, 33.0, 51.0):
        pick = solve_budget(errors, costs, budget)
        best = min((sum(errors[i, o] for i, o in enumerate(c)), c) for c in itertools.product(range(3), repeat=6)
                   if sum(costs[i, o] for i, o in enumerate(c)) <= budget + 1e-9)
        assert np.isclose(errors[np.arange(6), pick].sum(), best[0])
        assert costs[np.arange(6), pick].sum() <= budget + 1e-9


def test_errors_fall_with_bits(rng):
    s = synthetic(rng, True)[0]
    for rotate, sinks in ((False, 0), (True, 0), (False, 4)):
        e = head_errors(s["keys"], s["values"], s["queries"], residual=64, max_queries=16, rotate=rotate,
                        fp_sinks=sinks)
        for side in "kv":
            assert e[side].shape == (3, H)
            assert (e[side][0] > e[side][1]).all() and (e[side][1] > e[side][2]).all()


def test_plan_round_trip(rng, tmp_path):
    plan = calibrate(synthetic(rng, False), avg_bits=4.0, residual=64, meta={"model": "synthetic"})
    path = tmp_path / "plan.json"
    plan.save(path)
    back = QuantPlan.load(path)
    assert back.k_bits == plan.k_bits and back.v_bits == plan.v_bits
    assert back.meta["model"] == "synthetic" and back.meta["errors"]["bits"] == [2, 4, 8]
    assert json.loads(path.read_text())["format"] == "lmcache.QuantPlan/1"
    assert "layer   2" in back.summary()


@pytest.mark.parametrize("backend", test_backends())
def test_cache_accepts_plan_and_rejects_a_bad_one(rng, backend):
    if backend != "numpy":
        require(backend)
    be = lmcache.backends.get_backend(backend)
    plan = QuantPlan([[2, 4, 8], [8, 4, 2]], [[4, 4, 2], [2, 8, None]])
    cache = lmcache.Cache(backend=backend, plan=plan, residual=64)
    kv = rng.standard_normal((1, 3, 200, 64)).astype(np.float32)
    for layer in range(2):
        k, v = cache.update(layer, be.from_numpy(kv), be.from_numpy(kv))
        err = np.abs(be.to_numpy(k) - kv)[0, :, :128].max(axis=(1, 2))
        kb = plan.k_bits[layer]
        assert err[kb.index(2)] > err[kb.index(4)] > err[kb.index(8)]
    with pytest.raises(ValueError, match="the plan covers layers 0..1, got layer 2"):
        cache.update(2, be.from_numpy(kv), be.from_numpy(kv))
    wrong_heads = lmcache.Cache(backend=backend, plan=plan)
    with pytest.raises(ValueError, match="the plan has 3 KV heads in layer 0, the model has 4"):
        wrong_heads.update(0, be.from_numpy(kv[:, :1].repeat(4, 1)), be.from_numpy(kv[:, :1].repeat(4, 1)))
    assert wrong_heads.num_layers == 0
    with pytest.raises(ValueError, match="the plan has 2 layers, the model has 30"):
        plan.check(30, 3)
    with pytest.raises(ValueError, match="layer 0 of the plan has 3 key heads but 2 value heads"):
        QuantPlan([[2, 4, 8]], [[2, 4]])


def test_fp_sinks_spare_an_outlier_first_token(rng):
    """A first token far off the others' range ruins its key groups unless kept apart (Cache(fp_sinks=))."""
    k = rng.standard_normal((1, 2, 320, 64)).astype(np.float32)
    v = rng.standard_normal((1, 2, 320, 64)).astype(np.float32)
    k[:, :, 0] *= 30.0
    q = rng.standard_normal((1, 2, 320, 64)).astype(np.float32) * 0.3
    plain = head_errors(k, v, q, residual=64, max_queries=16)
    sinks = head_errors(k, v, q, residual=64, max_queries=16, fp_sinks=1)
    assert (sinks["k"][0] < plain["k"][0] / 4).all()
    plan = calibrate([(k, v, q)], avg_bits=4.0, residual=64, fp_sinks=1, max_queries=16)
    assert plan.meta["fp_sinks"] == 1 and plan.meta["errors"]["fp_sinks"] == 1
