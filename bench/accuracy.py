"""Perplexity of SmolLM2-135M through compressed KV caches: lmcache (uniform and calibrated) vs transformers.

2048 tokens of real English (``pydoc_data.topics``, the first topics in sorted key order)
are fed in chunks of 128 tokens through the cache, so every chunk attends to the
compressed cache of the earlier ones. Rows: full precision (transformers' DynamicCache,
the anchor), lmcache uniform 8/4/2 bits, the 2-bit remedies (Hadamard rotation, first
tokens kept in full precision, key/value groups of 32 counted in the bytes), plans
calibrated on *other* topics at average 4.5, 3.5 and 3 bits per element with scales (4, 3
and 2.5 code bits), each next to the uniform-format row of exactly its bytes (4-bit; keys
4 / values 2 bits; 2-bit in groups of 32), and transformers' ``QuantizedCache`` (quanto
backend) at 4 and 2 bits, all in one run. For each row: perplexity, its change against
the anchor, the mean KL divergence of its next-token distributions from the anchor's (the
loss increase expected on text the model itself would write: unlike one text's perplexity
change, which moves by about +-0.1% with the tokens the text holds, it does not depend on
them), and the KV bytes held per token at the end (codes, scales, the full-precision
residual: ``cache.nbytes / tokens``) and in a long context (codes and scales).
``--rows`` runs a subset (row names as printed, or their slugs; the anchor always runs).

lmcache rows store K/V in float16 (``kv_dtype=torch.float16``: float16 scales too) while
the model computes in float32; full precision in float16 gives the same perplexity to 4
decimals. Writes ``bench/results/accuracy-cpu-<cpu>.json`` and a PNG of perplexity against
bytes per token. Run: ``python bench/accuracy.py [--rows name,name] [--tokens 2048]``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import re
import sys
import time

from _common import cpu_name  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
os.environ.setdefault("HF_HUB_OFFLINE", "1")


# name, implementation, settings. Order: the rows that decide the targets first.
# Settings: bits / kv_bits (keys, values) / plan (calibrated, average bits per element with
# scales: uniform 2 bits = 2.5, 4 bits = 4.5 with float16 scales and groups of 64) and the
# Cache options rotate, fp_sinks, group_size. "weigh": how a plan weighs the heads' errors
# (see WEIGH and ``calibrated`` in ``main``).
# fp_sinks=4, not 1: where a window starts on a repeated token ("\n\n") the first two tokens
# share the sink's attention, and the second, quantized, tripled a plan's KL on one unseen
# window of eight; 4 lowers every uniform row's mean KL over those windows (bench/sinks.py:
# chosen there and on the held-out text, not on the evaluated one)
RS = {"rotate": True, "fp_sinks": 4}
# how calibrated rows weigh errors: "validated" (the candidate of least held-out KL among the
# weightings and, at 4.5, plans near uniform 4 bits), "fisher", "loss" (measured per layer and
# side), "kl" (measured per entry: lmcache.commands.calibrate.kl_errors) or "none"
WEIGH = "validated"
LOSS_TOKENS = 1024
# "validated" rows: candidate plans (each weighting, and at a budget a uniform plan has, plans at
# most this many entries away from it) ranked by KL to full precision on VALIDATE_TOKENS held-out
# tokens (KL, not perplexity: between plans this close the held-out perplexity is mostly noise)
VALIDATE_MOVES = (0, 3, 6, 9, 12, 18, 24)
VALIDATE_TOKENS = 8192
CALIBRATION_TOKENS = 2048
ROWS = [
    ("full precision (DynamicCache fp32)", "anchor", {}),
    ("transformers QuantizedCache quanto 4-bit", "transformers", {"quanto": 4}),
    ("transformers QuantizedCache quanto 2-bit", "transformers", {"quanto": 2}),
    ("lmcache 4-bit", "lmcache", {"bits": 4}),
    ("lmcache 4-bit rotate sinks", "lmcache", {"bits": 4, **RS}),
    ("lmcache plan 4.5 rotate sinks", "lmcache", {"plan": 4.5, **RS}),
    ("lmcache K4 V2 rotate sinks", "lmcache", {"kv_bits": (4, 2), **RS}),
    ("lmcache plan 3.5 rotate sinks", "lmcache", {"plan": 3.5, **RS}),
    ("lmcache 2-bit g32 rotate sinks", "lmcache", {"bits": 2, "group_size": 32, **RS}),
    ("lmcache plan 3 rotate sinks", "lmcache", {"plan": 3.0, **RS}),
    ("lmcache 2-bit", "lmcache", {"bits": 2}),
    ("lmcache 2-bit rotate sinks", "lmcache", {"bits": 2, **RS}),
    ("lmcache 2-bit rotate sinks1", "lmcache", {"bits": 2, "rotate": True, "fp_sinks": 1}),
    ("lmcache 4-bit rotate sinks1", "lmcache", {"bits": 4, "rotate": True, "fp_sinks": 1}),
    ("lmcache 8-bit", "lmcache", {"bits": 8}),
    ("lmcache plan 4.5 rotate sinks fisher", "lmcache", {"plan": 4.5, "weigh": "fisher", **RS}),
    ("lmcache plan 3.5 rotate sinks fisher", "lmcache", {"plan": 3.5, "weigh": "fisher", **RS}),
    ("lmcache plan 3 rotate sinks fisher", "lmcache", {"plan": 3.0, "weigh": "fisher", **RS}),
    ("lmcache plan 4.5 rotate sinks unweighted", "lmcache", {"plan": 4.5, "weigh": "none", **RS}),
    ("lmcache plan 3.5 rotate sinks unweighted", "lmcache", {"plan": 3.5, "weigh": "none", **RS}),
    ("lmcache plan 3 rotate sinks unweighted", "lmcache", {"plan": 3.0, "weigh": "none", **RS}),
    ("lmcache plan 4.5 rotate sinks loss", "lmcache", {"plan": 4.5, "weigh": "loss", **RS}),
    ("lmcache plan 3.5 rotate sinks loss", "lmcache", {"plan": 3.5, "weigh": "loss", **RS}),
    ("lmcache plan 4.5 rotate sinks kl", "lmcache", {"plan": 4.5, "weigh": "kl", **RS}),
    ("lmcache plan 3.5 rotate sinks kl", "lmcache", {"plan": 3.5, "weigh": "kl", **RS}),
    ("lmcache plan 3 rotate sinks kl", "lmcache", {"plan": 3.0, "weigh": "kl", **RS}),
    ("lmcache 2-bit rotate", "lmcache", {"bits": 2, "rotate": True}),
    ("lmcache 2-bit sinks", "lmcache", {"bits": 2, "fp_sinks": 4}),
]
#: Calibrated rows with one fixed weighting: the candidates the validated plans are chosen from,
#: kept as ablations (the QuantizedCache comparison is reported with and without them).
ABLATIONS = {name for name, _, st in ROWS if "weigh" in st}

#: Calibrated rows and the uniform-format row of exactly the same bytes they must beat.
SAME_BYTES = [("lmcache plan 4.5 rotate sinks", "lmcache 4-bit rotate sinks"),
              ("lmcache plan 3.5 rotate sinks", "lmcache K4 V2 rotate sinks"),
              ("lmcache plan 3 rotate sinks", "lmcache 2-bit g32 rotate sinks")]

CACHE_KEYS = ("rotate", "fp_sinks", "group_size")


def cache_kw(st: dict) -> dict:
    """The lmcache.Cache options of a row's settings."""
    return {k: st[k] for k in CACHE_KEYS if k in st}


