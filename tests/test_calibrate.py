"""lmcache.calibrate: errors per head, the budget solver, plans that Cache accepts."""

from __future__ import annotations

import itertools
import json

import numpy as np
import pytest
from conftest import require, test_backends

import lmcache
from lmcache.calibrate import calibrate, element_cost, head_errors, loss_weights, measure, solve_budget
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


def test_solver_with_a_move_limit_is_exact(rng):
    errors = rng.random((6, 3)) * np.array([4.0, 1.0, 0.1])
    costs = np.tile([2.5, 4.5, 8.5], (6, 1))
    start = np.ones(6, np.int64)  # 4 bits everywhere: 27 units
    for budget, moves in ((27.0, 0), (27.0, 2), (27.0, 3), (33.0, 1), (51.0, 4)):
        pick = solve_budget(errors, costs, budget, start, moves)
        best = min((sum(errors[i, o] for i, o in enumerate(c)), c) for c in itertools.product(range(3), repeat=6)
                   if sum(costs[i, o] for i, o in enumerate(c)) <= budget + 1e-9
                   and sum(o != 1 for o in c) <= moves)
        assert np.isclose(errors[np.arange(6), pick].sum(), best[0])
        assert (pick != start).sum() <= moves and costs[np.arange(6), pick].sum() <= budget + 1e-9
    with pytest.raises(ValueError, match="max_moves must be a non-negative int"):
        solve_budget(errors, costs, 27.0, start, -1)
    with pytest.raises(ValueError, match="start and max_moves go together"):
        solve_budget(errors, costs, 27.0, start)


def test_max_moves_stays_near_the_uniform_plan(rng):
    errs = measure(synthetic(rng, True), residual=64, max_queries=16)
    four = element_cost(4, 64)
    assert all(b == 4 for row in calibrate(None, four, errors=errs, max_moves=0).k_bits for b in row)
    free = calibrate(None, four, errors=errs)
    for moves in (1, 3, 1000):
        plan = calibrate(None, four, errors=errs, max_moves=moves)
        moved = sum(b != 4 for row in plan.k_bits + plan.v_bits for b in row)
        assert moved <= moves and plan.meta["avg_bits"] <= four + 1e-9 and plan.meta["max_moves"] == moves
        assert plan.meta["total_error"] >= free.meta["total_error"] - 1e-12  # the free plan is the optimum
    assert np.isclose(plan.meta["total_error"], free.meta["total_error"])  # enough moves: the same optimum


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


def test_summary_counts_the_calibrated_head_dim(rng):
    # head_dim 16: values group over 16 channels, so scales cost more than at the default 64
    samples = [{k: v[..., :16] for k, v in s.items()} for s in synthetic(rng, True)]
    plan = calibrate(samples, avg_bits=4.0, residual=64, max_queries=16)
    assert f"average {plan.meta['avg_bits']:.2f} bits" in plan.summary() and "head_dim 16" in plan.summary()
    assert plan.average_bits(16) != plan.average_bits(64)


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


def test_loss_gradients_steer_bits(rng):
    """Heads whose output the loss ignores (zero gradient) get 2 bits even when hard; the budget holds."""
    samples = synthetic(rng, True)
    for layer, s in enumerate(samples):
        g = np.ones_like(s["queries"])
        for h in range(H):
            if (layer, h) in HARD:
                g[:, 2 * h:2 * h + 2] = 0.0          # both query heads of a hard KV head
        s["grads"] = g
    plan = calibrate(samples, avg_bits=3.5, residual=64, max_queries=32)
    assert plan.meta["metric"] == "loss-weighted attention-output"
    for layer, h in HARD:
        assert plan.k_bits[layer][h] == 2 and plan.v_bits[layer][h] == 2
    assert plan.meta["avg_bits"] <= 3.5 + 1e-9
    # with unit gradients the error is the summed squared output error: zero where nothing is quantized
    s = samples[0]
    e = head_errors(s["keys"], s["values"], s["queries"], residual=64, max_queries=16,
                    grads=np.ones_like(s["queries"]))
    assert (e["k"][0] > e["k"][1]).all() and (e["v"][0] > 0).all()
    with pytest.raises(ValueError, match="grads .* must have the queries' shape"):
        head_errors(s["keys"], s["values"], s["queries"], residual=64, grads=s["queries"][:, :2])
    with pytest.raises(ValueError, match="'grads' need 'queries'"):
        calibrate([{"keys": s["keys"], "values": s["values"], "grads": s["queries"]}], residual=64)


def test_weights_move_bits_to_sensitive_layers(rng):
    samples = synthetic(rng, False)
    errs = measure(samples, residual=64)
    base = calibrate(None, avg_bits=3.5, errors=errs)
    heavy = calibrate(None, avg_bits=3.5, errors=errs, weights=[1.0, 1000.0, 1.0])
    mean = lambda plan, i: np.mean(plan.k_bits[i] + plan.v_bits[i])  # noqa: E731
    assert mean(heavy, 1) > mean(base, 1) and mean(heavy, 0) == mean(heavy, 2) == 2
    assert heavy.meta["weights"]["k"][1] == [1000.0] * H and "sensitivity-weighted" in heavy.meta["metric"]
    per_head = calibrate(None, avg_bits=3.5, errors=errs, weights=np.ones((L, H)))
    assert per_head.k_bits == base.k_bits and per_head.v_bits == base.v_bits
    for bad, err in (([1.0, 1.0], ValueError), ([[1.0] * (H + 1)] * L, ValueError), ([1.0, -1.0, 1.0], ValueError),
                     ([0.0, 0.0, 0.0], ValueError), ([1.0, float("nan"), 1.0], ValueError), ("abc", TypeError)):
        with pytest.raises(err, match="weights"):
            calibrate(None, avg_bits=3.5, errors=errs, weights=bad)


