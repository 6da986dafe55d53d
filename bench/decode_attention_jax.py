"""Pallas decode attention over 4-bit KV vs jax.nn.dot_product_attention over float16 KV.

The torch benchmark's shapes (bench/decode_attention.py): Llama-2-13B attention, 40 query
heads = 40 KV heads of head_dim 128, one new query token, batch 1 and 16 at 4K and 32K tokens
and batch 1 at 128K. The compressed cache is laid out as ``lmcache.Cache`` keeps it: the oldest
tokens in one 4-bit block (keys per channel over 64 tokens, values per token over 64
channels), the newest 128 in float16; one jitted step runs the Pallas kernel over the block,
attention over the residual and the log-sum-exp merge. The baseline gets its own layout
([batch, tokens, heads, head_dim]) and the faster of its XLA and cuDNN implementations.
Times are medians of wall-clock loops of asynchronously dispatched calls ending in
``block_until_ready``, after warm-up; small problems rotate over copies of their inputs
so that repeated calls do not run from the 60 MB L2 cache.

The Pallas kernels are timed on the same cache: ``decode_attention`` (codes to float32, FMAs),
and the integer ones (codes on the matrix units): ``decode_lanes`` (4-bit, lane-explicit; setting
``kernel=lanes``) and ``decode_int8`` (int8 dots). Each family has its own launch sweep on the
first shape and a few slice counts on every shape; the integer family's best is the ``i8_*``
entries (``i8_config`` names the kernel). The batch-16 / 32K shape is also run with 8-bit K and
V (``decode_attention`` and ``decode_int8``, their best 4-bit settings).

    python bench/decode_attention_jax.py          # on a GPU
    python bench/decode_attention_jax.py --smoke  # tiny shapes on CPU, kernels interpreted

Prints a table and writes bench/results/decode_attention_jax-<card>.json (or under --out).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time

import jax
import jax.numpy as jnp

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from lmcache.backends.jax import ops  # noqa: E402
from lmcache.backends.jax.pallas import decode_attention as kda  # noqa: E402
from lmcache.backends.jax.pallas import decode_int8 as ki8  # noqa: E402
from lmcache.backends.jax.pallas import decode_lanes as klanes  # noqa: E402
from lmcache.backends.jax.pallas import quantize as kq  # noqa: E402

HEADS, HEAD_DIM, GROUP, RESIDUAL, BITS = 40, 128, 64, 128, 4
SHAPES = [(16, 32768), (16, 4096), (1, 4096), (1, 32768), (1, 131072)]
L2_ROTATE_BYTES = 256 << 20  # inputs smaller than this are rotated over copies
INTERPRET = False
SKIP_IMPL: set[str] = set()
ERRORS: dict[str, str] = {}


def timed(fn, inputs, target_ms: float = 25.0, reps: int = 5) -> float:
    """Median milliseconds per call of ``fn(*inputs[i % len(inputs)])``."""
    out = None
    for i in range(3):
        out = fn(*inputs[i % len(inputs)])
    jax.block_until_ready(out)
    t0 = time.perf_counter()
    jax.block_until_ready(fn(*inputs[0]))
    one = max((time.perf_counter() - t0) * 1e3, 1e-3)
    n = max(1, min(200, int(target_ms / one)))
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        for i in range(n):
            out = fn(*inputs[i % len(inputs)])
        jax.block_until_ready(out)
        times.append((time.perf_counter() - t0) * 1e3 / n)
    return statistics.median(times)


def nbytes(*xs) -> int:
    return sum(int(x.size) * x.dtype.itemsize for x in xs)


def copy_bandwidth() -> float:
    """Bytes read + written per second by a jitted elementwise pass over a 2 GiB float16 array."""
    x = jax.random.normal(jax.random.key(1), ((1 << 30) if not INTERPRET else 1 << 12,), jnp.float16)
    f = jax.jit(lambda x: x + x)
    ms = timed(f, [(x,)])
    return 2 * nbytes(x) / (ms * 1e-3)


def quantize(x, group, axis, bits=BITS):
    """The Pallas kernel; the jnp path if the kernel fails to build (recorded in ERRORS)."""
    if not INTERPRET and "quantize" not in ERRORS:
        try:
            return jax.block_until_ready(kq.quantize(x, bits, group, axis))
        except Exception as e:
            ERRORS["quantize"] = f"{type(e).__name__}: {str(e)[:300]}"
            print(f"  quantize kernel failed, using the jnp path: {ERRORS['quantize']}", flush=True)
    return kq.quantize_reference(x, bits, group, axis)


def make_inputs(batch: int, ctx: int, key, bits: int = BITS, baseline: bool = True):
    """(q, the compressed cache in our layout, fp16 K/V in the baseline's layout or None)."""
    kk, kv, kqk = jax.random.split(key, 3)
    shape = (batch, HEADS, ctx, HEAD_DIM)
    k = jax.random.normal(kk, shape, jnp.float16)
    v = jax.random.normal(kv, shape, jnp.float16)
    q = jax.random.normal(kqk, (batch, HEADS, HEAD_DIM), jnp.float16)
    t = ctx - RESIDUAL
    kqt = quantize(k[:, :, :t], GROUP, -2, bits)
    vqt = quantize(v[:, :, :t], min(GROUP, HEAD_DIM), -1, bits)
    cache = (*kqt, *vqt, k[:, :, t:], v[:, :, t:])
    base = (k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)) if baseline else None  # [B, T, N, H]
    jax.block_until_ready((cache, base))
    return q, cache, base


