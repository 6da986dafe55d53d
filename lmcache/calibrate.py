"""Calibration: choose 2, 4 or 8 bits per (layer, KV head, K or V) under an average-bit budget.

For every layer, KV head and side (keys, values) and every candidate bit-width, we measure
the error that quantizing *only that head's side* causes, the same way the cache quantizes
it (keys per channel over ``group_size`` tokens, values per token; the newest ``residual``
tokens in full precision; optional Hadamard rotation):

* with queries: the attention-output error ``||O_q - O||^2 / ||O||^2`` of the layer, where
  ``O`` is the output of every query head of the layer at sampled positions and a position
  ``p`` sees the tokens the cache would hold quantized at ``p`` in quantized form;
* without queries: the reconstruction error of that side, ``||x_q - x||^2`` over the
  layer's ``||x||^2``.

Errors of a layer are normalized by that layer's output (or K, V) energy so that layers
weigh alike, and are treated as additive. Two ways to weigh them by the model's loss
instead: samples carrying ``grads`` (the loss gradient at each attention output) give the
diagonal-Fisher error ``sum g^2 (O_q - O)^2``; ``weights=`` (e.g. ``loss_weights`` of a
measured per-layer, per-side loss increase) rescales each layer's (and side's) errors.
The plan minimizes their sum subject to
``sum(cost) <= avg_bits * n`` where the cost of a ``b``-bit head counts the codes *and* the
per-group ``scale`` and ``lo`` (``2 * scale_bits / group`` bits per element): an exact
multiple-choice knapsack solved by dynamic programming (a few hundred items).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

from .plan import QuantPlan
from .quant import BITS, check_bits, dequantize, hadamard, quantize

__all__ = ["calibrate", "element_cost", "head_errors", "loss_weights", "measure", "solve_budget"]


def element_cost(bits: int | None, group: int, scale_bits: int = 16) -> float:
    """Stored bits per element of a ``bits``-bit side grouped by ``group``: codes + scale + lo (16 for None)."""
    return 16.0 if bits is None else bits + 2.0 * scale_bits / group


def _to_numpy(x: Any, what: str) -> np.ndarray:
    if isinstance(x, np.ndarray):
        a = x
    else:
        from .backends import backend_of

        try:
            be = backend_of(x)
        except TypeError:
            raise TypeError(f"{what} must be an array of numpy, torch, jax or mlx, got {type(x).__name__}") from None
        a = be.to_numpy(x)
    if a.ndim != 4:
        raise ValueError(f"{what} must have shape [batch, heads, tokens, head_dim], got {tuple(a.shape)}")
    if not np.issubdtype(a.dtype, np.floating):
        raise TypeError(f"{what} must be a floating-point array, got dtype {a.dtype}")
    return a.astype(np.float32, copy=False)


def _unpack_sample(s: Any, i: int) -> tuple[np.ndarray, np.ndarray, np.ndarray | None, np.ndarray | None]:
    g = None
    if isinstance(s, Mapping):
        missing = {"keys", "values"} - set(s)
        if missing:
            raise ValueError(f"samples[{i}] must have 'keys' and 'values' (and optionally 'queries', 'grads'), "
                             f"missing {sorted(missing)}")
        k, v, q, g = s["keys"], s["values"], s.get("queries"), s.get("grads")
    elif isinstance(s, (tuple, list)) and len(s) in (2, 3):
        k, v, q = s[0], s[1], (s[2] if len(s) == 3 else None)
    else:
        raise TypeError(f"samples[{i}] must be a dict with 'keys', 'values' (, 'queries') or a tuple "
                        f"(keys, values[, queries]), got {type(s).__name__}")
    k, v = _to_numpy(k, f"samples[{i}] keys"), _to_numpy(v, f"samples[{i}] values")
    if k.shape != v.shape:
        raise ValueError(f"samples[{i}]: keys and values must have the same shape, got {k.shape} and {v.shape}")
    if q is not None:
        q = _to_numpy(q, f"samples[{i}] queries")
        b, hq, t, d = q.shape
        if (b, t, d) != (k.shape[0], k.shape[2], k.shape[3]) or hq % k.shape[1]:
            raise ValueError(f"samples[{i}]: queries {q.shape} must be [batch, q_heads, tokens, head_dim] with the "
                             f"keys' batch, tokens and head_dim ({k.shape}) and q_heads a multiple of "
                             f"{k.shape[1]} KV heads")
    if g is not None:
        if q is None:
            raise ValueError(f"samples[{i}]: 'grads' need 'queries' (the error they weigh is the attention output's)")
        g = _to_numpy(g, f"samples[{i}] grads")
        if g.shape != q.shape:
            raise ValueError(f"samples[{i}]: grads {g.shape} must have the queries' shape {q.shape} "
                             f"([batch, q_heads, tokens, head_dim])")
    return k, v, q, g


def _qdq(x: np.ndarray, bits: int, group: int, axis: int, rotate: bool) -> np.ndarray:
    """Quantize-dequantize ``x`` ``[B, H, N, D]`` as the cache does (rotated space back to model space)."""
    y = x @ hadamard(x.shape[-1]) if rotate else x
    y = dequantize(quantize(np.ascontiguousarray(y), bits=bits, group_size=group, axis=axis, backend="numpy"))
    return y @ hadamard(x.shape[-1]) if rotate else y


def _quantized_tokens(positions: np.ndarray, residual: int, group: int) -> np.ndarray:
    """Tokens the cache holds quantized when the token at each position has just been added."""
    n = positions + 1
    return np.where(n >= residual + group, (n - residual) // group * group, 0)


def head_errors(keys, values, queries=None, *, bits: Sequence[int] = BITS, group_size: int = 64,
                residual: int = 128, rotate: Any = False, fp_sinks: int = 0, max_queries: int = 128,
                scale: float | None = None, grads=None) -> dict[str, np.ndarray]:
    """Errors of one layer: ``{"k": [n_bits, kv_heads], "v": [n_bits, kv_heads]}`` (float64).

    ``keys``/``values``: ``[batch, kv_heads, tokens, head_dim]``; ``queries`` (optional):
    ``[batch, q_heads, tokens, head_dim]`` of the same tokens (post-RoPE, as attention sees
    them). Row ``i`` is the error of ``bits[i]`` applied to that head's side alone (see the
    module docstring). ``rotate``: ``False``, ``True``/``"kv"``, ``"k"`` or ``"v"``.
    ``fp_sinks``: the first tokens the cache keeps in full precision (``Cache(fp_sinks=)``).
    ``grads`` (optional, with queries): ``[batch, q_heads, tokens, head_dim]``, the gradient
    of the model's loss with respect to each query head's attention output (the input of
    the output projection, e.g. ``lmcache.commands.calibrate.loss_gradients``); the error is
    then ``sum g^2 (O_q - O)^2`` over sampled positions, scaled to all positions: the
    diagonal-Fisher estimate of the loss increase, comparable across layers as it stands.
    """
    k, v, q, g = _unpack_sample({"keys": keys, "values": values, "queries": queries, "grads": grads}, 0)
    rk, rv = {False: (False, False), None: (False, False), True: (True, True), "kv": (True, True),
              "k": (True, False), "v": (False, True)}[rotate]
    b, h, t, d = k.shape
    vgroup = min(group_size, d)
    errs = {"k": np.zeros((len(bits), h)), "v": np.zeros((len(bits), h))}
    s0 = fp_sinks
    n_all = (t - s0 - residual) // group_size * group_size if t >= s0 + residual + group_size else 0
    if n_all == 0:
        raise ValueError(f"calibration samples need at least fp_sinks + residual + group_size = "
                         f"{s0 + residual + group_size} tokens so that something is quantized, got {t}")
    k_s, v_s = k[:, :, :s0], v[:, :, :s0]
    k, v = k[:, :, s0:], v[:, :, s0:]
    if q is None:
        for j, nb in enumerate(bits):
            for side, x, grp, ax, rot in (("k", k, group_size, -2, rk), ("v", v, vgroup, -1, rv)):
                xs = x[:, :, :n_all]
                e = ((_qdq(xs, nb, grp, ax, rot) - xs) ** 2).sum(axis=(0, 2, 3))
                errs[side][j] = e / max(float((xs ** 2).sum()), 1e-30)
        return errs
    rep = q.shape[1] // h
    k, v = np.concatenate([k_s, k], axis=2), np.concatenate([v_s, v], axis=2)
    pos_all = np.arange(s0 + residual + group_size - 1, t)
    pos = pos_all[np.unique(np.linspace(0, len(pos_all) - 1, min(max_queries, len(pos_all))).round().astype(int))]
    nq = _quantized_tokens(pos - s0, residual, group_size)
    tok = np.arange(t)
    visible = tok[None, :] <= pos[:, None]                              # [P, T]
    quant = (tok[None, :] >= s0) & (tok[None, :] < s0 + nq[:, None])   # [P, T]
    sc = (1.0 / math.sqrt(d)) if scale is None else scale
    qs = q[:, :, pos].reshape(b, h, rep, len(pos), d)                   # [B, H, rep, P, D]

    def probs(s):
        s = np.where(visible, s, -np.inf)
        s = s - s.max(-1, keepdims=True)
        p = np.exp(s)
        return p / p.sum(-1, keepdims=True)

    s_ref = np.einsum("bhrpd,bhtd->bhrpt", qs, k) * sc
    p_ref = probs(s_ref)
    o_ref = np.einsum("bhrpt,bhtd->bhrpd", p_ref, v)
    den = max(float((o_ref ** 2).sum()), 1e-30)
    wgt = 1.0
    if g is not None:   # loss-weighted: no per-layer normalization, the gradients carry the scale
        wgt = g[:, :, pos].reshape(b, h, rep, len(pos), d) ** 2
        den = len(pos) / len(pos_all)
    kq_all = {nb: _qdq(k[:, :, s0:s0 + n_all], nb, group_size, -2, rk) for nb in bits}
    vq_all = {nb: _qdq(v[:, :, s0:s0 + n_all], nb, vgroup, -1, rv) for nb in bits}
    pu = p_ref * quant                                                  # attention on quantized tokens
    for j, nb in enumerate(bits):
        kq = np.concatenate([k_s, kq_all[nb], k[:, :, s0 + n_all:]], axis=2)
        s_q = np.where(quant, np.einsum("bhrpd,bhtd->bhrpt", qs, kq) * sc, s_ref)
        o_q = np.einsum("bhrpt,bhtd->bhrpd", probs(s_q), v)
        errs["k"][j] = (wgt * (o_q - o_ref) ** 2).sum(axis=(0, 2, 3, 4)) / den
        dv = np.concatenate([np.zeros_like(v_s), vq_all[nb] - v[:, :, s0:s0 + n_all],
                             np.zeros_like(v[:, :, s0 + n_all:])], axis=2)
        errs["v"][j] = (wgt * np.einsum("bhrpt,bhtd->bhrpd", pu, dv) ** 2).sum(axis=(0, 2, 3, 4)) / den
    return errs


def solve_budget(errors: np.ndarray, costs: np.ndarray, budget: float, start: np.ndarray | None = None,
                 max_moves: int | None = None) -> np.ndarray:
    """Pick one option per item minimizing the summed error with summed cost <= ``budget``.

    ``errors``/``costs``: ``[items, options]`` (costs of an item's options may differ by
    multiples of a common unit; any float costs are handled exactly when they are multiples
    of 1/64). ``start`` (``[items]`` option indices) with ``max_moves``: at most that many
    items may take another option than their start one. Returns the chosen option index per
    item, ``[items]`` int64. Exact dynamic programming over the budget in units of the
    greatest common step (and over the moves made).
    """
    errors, costs = np.asarray(errors, np.float64), np.asarray(costs, np.float64)
    n, m = errors.shape
    if (start is None) != (max_moves is None):
        raise ValueError("start and max_moves go together")
    if max_moves is not None and (isinstance(max_moves, bool) or not isinstance(max_moves, (int, np.integer))
                                  or max_moves < 0):
        raise ValueError(f"max_moves must be a non-negative int, got {max_moves!r}")
    start = np.zeros(n, np.int64) if start is None else np.asarray(start, np.int64)
    moves = 0 if max_moves is None else int(min(max_moves, n))
    base = costs.min(axis=1)
    extra = np.rint((costs - base[:, None]) * 64).astype(np.int64)      # exact for multiples of 1/64
    unit = int(np.gcd.reduce(extra[extra > 0])) if (extra > 0).any() else 1
    extra //= unit
    cap = int(math.floor((budget - base.sum()) * 64 / unit + 1e-9))
    if cap < 0:
        raise ValueError(f"the budget {budget:g} is below the cheapest plan's cost {base.sum():g}")
    cap = min(cap, int(extra.max(axis=1).sum()))
    inf = np.inf
    # best[k, c]: least error with k moves (all counted as 0 when unlimited) and c units spent
    best = np.full((moves + 1, cap + 1), inf)
    best[0, 0] = 0.0
    choice = np.zeros((n, moves + 1, cap + 1), np.int8)
    for i in range(n):
        new = np.full((moves + 1, cap + 1), inf)
        for o in range(m):
            c = extra[i, o]
            mv = int(max_moves is not None and o != start[i])
            if c > cap or mv > moves:
                continue
            cand = np.full((moves + 1, cap + 1), inf)
            cand[mv:, c:] = best[:moves + 1 - mv, :cap + 1 - c] + errors[i, o]
            better = cand < new
            new[better] = cand[better]
            choice[i][better] = o
        best = new
    # spending less than the cap, or moving fewer items, is allowed
    k, j = np.unravel_index(int(np.argmin(best)), best.shape)
    if not np.isfinite(best[k, j]):
        raise ValueError(f"no plan within the budget {budget:g} moves at most {max_moves} items from start")
    out = np.zeros(n, np.int64)
    for i in range(n - 1, -1, -1):
        o = int(choice[i, k, j])
        out[i] = o
        j -= extra[i, o]
        k -= int(max_moves is not None and o != start[i])
    return out


def _check_settings(bits, scale_bits, rotate) -> list[int]:
    cand = sorted({check_bits(b) for b in bits})
    if isinstance(scale_bits, bool) or scale_bits not in (16, 32):
        raise ValueError(f"scale_bits must be 16 or 32, got {scale_bits!r}")
    if rotate not in (False, None, True, "k", "v", "kv"):
        raise ValueError(f"rotate must be False, True, 'k', 'v' or 'kv', got {rotate!r}")
    return cand


def _check_weights(weights: Any, n_layers: int, n_heads: int) -> dict:
    """``weights`` as ``{"k": [layers, kv_heads], "v": [layers, kv_heads]}`` float64 (all ones for ``None``)."""
    if weights is None:
        return {"k": np.ones((n_layers, n_heads)), "v": np.ones((n_layers, n_heads))}
    if isinstance(weights, Mapping):
        if set(weights) != {"k", "v"}:
            raise ValueError(f"weights given per side must be a dict with keys 'k' and 'v', got {sorted(weights)}")
        return {side: _check_weights(weights[side], n_layers, n_heads)["k"] for side in "kv"}
    try:
        w = np.asarray(weights, np.float64)
    except (TypeError, ValueError):
        raise TypeError(f"weights must be numbers shaped [layers] or [layers, kv_heads], got "
                        f"{type(weights).__name__}") from None
    if w.shape not in ((n_layers,), (n_layers, n_heads)):
        raise ValueError(f"weights must have shape ({n_layers},) or ({n_layers}, {n_heads}) (layers, KV heads of the "
                         f"samples), got {w.shape}")
    if not np.isfinite(w).all() or (w < 0).any() or not (w > 0).any():
        raise ValueError("weights must be finite, non-negative and not all zero")
    w = np.broadcast_to(w.reshape(n_layers, -1), (n_layers, n_heads)).astype(np.float64)
    return {"k": w, "v": w.copy()}


def loss_weights(errors: Mapping, loss_increase: Sequence, bits: int = 2, floor: float = 0.01) -> dict:
    """Weights that turn ``measure``'s errors into loss: pass them as ``calibrate(weights=...)``.

    ``errors``: the dict of ``measure``; ``loss_increase``: the measured loss increase when
    one layer alone is quantized at ``bits`` (e.g.
    ``lmcache.commands.calibrate.layer_loss_increase``), ``[layers]`` for K and V together
    or ``[layers, 2]`` for K and V apart. Weight of layer ``l`` (and side): ``max(dL,
    floor * max(dL)) / E(bits)``, ``E`` the summed errors the weight applies to; so the
    allocation keeps the measured ranking of heads inside a layer (and side) and follows the
    measured loss across them (the floor keeps a part the loss barely reacts to from being
    free). Returns ``{"k": [layers], "v": [layers]}`` float64 arrays.
    """
    if not isinstance(errors, Mapping) or not {"bits", "k", "v"} <= set(errors):
        raise ValueError("errors must be the dict returned by lmcache.calibrate.measure")
    if bits not in errors["bits"]:
        raise ValueError(f"bits={bits!r} is not among the measured bit-widths {errors['bits']}")
    d = np.asarray(loss_increase, np.float64)
    n_l = len(errors["k"])
    if d.shape not in ((n_l,), (n_l, 2)) or not np.isfinite(d).all():
        raise ValueError(f"loss_increase must hold one finite number per layer ({n_l}) or a (K, V) pair per layer, "
                         f"got shape {d.shape}")
    if not (d > 0).any():
        raise ValueError("loss_increase has no positive entry: quantizing no layer raised the loss")
    j = list(errors["bits"]).index(bits)
    ek = np.array([np.sum(errors["k"][i][j]) for i in range(n_l)])
    ev = np.array([np.sum(errors["v"][i][j]) for i in range(n_l)])
    d = np.maximum(d, floor * d.max())
    if d.ndim == 1:
        w = d / np.maximum(ek + ev, 1e-30)
        return {"k": w, "v": w.copy()}
    return {"k": d[:, 0] / np.maximum(ek, 1e-30), "v": d[:, 1] / np.maximum(ev, 1e-30)}


def measure(samples: Sequence, *, bits: Sequence[int] = BITS, group_size: int = 64, residual: int = 128,
            rotate: Any = False, fp_sinks: int = 0, max_queries: int = 128,
            progress: Callable[[int, int], None] | None = None) -> dict:
    """The errors ``calibrate`` allocates bits from, measured once (reuse them for several budgets).

    ``samples`` and the settings as for ``calibrate``. Returns a plain dict (JSON-ready):
    ``{"bits": [...], "head_dim": [per layer], "k": [layer][bits][head], "v": ..., "metric":
    ..., "group_size", "residual", "rotate"}``.
    """
    if isinstance(samples, (str, bytes)) or not isinstance(samples, Sequence) or not samples:
        raise TypeError(f"samples must be a non-empty list with one entry per layer, got {type(samples).__name__}")
    cand = _check_settings(bits, 16, rotate)
    layers = [_unpack_sample(s, i) for i, s in enumerate(samples)]
    heads = {k.shape[1] for k, _, _, _ in layers}
    if len(heads) != 1:
        raise ValueError(f"every layer of samples must have the same number of KV heads, got {sorted(heads)}")
    out = {"bits": cand, "head_dim": [], "k": [], "v": [], "group_size": group_size, "residual": residual,
           "rotate": rotate if rotate is not None else False, "fp_sinks": fp_sinks,
           "metric": "loss-weighted attention-output" if all(g is not None for *_, g in layers)
           else "attention-output" if all(q is not None for _, _, q, _ in layers)
           else ("reconstruction" if all(q is None for _, _, q, _ in layers) else "mixed")}
    for i, (k, v, q, g) in enumerate(layers):
        e = head_errors(k, v, q, bits=cand, group_size=group_size, residual=residual, rotate=rotate,
                        fp_sinks=fp_sinks, max_queries=max_queries, grads=g)
        out["head_dim"].append(int(k.shape[-1]))
        out["k"].append(e["k"].tolist())
        out["v"].append(e["v"].tolist())
        if progress is not None:
            progress(i + 1, len(layers))
    return out


def calibrate(samples: Sequence | None, avg_bits: float = 4.0, *, bits: Sequence[int] = BITS, group_size: int = 64,
              residual: int = 128, rotate: Any = False, fp_sinks: int = 0, scale_bits: int = 16,
              max_queries: int = 128, errors: dict | None = None, weights: Any = None, meta: dict | None = None,
              max_moves: int | None = None, progress: Callable[[int, int], None] | None = None) -> QuantPlan:
    """Choose bits per (layer, KV head, K/V) minimizing the summed error under ``avg_bits``.

    ``samples``: one entry per layer, each a dict ``{"keys", "values"[, "queries"]}`` or a
    tuple ``(keys, values[, queries])``; keys/values ``[batch, kv_heads, tokens, head_dim]``,
    queries ``[batch, q_heads, tokens, head_dim]`` (post-RoPE), arrays of any framework,
    with more than ``residual + group_size`` tokens. ``avg_bits``: the average stored bits
    per K/V element, scales and offsets included (``scale_bits`` each per group: 16 for the
    float16 scales of float16/bfloat16 caches, 32 for float32 caches): with
    ``scale_bits=16`` and ``group_size=64``, uniform 2 bits costs 2.5 and uniform 4 bits 4.5.
    ``bits``: candidate bit-widths. ``group_size``/``residual``/``rotate``/``fp_sinks``: the
    settings of the cache the plan is for. ``errors``: the result of ``measure`` (then ``samples`` may
    be ``None`` and the settings are taken from it). ``weights`` (optional): how much the
    model's loss reacts to each layer's error, ``[layers]`` or ``[layers, kv_heads]``
    non-negative numbers, or a dict ``{"k": ..., "v": ...}`` of those (e.g. ``loss_weights``
    from measured loss increases, or ``lmcache.commands.calibrate.sensitivity``); each
    head's K and V errors are multiplied by their weight before allocation, so
    bits go where the loss reacts rather than where the layer-normalized error is largest.
    ``max_moves`` (optional): start from the widest uniform plan within the budget and let at
    most this many (layer, head, K/V) entries take other bits: the measured errors are
    estimates, and near a uniform plan that is already good (4 bits) the many small trades
    of an unlimited allocation can cost more than they gain; choose it on held-out loss.
    ``progress(done, total)`` is called after each layer. Returns a ``QuantPlan`` whose
    ``meta`` records settings, errors, weights, cost.
    """
    if isinstance(avg_bits, bool) or not isinstance(avg_bits, (int, float)) or not avg_bits > 0:
        raise ValueError(f"avg_bits must be a positive number, got {avg_bits!r}")
    _check_settings(bits, scale_bits, rotate)
    if errors is None:
        errors = measure(samples, bits=bits, group_size=group_size, residual=residual, rotate=rotate,
                         fp_sinks=fp_sinks, max_queries=max_queries, progress=progress)
    elif not isinstance(errors, Mapping) or not {"bits", "k", "v", "head_dim"} <= set(errors):
        raise ValueError("errors must be the dict returned by lmcache.calibrate.measure")
    cand, group_size = list(errors["bits"]), errors.get("group_size", group_size)
    n_l, n_heads = len(errors["k"]), len(errors["k"][0][0])
    w, weighted = _check_weights(weights, n_l, n_heads), weights is not None
    errs, costs, weights = [], [], []
    for i in range(n_l):
        d = errors["head_dim"][i]
        for side, grp in (("k", group_size), ("v", min(group_size, d))):
            e = np.asarray(errors[side][i], np.float64) * w[side][i]  # [bits, heads]
            for hh in range(n_heads):
                errs.append(e[:, hh])
                costs.append([element_cost(b, grp, scale_bits) * d for b in cand])
                weights.append(d)
    errs_a, costs_a = np.array(errs), np.array(costs)
    total_w = float(sum(weights))
    cheapest = costs_a.min(axis=1).sum() / total_w
    if float(avg_bits) * total_w < costs_a.min(axis=1).sum() - 1e-9:
        raise ValueError(f"avg_bits={avg_bits} is below the cheapest plan: {min(cand)} bits everywhere cost "
                         f"{cheapest:.3f} bits per element with scales ({scale_bits}-bit scale and offset per group)")
    start = None
    if max_moves is not None:
        fits = [j for j in range(len(cand)) if costs_a[:, j].sum() <= float(avg_bits) * total_w + 1e-9]
        start = np.full(len(errs_a), max(fits, key=lambda j: cand[j]), np.int64)
    pick = solve_budget(errs_a, costs_a, float(avg_bits) * total_w, start, max_moves)
    chosen = [cand[o] for o in pick]
    k_bits, v_bits = [], []
    for i in range(n_l):
        base = i * 2 * n_heads
        k_bits.append(chosen[base:base + n_heads])
        v_bits.append(chosen[base + n_heads:base + 2 * n_heads])
    idx = np.arange(len(pick))
    info = {
        "avg_bits_budget": float(avg_bits), "avg_bits": round(float(costs_a[idx, pick].sum()) / total_w, 4),
        "scale_bits": scale_bits, "group_size": group_size, "residual": errors.get("residual", residual),
        "rotate": errors.get("rotate", rotate), "fp_sinks": errors.get("fp_sinks", fp_sinks),
        "metric": errors.get("metric") if not weighted else f"{errors.get('metric')}, sensitivity-weighted",
        "weights": {side: w[side].tolist() for side in "kv"} if weighted else None,
        "total_error": float(errs_a[idx, pick].sum()), "max_moves": max_moves,
        "uniform_error": {str(b): float(errs_a[:, j].sum()) for j, b in enumerate(cand)},
        "errors": dict(errors),
    }
    info.update(meta or {})
    return QuantPlan(k_bits, v_bits, info)