def test_loss_weights(rng):
    errs = measure(synthetic(rng, False), residual=64)
    w = loss_weights(errs, [0.5, 0.0, -0.1])
    e2 = [np.sum(errs["k"][i][0]) + np.sum(errs["v"][i][0]) for i in range(L)]
    assert np.allclose(w["k"], np.array([0.5, 0.005, 0.005]) / e2) and np.allclose(w["v"], w["k"])  # floor: 1%
    plan = calibrate(None, avg_bits=3.5, errors=errs, weights=w)
    assert np.mean(plan.k_bits[0] + plan.v_bits[0]) > np.mean(plan.k_bits[1] + plan.v_bits[1])
    with pytest.raises(ValueError, match="one finite number per layer"):
        loss_weights(errs, [1.0, 2.0])
    with pytest.raises(ValueError, match="no positive entry"):
        loss_weights(errs, [0.0, -1.0, 0.0])
    with pytest.raises(ValueError, match="bits=3 is not among"):
        loss_weights(errs, [1.0, 1.0, 1.0], bits=3)


def test_model_sensitivities():
    """Loss gradients, sensitivity and per-layer loss increase on a tiny random Llama (transformers)."""
    torch = require("torch")
    transformers = require("transformers")
    require("lmcache.integrations.hf")
    from lmcache.commands.calibrate import layer_loss_increase, loss_gradients, sensitivity

    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=97, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                                   max_position_embeddings=512)
    model = transformers.LlamaForCausalLM(cfg).eval()
    ids = torch.randint(0, 97, (1, 80))
    grads = loss_gradients(model, ids)
    assert [tuple(g.shape) for g in grads] == [(1, 4, 80, 16)] * 2
    # the last token's output predicts nothing inside the text: no loss flows back to it
    assert all(float(g[:, :, -1].abs().max()) == 0.0 and float(g[:, :, :-1].abs().max()) > 0 for g in grads)
    assert all(p.grad is None for p in model.parameters())
    w = sensitivity(model, ids)
    assert len(w) == 2 and all(len(r) == 2 and min(r) > 0 for r in w)
    kw = {"group_size": 16, "residual": 16, "rotate": True, "fp_sinks": 1}
    two = layer_loss_increase(model, ids, bits=2, chunk=20, **kw)
    eight = layer_loss_increase(model, ids, bits=8, chunk=20, **kw)
    assert len(two) == 2 and all(abs(e) < abs(t) for e, t in zip(eight, two))
    with pytest.raises(ValueError, match="input_ids must be"):
        loss_gradients(model, ids[0])


def test_kl_errors_find_a_planted_outlier_head():
    """kl_errors measures each entry's KL on the model itself: a value head given an outlier
    channel (the model's function unchanged: o_proj divides it back) is found and gets bits."""
    torch = require("torch")
    transformers = require("transformers")
    hf = require("lmcache.integrations.hf")
    from lmcache.commands.calibrate import kl_and_nll, kl_errors, reference_logprobs

    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=97, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                                   max_position_embeddings=512)
    model = transformers.LlamaForCausalLM(cfg).eval()
    ids = torch.randint(0, 97, (1, 80), generator=torch.Generator().manual_seed(3))
    kw = {"group_size": 16, "residual": 16, "rotate": False, "fp_sinks": 0}
    ref = reference_logprobs(model, ids, chunk=20)
    kl, nll = kl_and_nll(model, ids, hf.HFCache(bits=None), ref, chunk=20)
    ref_nll = -sum(float(r[0, :len(t)].gather(1, t[:, None]).sum()) for r, t in
                   zip(ref, [ids[0, s + 1:s + 21] for s in range(0, 80, 20)])) / 79
    assert abs(kl) < 1e-6 and nll == pytest.approx(ref_nll, rel=1e-6)
    assert kl_and_nll(model, ids, hf.HFCache(bits=2, **kw), ref, chunk=20)[0] > 1e-5

    attn = model.model.layers[1].self_attn
    with torch.no_grad():  # value channel 5 of KV head 0 (query heads 0 and 1) made 40x larger
        attn.v_proj.weight[5] *= 40
        attn.o_proj.weight[:, [5, 16 + 5]] /= 40
    ref = reference_logprobs(model, ids, chunk=20)
    done = []
    e = kl_errors(model, ids, chunk=20, progress=lambda d, t: done.append((d, t)), **kw)
    assert done[-1] == (26, 26) and e["bits"] == [2, 4, 8] and e["head_dim"] == [16, 16]
    assert abs(e["base_kl"]) < 1e-6
    # KL falls with the bits of every value entry (this random model's attention barely reacts to its keys)
    assert all(e["v"][layer][0][h] > e["v"][layer][1][h] > e["v"][layer][2][h] for layer in range(2)
               for h in range(2))
    two = {(s, layer, h): e[s][layer][0][h] for s in "kv" for layer in range(2) for h in range(2)}
    assert max(two, key=two.get) == ("v", 1, 0)
    # one entry above 2 bits fits the budget: the planted head takes it
    from lmcache.calibrate import calibrate, element_cost

    plan = calibrate(None, (7 * element_cost(2, 16) + element_cost(4, 16)) / 8, errors=e)
    assert plan.v_bits[1][0] == 4 and sum(b > 2 for row in plan.k_bits + plan.v_bits for b in row) == 1
    with pytest.raises(ValueError, match="bits"):
        kl_errors(model, ids, bits=(3, 4), **kw)