def compressed_step(scale: float, cfg: dict, kernel=kda, bits: int = BITS):
    """One jitted decode step over (quantized block + float16 residual), as JaxBackend.attend does it.

    ``kernel``: the module whose ``decode_attention`` runs the quantized block (``kda``, ``ki8``);
    ``cfg["kernel"] == "lanes"`` picks ``decode_lanes`` instead (the int8 sweep's first setting).
    """
    cfg = dict(cfg)
    if cfg.pop("kernel", None) == "lanes":
        kernel = klanes

    @jax.jit
    def step(q, kc, ks, kl, vc, vs, vl, kr, vr):
        part = kernel.decode_attention(q, kc, ks, kl, vc, vs, vl, k_bits=bits, v_bits=bits, scale=scale,
                                       interpret=INTERPRET, **cfg)
        o, lse = ops.masked_attention_lse(q[:, :, None], kr, vr, scale, kr.shape[2], offset=None)
        return ops.combine([part, (o[:, :, 0], lse[:, :, 0])]).astype(q.dtype)

    return step


def baseline_step(scale: float, impl: str):
    @jax.jit
    def step(q, k, v):
        return jax.nn.dot_product_attention(q[:, None], k, v, scale=scale, implementation=impl)[:, 0]

    return step


def copies(nb: int) -> int:
    return 1 if INTERPRET else max(1, min(8, math.ceil(L2_ROTATE_BYTES / max(nb, 1))))


def rel_err(out, ref) -> float:
    out, ref = out.astype(jnp.float32), ref.astype(jnp.float32)
    return float(jnp.linalg.norm(out - ref) / jnp.linalg.norm(ref))


def check(q, cache, scale, kernel=kda, cfg=None) -> float:
    """Relative error of the compressed step against float32 attention over the dequantized cache."""
    kc, ks, kl, vc, vs, vl, kr, vr = cache
    k = jnp.concatenate([ops.dequantize(kc, ks, kl, BITS, -2, jnp.float32), kr.astype(jnp.float32)], 2)
    v = jnp.concatenate([ops.dequantize(vc, vs, vl, BITS, -1, jnp.float32), vr.astype(jnp.float32)], 2)
    ref = ops.attention(q[:, :, None].astype(jnp.float32), k, v, scale)[:, :, 0]
    return rel_err(compressed_step(scale, cfg or {}, kernel)(q, *cache), ref)