def plan_path(plans_dir: str, avg_bits: float, weigh: str = "loss", **cache_kw) -> str:
    """Where the calibrated plan of a row is written (without extension)."""
    tag = "-".join([f"{k}{v}" for k, v in sorted(cache_kw.items())] + [weigh])
    return os.path.join(plans_dir, f"accuracy-plan-{avg_bits:g}{'-' + tag if tag else ''}")


def saved_plan(plans_dir: str, st: dict):
    """The plan a calibrated row (settings ``st``) saved under ``plans_dir``."""
    from lmcache.plan import QuantPlan

    return QuantPlan.load(plan_path(plans_dir, st["plan"], st.get("weigh", WEIGH), **cache_kw(st)) + ".json")


def steady_bytes(impl: str, st: dict, plans_dir: str, layers: int = 30, kv_heads: int = 3, head_dim: int = 64) -> float:
    """KV bytes per token once the context is long, when the full-precision tail no longer counts.

    lmcache: codes plus a float16 scale and offset per group (keys: per channel over
    ``group_size`` tokens, values: per ``min(group_size, head_dim)`` channels), i.e. 4 bytes
    per head, side and token at groups of 64. quanto: codes plus a float32 scale and shift
    per group of 64 elements (8 bytes). The anchor: float32 K and V.
    """
    if impl == "anchor":
        return 2 * layers * kv_heads * head_dim * 4.0
    if impl == "transformers":
        return 2 * layers * kv_heads * (st["quanto"] * head_dim / 8 + 8)
    g = st.get("group_size", 64)
    if "plan" in st:
        plan = saved_plan(plans_dir, st)
        kb, vb = [b for row in plan.k_bits for b in row], [b for row in plan.v_bits for b in row]
    else:
        kb_, vb_ = st.get("kv_bits", (st.get("bits"), st.get("bits")))
        kb, vb = [kb_] * (layers * kv_heads), [vb_] * (layers * kv_heads)
    return float(sum(b * head_dim / 8 + 4 * head_dim / g for b in kb)
                 + sum(b * head_dim / 8 + 4 * head_dim / min(g, head_dim) for b in vb))