def split_choices(batch: int, ctx: int, gps: int, n: int, base: int | None = None) -> list[int]:
    """The ``n`` slice counts nearest (in ratio) to ``base`` (default: the float kernel's default)
    that divide the loop steps (``gps``: key groups per loop step, or per unit of ``max(tile,
    group)`` for the int8 kernel)."""
    groups = (ctx - RESIDUAL) // GROUP
    steps = groups // gps
    base = base or kda.choose_splits(batch, HEADS, groups, gps)
    divisors = [s for s in range(1, steps + 1) if steps % s == 0]
    return sorted(divisors, key=lambda s: (abs(math.log(s / base)), s))[:n]


def sweep_configs(batch: int, ctx: int) -> list[dict]:
    """Launch settings to try on the first (largest) shape, at the default slice count, likeliest first."""
    groups = (ctx - RESIDUAL) // GROUP
    cfgs = [{}, dict(words=True), dict(num_warps=4), dict(num_warps=4, words=True),
            dict(num_warps=16), dict(num_warps=16, words=True)]
    if groups % 2 == 0:
        cfgs += [dict(groups_per_step=2), dict(num_warps=4, groups_per_step=2, words=True)]
    cfgs += [dict(prefetch=False), dict(num_warps=4, prefetch=False), dict(prescale=False),
             dict(prescale=False, words=True), dict(num_warps=4, prescale=False)]
    return cfgs


def i8_sweep_configs() -> list[dict]:
    """The integer kernels' settings, likeliest first: ``decode_lanes`` (4-bit; 0.92 ms at batch 16
    / 32K on the H200, 17 slices), then the int8 kernel's (the default: 4-bit dots of 32 tokens in
    64-token steps, the codes' bit operations as inline PTX; on the H200 at batch 16 / 32K, 17
    slices: 1.203 ms, 64-token dots 1.309, 128-token tiles 1.216, without the PTX 1.455; earlier
    settings: two warps, the pre-pass and 32-token tiles were slower, four warps much slower)."""
    if INTERPRET:  # every setting is a compilation of the interpreter: two are enough to smoke-test
        return [{}, dict(tile=128, key_operands="prepass")]
    return [dict(kernel="lanes"), {}, dict(tile=128, dot_tokens=64), dict(dot_tokens=64),
            dict(key_operands="prepass")]


def i8_units(cfg: dict) -> int:
    """Key groups per unit the int8 kernel's splits must divide: ``max(tile, group) // group``."""
    return max(cfg.get("tile", ki8.default_tile(GROUP)), GROUP) // GROUP


def sweep(run_cfg, cfgs, trials, deadline):
    """Time ``run_cfg(cfg)`` for each of ``cfgs`` into ``trials`` until ``deadline`` (at least one ran)."""
    for cfg in cfgs:
        if time.time() > deadline and any("ms" in t for t in trials):
            return
        try:
            ms = run_cfg(cfg)
            trials.append({"config": cfg, "ms": ms})
            print(f"    {cfg}: {ms:.3f} ms", flush=True)
        except Exception as e:  # a setting that does not compile is recorded and skipped
            trials.append({"config": cfg, "error": f"{type(e).__name__}: {str(e)[:300]}"})
            print(f"    {cfg}: {type(e).__name__}: {str(e)[:300]}", flush=True)


def bench_shape(batch, ctx, scale, key, best_cfg, deadline, best_i8=None, deadline_i8=None):
    q, cache, (bk, bv) = make_inputs(batch, ctx, key)
    row = {"batch": batch, "context": ctx}
    nb_base = nbytes(q, bk, bv)
    nb_ours = nbytes(q, *cache)
    if INTERPRET:  # XLA on the CPU has no float16 dot with float32 accumulation
        q, bk, bv = q.astype(jnp.float32), bk.astype(jnp.float32), bv.astype(jnp.float32)
    base_in = [(q, bk, bv)] + [tuple(jnp.copy(a) for a in (q, bk, bv)) for _ in range(copies(nb_base) - 1)]
    for impl in ("xla", "cudnn"):
        if impl in SKIP_IMPL:
            continue
        try:
            row[f"dpa_{impl}_ms"] = timed(baseline_step(scale, impl), base_in)
        except Exception as e:  # cuDNN may not take a 1-token query or this dtype: recorded, skipped
            row[f"dpa_{impl}_ms"] = None
            row[f"dpa_{impl}_error"] = f"{type(e).__name__}: {str(e)[:160]}"
            SKIP_IMPL.add(impl)  # not retried at the other shapes
    del base_in, bk, bv
    q = q.astype(jnp.float16)
    timed_ok = [v for k, v in row.items() if k.startswith("dpa_") and k.endswith("_ms") and v is not None]
    if not timed_ok:
        raise RuntimeError(f"no baseline ran: {row}")
    base_ms = min(timed_ok)
    row["baseline_ms"] = base_ms
    row["baseline_bytes"] = nb_base
    row["baseline_TBps"] = nb_base / (base_ms * 1e-3) / 1e12
    ours_in = [(q, *cache)] + [tuple(jnp.copy(a) for a in (q, *cache)) for _ in range(copies(nb_ours) - 1)]
    trials = []

    def run(cfgs):
        sweep(lambda cfg: timed(compressed_step(scale, cfg), ours_in), cfgs, trials, deadline)

    # First the launch settings (on the first shape), then slice counts around the default.
    run(sweep_configs(batch, ctx) if best_cfg is None else [best_cfg])
    good = [t for t in trials if "ms" in t]
    if not good:
        raise RuntimeError(f"no kernel setting ran: {trials}")
    best = min(good, key=lambda t: t["ms"])
    rest = {k: v for k, v in best["config"].items() if k != "splits"}
    run([dict(rest, splits=s) for s in split_choices(batch, ctx, rest.get("groups_per_step", 1),
                                                    4 if best_cfg is None else 3)[1:]])
    best = min((t for t in trials if "ms" in t), key=lambda t: t["ms"])
    row.update(q4_ms=best["ms"], q4_config=best["config"], q4_bytes=nb_ours,
               q4_TBps=nb_ours / (best["ms"] * 1e-3) / 1e12, speedup=base_ms / best["ms"], trials=trials)
    row["q4_rel_err_vs_dequant_fp32"] = check(q, cache, scale) if batch * ctx <= 32768 else None

    # The integer kernels (decode_lanes first, then decode_int8) on the same cache: their settings, then slices.
    print("  integer kernels (decode_lanes, decode_int8):", flush=True)
    i8_trials = []
    run_i8 = lambda cfg: timed(compressed_step(scale, cfg, ki8), ours_in)
    sweep(run_i8, i8_sweep_configs() if best_i8 is None else [best_i8], i8_trials, deadline_i8 or deadline)
    good = [t for t in i8_trials if "ms" in t]
    if good:
        rest = {k: v for k, v in min(good, key=lambda t: t["ms"])["config"].items() if k != "splits"}
        units = i8_units(rest)
        own = ki8.default_splits(batch, HEADS, ctx - RESIDUAL, GROUP, units * GROUP)
        tried = {t["config"].get("splits", own) for t in i8_trials
                 if {k: v for k, v in t["config"].items() if k != "splits"} == rest}
        sweep(run_i8, [dict(rest, splits=s) for s in split_choices(batch, ctx, units, 4, own) if s not in tried][:2],
              i8_trials, deadline_i8 or deadline)
        top = min((t for t in i8_trials if "ms" in t), key=lambda t: t["ms"])
        row.update(i8_ms=top["ms"], i8_config=top["config"], i8_TBps=nb_ours / (top["ms"] * 1e-3) / 1e12,
                   i8_speedup=base_ms / top["ms"], i8_vs_q4=best["ms"] / top["ms"])
        row["i8_rel_err_vs_dequant_fp32"] = (check(q, cache, scale, ki8, top["config"])
                                             if batch * ctx <= 32768 else None)
    row["i8_trials"] = i8_trials
    return row, best["config"]