def calibration_texts(tok, eval_tokens: int, windows: int = 0, window: int = 2048) -> tuple[list, list, list]:
    """Token ids of the texts cut from the calibration topics (those after the evaluated ones), in order.

    ``(calibration, held_out, windows)``: the ``CALIBRATION_TOKENS`` plans are calibrated on,
    the ``VALIDATE_TOKENS`` that rank candidate plans, then ``windows`` unseen windows of
    ``window`` tokens that neither saw. ``eval_tokens``: the evaluated text's length, which
    decides where the calibration topics start.
    """
    from lmcache.commands.calibrate import pydoc_tokens

    skip = CALIBRATION_TOKENS + VALIDATE_TOKENS
    text = pydoc_tokens(tok, skip + windows * window, "calibrate", eval_tokens=eval_tokens)
    return (text[:CALIBRATION_TOKENS], text[CALIBRATION_TOKENS:skip],
            [text[skip + i * window:skip + (i + 1) * window] for i in range(windows)])


def slug(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def default_out() -> str:
    """bench/results/accuracy-cpu-<cpu model>.json (the model runs on the CPU)."""
    return os.path.join(ROOT, "bench", "results", f"accuracy-cpu-{slug(cpu_name())}.json")


def tensor_bytes(x) -> int:
    """Bytes of a tensor or of a tensor subclass (quanto's packed tensors), recursively."""
    import torch

    if x is None:
        return 0
    if hasattr(x, "__tensor_flatten__") and type(x) is not torch.Tensor:
        names, _ = x.__tensor_flatten__()
        return sum(tensor_bytes(getattr(x, n)) for n in names)
    if isinstance(x, torch.Tensor):
        return x.numel() * x.element_size()
    if isinstance(x, (tuple, list)):
        return sum(tensor_bytes(y) for y in x)
    return 0


def quanto_bytes(cache) -> int:
    """Bytes transformers' QuantizedCache holds: quantized states plus the full-precision residual."""
    total = 0
    for layer in cache.layers:
        total += tensor_bytes(layer._quantized_keys) + tensor_bytes(layer._quantized_values)
        total += tensor_bytes(layer.keys) + tensor_bytes(layer.values)
    return total


def evaluate(model, ids, cache, chunk: int, reference: list) -> tuple[float, float]:
    """``(perplexity, KL)`` of ``ids`` ``[1, n]`` fed ``chunk`` tokens at a time through ``cache``.

    Perplexity: exp(mean next-token NLL). KL: mean KL divergence (nats per token) of the
    next-token distributions from full precision's (``reference``: ``reference_logprobs`` of
    ``ids``). The perplexity change of one text moves by about +-0.1% with which tokens it
    holds (a 4-bit cache beats full precision on some windows); the KL does not.
    """
    from lmcache.commands.calibrate import kl_and_nll

    kl, nll = kl_and_nll(model, ids, cache, reference, chunk=chunk)
    return math.exp(nll), kl


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tokens", type=int, default=2048)
    ap.add_argument("--chunk", type=int, default=128)
    ap.add_argument("--rows", default="", help="comma-separated row names to run (default: all)")
    ap.add_argument("--out", default=None, help="JSON path (default bench/results/accuracy-cpu-<cpu>.json)")
    ap.add_argument("--plans-dir", default=os.path.join(ROOT, "bench", "results"),
                    help="where the calibrated plans are written")
    ap.add_argument("--replot", action="store_true",
                    help="recompute the derived columns, targets and plot of an existing JSON without running")
    ap.add_argument("--unseen-windows", type=int, default=0, metavar="N",
                    help="instead of the table: the same-bytes pairs (calibrated plan as saved by the last run, "
                         "uniform row) on N windows of --tokens tokens of text that neither the evaluation, the "
                         "calibration nor the held-out ranking saw; added to the existing JSON")
    args = ap.parse_args(argv)
    if args.replot:
        out = args.out or default_out()
        with open(out) as f:
            finish(json.load(f), out, args.plans_dir)
        return 0

    import torch

    from lmcache.calibrate import calibrate, element_cost, loss_weights, measure
    from lmcache.commands.calibrate import (
        kl_errors,
        layer_loss_increase,
        loss_gradients,
        plot_plan,
        pydoc_tokens,
        reference_logprobs,
    )
    from lmcache.integrations import hf

    torch.manual_seed(0)
    t0 = time.time()
    model, tok = hf.load_model(cache_dir=os.path.join(os.path.expanduser("~"), ".cache", "lmcache"))
    print(f"model loaded in {time.time() - t0:.1f}s", flush=True)
    if args.unseen_windows:
        return unseen_windows(model, tok, args)
    ids = torch.tensor([pydoc_tokens(tok, args.tokens, "eval", eval_tokens=args.tokens)])
    # val_ids: held out from both, the calibration topics after the calibration text, to rank candidate plans
    cal, val, _ = calibration_texts(tok, args.tokens)
    cal_ids, val_ids = torch.tensor([cal]), torch.tensor([val])
    cfg = model.config
    fp16 = torch.float16

    # One capture of the calibration text serves every calibrated row; errors are measured
    # once per cache setting and reused for every budget.
    state = {}

    def plan_for(avg_bits, weigh, max_moves=None, **kw):
        if "samples" not in state:
            state["samples"] = hf.capture(model, cal_ids, chunk_size=256)
        key = tuple(sorted(kw.items()))
        if key not in state:  # errors: measured once per cache setting, reused for every budget
            state[key] = measure(state["samples"], **dict(key))
        errors, weights = state[key], None
        if weigh == "fisher":
            if "grads" not in state:
                state["grads"] = loss_gradients(model, cal_ids)
            if ("fisher",) + key not in state:
                samples = [dict(s, grads=g) for s, g in zip(state["samples"], state["grads"])]
                state[("fisher",) + key] = measure(samples, **dict(key))
            errors = state[("fisher",) + key]
        elif weigh == "kl":
            if ("kl",) + key not in state:
                # one pass per (layer, head, K/V) and bit-width, each alone: 542, over LOSS_TOKENS tokens
                t = time.time()
                state[("kl",) + key] = kl_errors(model, cal_ids[:, :LOSS_TOKENS], chunk=args.chunk, kv_dtype=fp16,
                                                 **kw)
                print(f"  kl_errors: {time.time() - t:.0f}s", flush=True)
            errors = state[("kl",) + key]
        elif weigh == "loss":
            if ("loss",) + key not in state:
                # per layer and side: 61 passes, over the first LOSS_TOKENS tokens of the calibration text
                state[("loss",) + key] = layer_loss_increase(model, cal_ids[:, :LOSS_TOKENS], kv_dtype=fp16,
                                                             sides=True, **kw)
            weights = loss_weights(errors, state[("loss",) + key])
        return calibrate(None, avg_bits, errors=errors, weights=weights, max_moves=max_moves,
                         meta={"model": "SmolLM2-135M-Instruct", "text": "pydoc_data.topics calibration topics",
                               "weighting": weigh})

    def validated(avg_bits, **kw):
        """The candidate plan of least KL on held-out text (neither the calibration nor the evaluated one)."""
        cands = [(w, None) for w in ("none", "fisher", "loss", "kl")]
        if any(abs(element_cost(b, 64) - avg_bits) < 1e-9 for b in (2, 4, 8)):  # a uniform plan of these bytes
            cands += [(w, m) for w in ("none", "kl") for m in VALIDATE_MOVES]
        if "val_ref" not in state:
            state["val_ref"] = reference_logprobs(model, val_ids, chunk=args.chunk)
        tried = []
        for w, m in cands:
            plan = plan_for(avg_bits, w, m, **kw)
            ppl, kl = evaluate(model, val_ids, hf.HFCache(plan=plan, kv_dtype=fp16, **kw), args.chunk,
                               state["val_ref"])
            tried.append((kl, ppl, w, m, plan))
            print(f"  plan {avg_bits:g} weigh={w} max_moves={m}: held-out KL {1e3 * kl:.4f} mnats, "
                  f"perplexity {ppl:.4f}", flush=True)
        kl, ppl, w, m, plan = min(tried, key=lambda t: t[0])
        plan.meta.update(weighting=f"validated: {w}", validation={
            "text": f"pydoc_data.topics after the calibration text ({VALIDATE_TOKENS} tokens), chunks of {args.chunk}",
            "criterion": "least mean KL (nats per token) from full precision", "chosen": {"weigh": w, "max_moves": m},
            "tried": [{"weigh": t[2], "max_moves": t[3], "kl": t[0], "perplexity": t[1]} for t in tried]})
        return plan

    def calibrated(avg_bits, weigh=WEIGH, **kw):
        plan = validated(avg_bits, **kw) if weigh == "validated" else plan_for(avg_bits, weigh, **kw)
        base = plan_path(args.plans_dir, avg_bits, weigh, **kw)
        plan.save(base + ".json")
        plot_plan(plan, base + ".png")
        return hf.HFCache(plan=plan, kv_dtype=fp16, **kw)

    def quanto(nbits):
        from transformers import QuantizedCache

        return QuantizedCache(backend="quanto", config=cfg, nbits=nbits)

    def make(impl, st):
        if impl == "anchor":
            return __import__("transformers").DynamicCache()
        if impl == "transformers":
            return quanto(st["quanto"])
        if "plan" in st:
            return calibrated(st["plan"], st.get("weigh", WEIGH), **cache_kw(st))
        return lmcache_cache(st, cfg)

    rows = [(name, impl, (lambda impl=impl, st=st: make(impl, st))) for name, impl, st in ROWS]
    wanted = [r.strip() for r in args.rows.split(",") if r.strip()]
    if wanted:
        names = {slug(n): n for n, _, _ in rows}
        bad = [w for w in wanted if slug(w) not in names]
        if bad:
            print(f"unknown rows {bad}; rows are: {', '.join(slug(n) for n, _, _ in rows)}", file=sys.stderr)
            return 2
        keep = {names[slug(w)] for w in wanted} | {rows[0][0]}  # the anchor always runs
        rows = [r for r in rows if r[0] in keep]

    import transformers

    device = cpu_name()
    out = args.out or default_out()
    meta = {"benchmark": "accuracy", "device": device, "model": "SmolLM2-135M-Instruct (Q4_1 GGUF, float32 compute)",
            "text": "pydoc_data.topics, first topics in sorted key order", "tokens": ids.shape[1],
            "chunk": args.chunk, "calibration_text": "pydoc_data.topics, the topics after the evaluated ones (2048 "
                                                     "tokens)",
            "lmcache_settings": "group_size 64 unless 'g32', residual 128, float16 K/V and scales "
                                "(kv_dtype=float16); 'rotate': Hadamard on K and V; 'sinks': fp_sinks=4 (first "
                                "4 tokens kept in full precision), 'sinks1': fp_sinks=1; 'K4 V2': keys 4 bits, values "
                                "2 bits everywhere; 'plan B': lmcache.calibrate at avg_bits=B per element, float16 "
                                "scales included (uniform 2-bit = 2.5, 4-bit = 4.5 at groups of 64, i.e. B - 0.5 "
                                "code bits), the candidate of least KL to full precision on held-out text (the "
                                f"{VALIDATE_TOKENS} calibration-topic tokens after the calibration text) among "
                                "the weightings below and, at 4.5, plans at most "
                                f"{', '.join(map(str, VALIDATE_MOVES))} entries away from uniform 4 bits "
                                "(lmcache.calibrate max_moves); 'fisher': attention-output error weighted by the "
                                "squared loss gradient there (diagonal Fisher, "
                                "lmcache.commands.calibrate.loss_gradients on the calibration text); 'unweighted': "
                                "the layer-normalized attention-output error; 'loss': weighted by the measured loss "
                                "increase per layer and side (lmcache.calibrate.loss_weights); 'kl': each (layer, "
                                "head, K/V) entry's KL measured on the model with that entry alone quantized, the "
                                f"others in full precision ({LOSS_TOKENS} calibration tokens, "
                                "lmcache.commands.calibrate.kl_errors)",
            "kl": "mean KL divergence (nats per token) of each row's next-token distributions from the anchor's",
            "quanto_settings": "QuantizedCache(backend='quanto'), q_group_size 64, residual_length 128, "
                               "float32 states (the model's dtype)",
            "torch": torch.__version__, "transformers": transformers.__version__, "python": platform.python_version(),
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}

    def write(results):
        with open(out, "w") as f:
            json.dump({"meta": meta, "rows": results}, f, indent=1)

    results = []
    reference = reference_logprobs(model, ids, chunk=args.chunk)
    print(f"{'cache':44s} {'ppl':>9s} {'vs fp':>9s} {'KL mnat':>8s} {'B/token held':>12s} {'B/token long':>12s} "
          f"{'s':>6s}", flush=True)
    for name, impl, factory in rows:
        t = time.time()
        try:
            cache = factory()
            ppl, kl = evaluate(model, ids, cache, args.chunk, reference)
        except Exception as e:  # a row that fails is reported, the others still run
            print(f"{name:44s} failed: {type(e).__name__}: {e}", flush=True)
            results.append({"name": name, "impl": impl, "error": f"{type(e).__name__}: {e}"})
            write(results)
            continue
        if isinstance(cache, hf.HFCache):
            nbytes = cache.nbytes
        elif impl == "transformers":
            nbytes = quanto_bytes(cache)
        else:
            nbytes = sum(tensor_bytes(ly.keys) + tensor_bytes(ly.values) for ly in cache.layers)
        row = {"name": name, "impl": impl, "perplexity": ppl, "kl": kl, "bytes_per_token": nbytes / ids.shape[1],
               "seconds": round(time.time() - t, 1)}
        results.append(row)
        derive(results, args.plans_dir)
        print(f"{name:44s} {ppl:9.4f} {row['delta_pct']:+8.2f}% {1e3 * kl:8.3f} {row['bytes_per_token']:12.0f} "
              f"{row['steady_bytes_per_token']:12.0f} {row['seconds']:6.0f}", flush=True)
        write(results)
        plot([r for r in results if "perplexity" in r], os.path.splitext(out)[0] + ".png", "partial run")

    finish({"meta": meta, "rows": results}, out, args.plans_dir)
    return 0


def lmcache_cache(st: dict, config, plan=None):
    """The ``HFCache`` of an lmcache row's settings ``st``: ``plan`` (a calibrated row's), else
    keys/values bits everywhere (``kv_bits``), else uniform ``bits``; float16 K/V and scales."""
    import torch

    from lmcache.integrations import hf
    from lmcache.plan import QuantPlan

    if plan is None and "kv_bits" in st:
        kb, vb = st["kv_bits"]
        n_l, n_h = config.num_hidden_layers, config.num_key_value_heads
        plan = QuantPlan([[kb] * n_h for _ in range(n_l)], [[vb] * n_h for _ in range(n_l)])
    if plan is not None:
        return hf.HFCache(plan=plan, kv_dtype=torch.float16, **cache_kw(st))
    return hf.HFCache(bits=st["bits"], kv_dtype=torch.float16, **cache_kw(st))


def unseen_windows(model, tok, args) -> int:
    """The SAME_BYTES pairs on ``args.unseen_windows`` windows of unseen text, into the existing JSON.

    The windows follow the held-out ranking text in the calibration topics, so no plan was chosen
    on them; calibrated rows load the plans the last full run saved. Perplexity over 2048 tokens
    moves by tenths of a percent from one window to the next (even below full precision), more
    than the pairs differ: the geometric mean over the windows is the steadier comparison.
    """
    import torch
    import transformers

    from lmcache.commands.calibrate import reference_logprobs

    out = args.out or default_out()
    with open(out) as f:
        doc = json.load(f)
    n, w = args.unseen_windows, args.tokens
    wins = calibration_texts(tok, args.tokens, n, w)[2]
    settings = {name: st for name, _, st in ROWS}
    makers = {"full precision (DynamicCache fp32)": transformers.DynamicCache}
    for pair in SAME_BYTES:
        for name in pair:
            st = settings[name]
            plan = saved_plan(args.plans_dir, st) if "plan" in st else None
            makers[name] = lambda st=st, plan=plan: lmcache_cache(st, model.config, plan)
    ppl, kls = {name: [] for name in makers}, {name: [] for name in makers}
    for i in range(n):
        ids = torch.tensor([wins[i]])
        ref = reference_logprobs(model, ids, chunk=args.chunk)
        for name, make in makers.items():
            p, kl = evaluate(model, ids, make(), args.chunk, ref)
            ppl[name].append(p)
            kls[name].append(kl)
        fp = ppl["full precision (DynamicCache fp32)"][-1]
        print(f"window {i}: " + ", ".join(f"{k} {100 * (v[-1] / fp - 1):+.3f}% KL {1e3 * kls[k][-1]:.3f}"
                                          for k, v in ppl.items()), flush=True)

    def geo(v):
        return math.exp(sum(math.log(x) for x in v) / len(v))

    fp = geo(ppl["full precision (DynamicCache fp32)"])
    change = {k: 100 * (geo(v) / fp - 1) for k, v in ppl.items()}
    doc["unseen_windows"] = {
        "text": f"pydoc_data.topics, {n} windows of {w} tokens after the calibration and held-out texts, chunks of "
                f"{args.chunk}", "perplexity": ppl, "kl": kls, "geo_mean_change_pct": change,
        "mean_kl": {k: sum(v) / len(v) for k, v in kls.items()},
        "calibrated beats uniform at the same bytes": {f"{p} vs {u}": change[p] < change[u] for p, u in SAME_BYTES},
        "calibrated beats uniform at the same bytes, windows won (perplexity, KL)": {
            f"{p} vs {u}": [sum(a < b for a, b in zip(ppl[p], ppl[u])), sum(a < b for a, b in zip(kls[p], kls[u]))]
            for p, u in SAME_BYTES},
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    with open(out, "w") as f:
        json.dump(doc, f, indent=1)
    print(json.dumps({k: v for k, v in doc["unseen_windows"].items() if k not in ("perplexity", "kl")}, indent=1))
    return 0


def derive(results: list, plans_dir: str) -> None:
    """Fill the columns computed from the measured ones: change against the anchor, steady-state bytes."""
    settings = {name: (impl, st) for name, impl, st in ROWS}
    if "perplexity" not in results[0]:
        return  # the anchor failed: nothing to compare against
    anchor = results[0]["perplexity"]
    for r in results:
        if "perplexity" not in r:
            continue
        r["delta_pct"] = 100.0 * (r["perplexity"] / anchor - 1)
        if r["name"] in settings:
            r["steady_bytes_per_token"] = steady_bytes(*settings[r["name"]], plans_dir)


def targets(rows: list) -> dict:
    """The issue's targets, each with the rows it compares and whether it holds.

    Bytes are the steady-state KV bytes per token (codes and scales of a long context).
    "Beats the QuantizedCache row of equal or larger bytes" is checked two ways: against
    the nearest such row (the cheapest quanto row holding at least as many bytes) and
    against every such row.
    """
    by = {r["name"]: r for r in rows if "perplexity" in r}
    out = {}
    for bits, limit in ((4, 0.5), (2, 10.0)):
        cand = {n: r for n, r in by.items() if n.startswith(f"lmcache {bits}-bit")}
        if cand:
            best = min(cand.values(), key=lambda r: r["perplexity"])
            out[f"uniform {bits}-bit within {limit:g}%"] = {
                "holds": best["delta_pct"] <= limit, "best": best["name"], "delta_pct": best["delta_pct"],
                "rows": {n: {"delta_pct": r["delta_pct"], "steady_bytes_per_token": r.get("steady_bytes_per_token")}
                         for n, r in cand.items()}}
    out["calibrated beats uniform at the same bytes"] = {
        f"{p} vs {u}": {"holds": by[p]["perplexity"] < by[u]["perplexity"], "delta_pct": [by[p]["delta_pct"],
                                                                                          by[u]["delta_pct"]],
                        "steady_bytes_per_token": [by[p].get("steady_bytes_per_token"),
                                                   by[u].get("steady_bytes_per_token")]}
        for p, u in SAME_BYTES if p in by and u in by}
    out["calibrated beats uniform at the same bytes, by KL to full precision"] = {
        f"{p} vs {u}": {"holds": by[p]["kl"] < by[u]["kl"], "kl": [by[p]["kl"], by[u]["kl"]]}
        for p, u in SAME_BYTES if p in by and u in by and "kl" in by[p] and "kl" in by[u]}
    quanto = sorted((r for r in by.values() if r["impl"] == "transformers"), key=lambda r: r["steady_bytes_per_token"])
    for suffix, names in (("", set(by) - ABLATIONS), (", weighting ablations included", set(by))):
        nearest, every = {}, {}
        for r in (by[n] for n in by if n in names and by[n]["impl"] == "lmcache"):
            above = [q for q in quanto if q["steady_bytes_per_token"] >= r["steady_bytes_per_token"]]
            if above:
                nearest[f"{r['name']} vs {above[0]['name']}"] = r["perplexity"] < above[0]["perplexity"]
            for q in above:
                every[f"{r['name']} vs {q['name']}"] = r["perplexity"] < q["perplexity"]
        out["lmcache beats the nearest QuantizedCache row of equal or larger bytes" + suffix] = nearest
        out["lmcache beats every QuantizedCache row of equal or larger bytes" + suffix] = every
    return out


def finish(doc: dict, out: str, plans_dir: str) -> None:
    """Derived columns, target checks, JSON and plot, from the measured rows."""
    derive(doc["rows"], plans_dir)
    doc["targets"] = targets(doc["rows"])
    with open(out, "w") as f:
        json.dump(doc, f, indent=1)
    rows = [r for r in doc["rows"] if "perplexity" in r]
    png = os.path.splitext(out)[0] + ".png"
    m = doc["meta"]
    plot(rows, png, f"SmolLM2-135M, {m['tokens']} tokens of pydoc_data.topics, chunks of {m['chunk']} "
                    f"({m['device']})")
    print(f"{'cache':44s} {'ppl':>9s} {'vs fp':>9s} {'KL mnat':>8s} {'B/token held':>12s} {'B/token long':>12s}")
    for r in rows:
        print(f"{r['name']:44s} {r['perplexity']:9.4f} {r['delta_pct']:+8.2f}% {1e3 * r.get('kl', math.nan):8.3f} "
              f"{r['bytes_per_token']:12.0f} "
              f"{r.get('steady_bytes_per_token', float('nan')):12.0f}")
    print(json.dumps(doc["targets"], indent=1))
    print(f"wrote {out} and {png}")


def plot(results: list, path: str, title: str) -> None:
    """Perplexity change and KL against KV bytes per token in a long context, one labelled point per row.

    Log scales (symmetric-log for the perplexity change, which can be below zero) keep rows
    from +0.01% to +1000% apart; labels are spread vertically so rows of equal bytes stay
    readable, each joined to its point. The weighting ablations are drawn unlabelled.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in results if "steady_bytes_per_token" in r]
    fig, axes = plt.subplots(1, 2, figsize=(15, 7))
    panels = ((axes[0], "perplexity change against full precision (%)", lambda r: r["delta_pct"], "{:+.2f}%"),
              (axes[1], "KL to full precision (millinats per token)", lambda r: 1e3 * r["kl"] if "kl" in r else None,
               "{:.2f} mnat"))
    for ax, ylabel, value, fmt in panels:
        pts = []
        for r in rows:
            y = value(r)
            if y is None or (ax is axes[1] and y <= 0):
                continue  # the anchor has KL 0: nothing to draw on a log scale
            colour = "#4575b4" if r["impl"] == "lmcache" else "#d7301f"
            if r["name"] in ABLATIONS:
                ax.scatter(r["steady_bytes_per_token"], y, facecolors="none", edgecolors=colour, marker="s", s=18,
                           alpha=0.6)
                continue
            ax.scatter(r["steady_bytes_per_token"], y, c=colour, marker="s" if "plan" in r["name"] else "o", s=32)
            label = r["name"].replace("transformers QuantizedCache ", "HF ").replace("lmcache ", "")
            pts.append((r["steady_bytes_per_token"], y, f"{label}  {fmt.format(y)}"))
        if ax is axes[0]:
            ax.set_yscale("symlog", linthresh=0.1)
            ax.axhline(0, color="grey", lw=0.7, ls="--")
        else:
            ax.set_yscale("log")
        ax.set_xscale("log")
        ax.set_xlim(3000, 70000)
        ax.set_xlabel("KV bytes per token in a long context (codes + scales)", fontsize=8)
        ax.set_ylabel(ylabel, fontsize=8)
        ax.grid(alpha=0.3, which="both")
        _spread_labels(fig, ax, pts)
    fig.suptitle(title + "\nblue: lmcache (squares: calibrated plans; hollow: weighting ablations), red: "
                         "transformers", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _spread_labels(fig, ax, pts: list, gap_pt: float = 9.0) -> None:
    """Annotate ``pts`` (x, y, text) right of their points, pushed apart vertically by ``gap_pt`` points."""
    if not pts:
        return
    fig.canvas.draw()  # the axes' final limits and scales, so data maps to display points
    to_pt = 72.0 / fig.dpi
    disp = [ax.transData.transform((x, y)) * to_pt for x, y, _ in pts]
    order = sorted(range(len(pts)), key=lambda i: disp[i][1])
    ys = [disp[i][1] for i in order]
    for k in range(1, len(ys)):
        ys[k] = max(ys[k], ys[k - 1] + gap_pt)
    # centre the stack on the points it came from, so it does not drift off the top
    shift = (sum(disp[i][1] for i in order) - sum(ys)) / len(ys)
    for k, i in enumerate(order):
        x, y, text = pts[i]
        ax.annotate(text, (x, y), xytext=(14, ys[k] + shift - disp[i][1]), textcoords="offset points", fontsize=6.5,
                    va="center", arrowprops={"arrowstyle": "-", "lw": 0.4, "color": "grey"})


if __name__ == "__main__":
    sys.exit(main())