def bench_8bit(batch, ctx, scale, key, base_ms, cfg_q, cfg_i8) -> dict:
    """Both kernels over an 8-bit cache (keys and values), at their best 4-bit settings (no splits)."""
    q, cache, _ = make_inputs(batch, ctx, key, bits=8, baseline=False)
    nb = nbytes(q, *cache)
    ours_in = [(q, *cache)] + [tuple(jnp.copy(a) for a in (q, *cache)) for _ in range(copies(nb) - 1)]
    out = {"batch": batch, "context": ctx, "bits": 8, "bytes": nb, "baseline_ms": base_ms}
    for name, kernel, cfg in (("q8", kda, cfg_q), ("i8", ki8, cfg_i8)):
        cfg = {k: v for k, v in (cfg or {}).items() if k not in ("splits", "kernel")}  # lanes: 4-bit only
        try:
            ms = timed(compressed_step(scale, cfg, kernel, bits=8), ours_in)
            out.update({f"{name}_ms": ms, f"{name}_config": cfg, f"{name}_speedup": base_ms / ms})
            print(f"    8-bit {name} {cfg}: {ms:.3f} ms ({base_ms / ms:.2f}x)", flush=True)
        except Exception as e:
            out[f"{name}_error"] = f"{type(e).__name__}: {str(e)[:300]}"
            print(f"    8-bit {name}: {out[f'{name}_error']}", flush=True)
    return out


def bench_quantize() -> dict:
    """Quantize + pack one layer's K and V of a 32K-token prefill (batch 1), 4 bits, with the kernels."""
    t = 32768 if not INTERPRET else 128
    k = jax.random.normal(jax.random.key(3), (1, HEADS, t, HEAD_DIM), jnp.float16)
    v = jax.random.normal(jax.random.key(4), (1, HEADS, t, HEAD_DIM), jnp.float16)
    quant = kq.quantize if not (INTERPRET or ERRORS) else kq.quantize_reference
    f = jax.jit(lambda k, v: (quant(k, BITS, GROUP, -2), quant(v, BITS, GROUP, -1)))
    ms = timed(f, [(k, v)])
    moved = nbytes(k, v, *jax.tree_util.tree_leaves(f(k, v)))
    return {"ms": ms, "bytes": moved, "GBps": moved / (ms * 1e-3) / 1e9}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results"))
    ap.add_argument("--budget", type=float, default=160.0, help="seconds: later sweeps are cut short past it")
    ap.add_argument("--smoke", action="store_true", help="tiny shapes on CPU with the kernels interpreted")
    args = ap.parse_args()
    global HEADS, SHAPES, RESIDUAL, INTERPRET
    t_start = time.time()
    if args.smoke:
        HEADS, SHAPES, RESIDUAL, INTERPRET = 2, [(2, 384), (1, 256)], 128, True
    elif jax.default_backend() != "gpu":
        sys.exit("this benchmark needs a GPU (or --smoke)")
    dev = jax.devices()[0]
    card = dev.device_kind if not args.smoke else "smoke-cpu"
    scale = 1 / math.sqrt(HEAD_DIM)
    result = {"benchmark": "decode_attention_jax", "card": card, "jax": jax.__version__,
              "shape": {"q_heads": HEADS, "kv_heads": HEADS, "head_dim": HEAD_DIM, "bits": BITS, "group": GROUP,
                        "residual": RESIDUAL, "dtype": "float16"},
              "date": time.strftime("%Y-%m-%d", time.gmtime())}
    name = "decode_attention_jax-" + "".join(c if c.isalnum() else "-" for c in card.lower()).strip("-")
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, name + ".json")

    def save():
        with open(path, "w") as f:
            json.dump(result, f, indent=1)

    bw = copy_bandwidth()
    result["copy_TBps"] = bw / 1e12
    print(f"{card}: elementwise copy {bw / 1e12:.2f} TB/s (read + write)", flush=True)
    result["rows"] = []
    best = best_i8 = None
    key = jax.random.key(0)
    for i, (batch, ctx) in enumerate(SHAPES):
        left = len(SHAPES) - i
        # The first shape's sweeps (float kernel, then int8) end by 55% and 80% of the budget.
        deadline = t_start + args.budget * (0.55 if i == 0 else 1.0) - 8 * (left - 1)
        deadline_i8 = t_start + args.budget * (0.8 if i == 0 else 1.0) - 8 * (left - 1) + 4
        print(f"batch {batch}, context {ctx}:", flush=True)
        row, cfg = bench_shape(batch, ctx, scale, jax.random.fold_in(key, i), best, deadline, best_i8, deadline_i8)
        best = best or {k: v for k, v in cfg.items() if k != "splits"}
        if best_i8 is None and "i8_config" in row:
            best_i8 = {k: v for k, v in row["i8_config"].items() if k != "splits"}
        result["rows"].append(row)
        save()
        i8 = (f", int8 {row['i8_ms']:.3f} ms ({row['i8_TBps']:.2f} TB/s): {row['i8_speedup']:.2f}x"
              if "i8_ms" in row else ", integer kernels: no setting ran")
        print(f"  dot_product_attention fp16 {row['baseline_ms']:.3f} ms ({row['baseline_TBps']:.2f} TB/s), "
              f"pallas 4-bit {row['q4_ms']:.3f} ms ({row['q4_TBps']:.2f} TB/s): {row['speedup']:.2f}x{i8}", flush=True)
        if i == 0:
            print("  8-bit K and V:", flush=True)
            result["rows_8bit"] = [bench_8bit(batch, ctx, scale, jax.random.fold_in(key, i), row["baseline_ms"],
                                              best, best_i8)]
            save()
    try:
        result["quantize_4bit_32k"] = bench_quantize()
    except Exception as e:
        result["quantize_4bit_32k"] = {"error": f"{type(e).__name__}: {str(e)[:200]}"}
    result["errors"] = ERRORS
    result["seconds"] = time.time() - t_start
    save()
    print(f"\n{card}, jax {jax.__version__}, copy {bw / 1e12:.2f} TB/s")
    print(f"{'batch':>5} {'context':>8} {'fp16 dpa ms':>12} {'4-bit ms':>9} {'speedup':>8} {'TB/s':>6} "
          f"{'int8 ms':>8} {'speedup':>8}  config / int8 config")
    for r in result["rows"]:
        i8 = (f"{r['i8_ms']:>8.3f} {r['i8_speedup']:>7.2f}x" if "i8_ms" in r else f"{'-':>8} {'-':>8}")
        print(f"{r['batch']:>5} {r['context']:>8} {r['baseline_ms']:>12.3f} {r['q4_ms']:>9.3f} {r['speedup']:>7.2f}x "
              f"{r['q4_TBps']:>6.2f} {i8}  {r['q4_config']} / {r.get('i8_config')}")
    for r in result.get("rows_8bit", []):
        cols = [f"{name} {r[name + '_ms']:.3f} ms = {r[name + '_speedup']:.2f}x" for name in ("q8", "i8")
                if name + "_ms" in r]
        print(f"8-bit K/V, batch {r['batch']}, context {r['context']}: " + ", ".join(cols))
    print(f"quantize+pack 4-bit, 1 layer x 32K: {result['quantize_4bit_32k']}")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
