"""Decode attention over the compressed cache vs torch SDPA over float16 KV, and quantize+pack speed.

Llama-2-13B attention shape (40 query heads = 40 KV heads, head_dim 128), one new query token,
batch 1 and 16 at 4K and 32K tokens and batch 1 at 128K. The cache is laid out as ``Cache``
keeps it: the oldest tokens in one quantized block (keys 4/8-bit per channel over 64 tokens,
values per token over 64 channels), the newest 128 in float16. Also times quantize+pack of one
layer's K and V for a 32K-token prefill and the device copy bandwidth, in the same run. Times
are GPU times of back-to-back calls after an L2 flush (``timed``, as ``triton.testing.do_bench``);
the host time to issue a call is reported beside them (``host_us``).

    python bench/decode_attention.py            # on a CUDA or ROCm GPU
Prints a table and writes bench/results/decode_attention-<card>.json (or under --out).
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from _common import write_results  # noqa: E402

from lmcache.backends.base import QuantBlock  # noqa: E402
from lmcache.backends.torch.triton import autotune  # noqa: E402
from lmcache.backends.torch.triton import decode_attention as da  # noqa: E402
from lmcache.backends.torch.triton import quantize as qz  # noqa: E402
from lmcache.backends.torch.triton.dequantize import dequantize  # noqa: E402
from lmcache.backends.torch.triton.quantize import quantize  # noqa: E402
from lmcache.quant import QuantSpec  # noqa: E402

HEADS, HEAD_DIM, GROUP, RESIDUAL = 40, 128, 64, 128
SHAPES = [(1, 4096), (16, 4096), (1, 32768), (16, 32768), (1, 131072)]
PREFILL = 32768
DEV = "cuda"
ROUNDS = 3  # interleaved timing rounds of SDPA and the kernels at each shape
# decode_imma settings the sweep tries beyond the defaults, shared by 4- and 8-bit
SHARED = {"dense_min_tiles": (1, 2), "dense_side_tokens": (0,)}
# decode_imma settings per width: the sweep's name -> the CONFIG entry ({bits: value})
IMMA_PER_BITS = {"step": "imma_step", "l2_ahead": "imma_l2_ahead", "stages": "imma_stages"}


_FLUSH = {}


def _l2_flush() -> None:
    """Overwrite a 256 MiB buffer: whatever the last run left in L2 (50 MiB on an H200) is gone."""
    if "buf" not in _FLUSH:
        _FLUSH["buf"] = torch.empty(1 << 28, dtype=torch.uint8, device=DEV)
    _FLUSH["buf"].zero_()


def timed(fn, *args, warmup: int = 3, iters: int = 15) -> float:
    """Median milliseconds of ``fn(*args)`` over ``iters`` runs, after ``warmup`` runs.

    As ``triton.testing.do_bench``: each run between its own CUDA events, after an L2 flush, and
    no host synchronisation between runs, so the host enqueues ahead of the GPU as in a model's
    layer loop: launch overhead counts only where the GPU would wait for it (``host_us`` measures
    it apart).
    """
    for _ in range(warmup):
        fn(*args)
    if DEV != "cuda":  # --smoke: host clock
        t0 = time.perf_counter()
        fn(*args)
        return (time.perf_counter() - t0) * 1e3
    events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(iters)]
    torch.cuda.synchronize()
    for a, b in events:
        _l2_flush()
        a.record()
        fn(*args)
        b.record()
    torch.cuda.synchronize()
    return statistics.median(a.elapsed_time(b) for a, b in events)


def host_us(fn, *args, iters: int = 20) -> float:
    """Host microseconds to issue one ``fn(*args)`` (Python, argument checks, kernel launches), GPU not waited for."""
    fn(*args)
    if DEV == "cuda":
        torch.cuda.synchronize()
    else:  # --smoke: the interpreter runs the kernels on the host, once is enough
        iters = 1
    t0 = time.perf_counter()
    for _ in range(iters):
        fn(*args)
    t = time.perf_counter() - t0
    if DEV == "cuda":
        torch.cuda.synchronize()
    return t / iters * 1e6


def copy_bandwidth() -> float:
    """Device-to-device copy bandwidth, bytes read + written per second, of a 2 GiB buffer."""
    src = torch.empty(1 << 30 if DEV == "cuda" else 1 << 16, dtype=torch.float16, device=DEV).normal_()
    dst = torch.empty_like(src)
    ms = timed(dst.copy_, src, iters=20)
    nbytes = 2 * src.numel() * src.element_size()
    del src, dst
    return nbytes / (ms * 1e-3)


def nbytes(*xs) -> int:
    total = 0
    for x in xs:
        if isinstance(x, QuantBlock):
            total += nbytes(x.codes, x.scale, x.lo)
        else:
            total += x.numel() * x.element_size()
    return total


def make_cache(k, v, bits):
    """Segments as Cache holds them: one quantized block, then the float16 residual."""
    t = k.shape[2] - RESIDUAL
    ks, vs = QuantSpec(bits, GROUP, -2), QuantSpec(bits, min(GROUP, HEAD_DIM), -1)
    kq = QuantBlock(*quantize(k[:, :, :t], ks), ks)
    vq = QuantBlock(*quantize(v[:, :, :t], vs), vs)
    return [(kq, vq), (k[:, :, t:].contiguous(), v[:, :, t:].contiguous())]


def rel_err(out, ref) -> float:
    return float((out.float() - ref.float()).norm() / ref.float().norm())


def check(segs, q, scale) -> float:
    """Relative error of the fused kernel against SDPA over the dequantized cache."""
    (kq, vq), (kr, vr) = segs
    k = torch.cat([dequantize(kq.codes, kq.scale, kq.lo, kq.spec, torch.float16), kr], 2)
    v = torch.cat([dequantize(vq.codes, vq.scale, vq.lo, vq.spec, torch.float16), vr], 2)
    ref = torch.nn.functional.scaled_dot_product_attention(q.float(), k.float(), v.float(), scale=scale)
    return rel_err(da.decode_attention(q, segs, scale), ref)


def sweep(caches, q, scale) -> dict:
    """Try launch settings of the quantized-segment row kernel on the batch-16 / 32K case; keep the best.

    The integer matrix-unit kernel (``decode_imma``, ``CONFIG["imma"]``) takes both widths; it
    runs with one or two tiles per loop step, without and with the L2 bulk prefetch of the next
    step's tiles or shared-memory stages, at three programs-per-SM settings; then with the other
    values of ``SHARED``
    (splits of the float16 residual, no second stream for it). Without it, 4-bit caches use
    ``CONFIG["qrows"]`` (its "mma" entry: the float16 matrix-unit kernel of ``decode_mma``), caches
    with 8-bit codes ``CONFIG["qrows8"]``: each is tried at several tile sizes, warps and prefetch
    settings, then programs per SM (shared, chosen on 4-bit). The older row kernel runs once on
    each, for reference. The integer kernel is kept if it is the fastest at both widths.
    """
    trials = []
    use_imma = da.CONFIG["imma"]

    def trial(bits, key, cfg, pps=None, qrows=True):
        saved = dict(da.CONFIG)  # entries are replaced, never mutated: a shallow copy restores them
        da.CONFIG["programs_per_sm"] = pps or saved["programs_per_sm"]
        da.CONFIG["rows"] = {**saved["rows"], "qrows": qrows}
        da.CONFIG["imma"] = key == "imma"
        da.CONFIG["imma_tune"] = {}  # the settings tried here, not the library's own choice
        if key == "imma":
            for name, entry in IMMA_PER_BITS.items():
                da.CONFIG[entry] = {**saved[entry], bits: cfg[name]}
            da.CONFIG.update({name: cfg[name] for name in SHARED if name in cfg})
        else:
            da.CONFIG[key] = dict(cfg)
        res = {"bits": bits, "config": key if qrows else "rows", "settings": dict(cfg),
               "programs_per_sm": da.CONFIG["programs_per_sm"]}
        try:
            res["ms"] = timed(da.decode_attention, q, caches[bits], scale, warmup=2, iters=7)
        except Exception as e:  # a setting that does not compile (registers, shared memory) is skipped
            res["ms"], res["error"] = float("inf"), f"{type(e).__name__}: {str(e)[:120]}"
        da.CONFIG.update(saved)
        print(f"  {bits}-bit {res['config']} pps={res['programs_per_sm']} {cfg}: {res['ms']:.3f} ms", flush=True)
        trials.append(res)
        return res

    def settings(nw, bn, pf, st, mma=False):
        return {"num_warps": nw, "block_n": bn, "prefetch": pf, "num_stages": st, "mma": mma}

    grids = {4: [(1, 16, True, 1, True), (1, 16, False, 1, True), (1, 8, True, 1), (1, 8, False, 2), (1, 16, True, 1),
                 (1, 16, False, 2), (1, 32, False, 2)],
             8: [(2, 32, True, 1), (4, 32, True, 1), (4, 32, False, 2), (2, 16, True, 1), (2, 16, False, 2),
                 (8, 64, True, 1)]}
    if DEV != "cuda":
        grids = {4: [(1, 16, True, 1)], 8: [(2, 16, True, 1)]}
    best = {}
    for bits, key in ((4, "qrows"), (8, "qrows8")):
        trial(bits, key, da.CONFIG[key], pps=16, qrows=False)
        for g in grids[bits]:
            trial(bits, key, settings(*g))
        best[bits] = min((t for t in trials if t["bits"] == bits and t["config"] == key), key=lambda t: t["ms"])
        da.CONFIG[key] = best[bits]["settings"]
    for pps in (32, 128) if DEV == "cuda" else ():
        t = trial(4, "qrows", da.CONFIG["qrows"], pps=pps)
        if t["ms"] < best[4]["ms"]:
            best[4] = t
            da.CONFIG["programs_per_sm"] = pps
    if use_imma:
        # (tiles per loop step, L2 prefetch steps ahead, shared-memory stages, programs per SM)
        grid = ([(1, 0, 3, 128), (1, 0, 2, 128), (1, 0, 2, 96), (1, 0, 0, 128), (2, 1, 0, 64), (2, 0, 0, 64)]
                if DEV == "cuda" else [(1, 0, 3, 128)])
        imma = {bits: min((trial(bits, "imma", {"step": step, "l2_ahead": l2, "stages": st}, pps=pps)
                           for step, l2, st, pps in grid), key=lambda t: t["ms"]) for bits in (4, 8)}
        # settings both widths share: kept when they lower the sum of the two times
        for name, values in SHARED.items() if DEV == "cuda" else ():
            for val in values:
                ts = {b: trial(b, "imma", {**imma[b]["settings"], name: val}, pps=imma[b]["programs_per_sm"])
                      for b in (4, 8)}
                if ts[4]["ms"] + ts[8]["ms"] < imma[4]["ms"] + imma[8]["ms"]:
                    imma = ts
        if all(imma[b]["ms"] < best[b]["ms"] for b in (4, 8)):
            best = imma
            da.CONFIG["programs_per_sm"] = imma[4]["programs_per_sm"]
            for name, entry in IMMA_PER_BITS.items():
                da.CONFIG[entry] = {b: imma[b]["settings"][name] for b in (4, 8)}
            da.CONFIG.update({name: imma[4]["settings"][name] for name in SHARED if name in imma[4]["settings"]})
        else:
            use_imma = False
    da.CONFIG["imma"] = use_imma
    return {"best": {str(k): v for k, v in best.items()}, "trials": trials, "imma": use_imma,
            "programs_per_sm": da.CONFIG["programs_per_sm"]}


def bench_quantize(bw: float) -> dict:
    """Quantize + pack one layer's K and V of a 32K-token prefill (batch 1), 4 and 8 bits.

    First tries launch settings of each kernel (warps; channels per program for keys, tokens per
    program for values) on 4-bit codes and keeps the best.
    """
    k = torch.randn(1, HEADS, PREFILL, HEAD_DIM, dtype=torch.float16, device=DEV)
    v = torch.randn_like(k)
    tried = {}
    grids = {"keys": [{"keys_warps": nw, "keys_channels": dc} for nw, dc in
                      ((2, 128), (4, 128), (1, 64), (2, 64), (1, 32), (2, 32))],
             "values": [{"values_warps": nw, "values_tokens": nt} for nw, nt in
                        ((2, 32), (4, 32), (8, 32), (4, 64), (8, 64), (4, 16))]}
    ks4, vs4 = QuantSpec(4, GROUP, -2), QuantSpec(4, GROUP, -1)
    for side, fn in (("keys", lambda: quantize(k, ks4)), ("values", lambda: quantize(v, vs4))):
        for cfg in grids[side] if DEV == "cuda" else grids[side][:1]:
            qz.CONFIG.update(cfg)
            tried[",".join(f"{a}={b}" for a, b in cfg.items())] = (timed(fn), cfg)
        qz.CONFIG.update(min((t for name, t in tried.items() if name.startswith(side)), key=lambda t: t[0])[1])
    tried = {name: t[0] for name, t in tried.items()}
    print(f"quantize settings: {tried} -> {qz.CONFIG}", flush=True)
    quant = {"warps_tried_ms": tried, "config": dict(qz.CONFIG)}
    for bits in (4, 8):
        ks, vs = QuantSpec(bits, GROUP, -2), QuantSpec(bits, GROUP, -1)

        def run(ks, vs):
            return quantize(k, ks), quantize(v, vs)

        ms = timed(run, ks, vs)
        (kc, kss, kl), (vc, vss, vl) = run(ks, vs)
        moved = nbytes(k, v, kc, kss, kl, vc, vss, vl)
        k_ms = timed(quantize, k, ks)
        v_ms = timed(quantize, v, vs)
        quant[bits] = {"ms": ms, "bytes": moved, "GBps": moved / (ms * 1e-3) / 1e9,
                       "fraction_of_copy": moved / (ms * 1e-3) / bw, "keys_ms": k_ms, "values_ms": v_ms}
        print(f"quantize+pack {bits}-bit, 1 layer x 32K tokens: {ms:.3f} ms, {quant[bits]['GBps']:.0f} GB/s "
              f"({100 * quant[bits]['fraction_of_copy']:.0f}% of copy)", flush=True)
    return quant


def bench_shape(batch: int, ctx: int, scale: float, do_sweep: bool) -> tuple[dict, dict | None]:
    """SDPA over float16 KV and the fused kernel over 4- and 8-bit KV at one (batch, context).

    After the sweep (when asked), SDPA and both kernels are timed in ``ROUNDS`` interleaved rounds
    and each keeps the smallest of its per-round medians: a card that slows as it warms (clocks,
    power) slows all three alike, not whichever came last.
    """
    k = torch.randn(batch, HEADS, ctx, HEAD_DIM, dtype=torch.float16, device=DEV)
    v = torch.randn_like(k)
    q = torch.randn(batch, HEADS, 1, HEAD_DIM, dtype=torch.float16, device=DEV)
    sdpa = torch.nn.functional.scaled_dot_product_attention
    caches = {bits: make_cache(k, v, bits) for bits in (4, 8)}
    sw = sweep(caches, q, scale) if do_sweep else None
    runs = {"sdpa": (lambda q, k, v: sdpa(q, k, v, scale=scale), (q, k, v))}
    runs.update({bits: (da.decode_attention, (q, segs, scale)) for bits, segs in caches.items()})
    per_round = {name: [] for name in runs}
    for _ in range(ROUNDS):
        for name, (fn, a) in runs.items():
            per_round[name].append(timed(fn, *a))
    best = {name: min(ms) for name, ms in per_round.items()}
    sdpa_ms = best["sdpa"]
    row = {"batch": batch, "context": ctx, "sdpa_fp16_ms": sdpa_ms,
           "sdpa_TBps": nbytes(k, v, q) / (sdpa_ms * 1e-3) / 1e12}
    fn, a = runs["sdpa"]
    row["sdpa_host_us"] = host_us(fn, *a)
    for bits, segs in caches.items():
        ms = best[bits]
        row[f"q{bits}_host_us"] = host_us(da.decode_attention, q, segs, scale)
        read = nbytes(*segs[0], *segs[1], q)
        row[f"q{bits}_ms"] = ms
        row[f"q{bits}_speedup"] = sdpa_ms / ms
        row[f"q{bits}_bytes_read"] = read
        row[f"q{bits}_TBps"] = read / (ms * 1e-3) / 1e12
        row[f"q{bits}_rel_err_vs_dequant_sdpa"] = check(segs, q, scale) if batch * ctx <= 32768 else None
        if do_sweep:
            row[f"q{bits}_kernels_us"] = kernel_breakdown(da.decode_attention, q, segs, scale)
    if batch == 1 and DEV == "cuda":  # host-bound when eager: also as a captured CUDA graph replays it
        for name, (fn, a) in runs.items():
            key = "sdpa_fp16" if name == "sdpa" else f"q{name}"
            row[f"{key}_graph_ms"] = timed(graphed(fn, *a).replay)
        for bits in caches:
            row[f"q{bits}_graph_speedup"] = row["sdpa_fp16_graph_ms"] / row[f"q{bits}_graph_ms"]
    return row, sw


def graphed(fn, *args) -> torch.cuda.CUDAGraph:
    """``fn(*args)`` captured in a CUDA graph (compiled and warmed up first, on a side stream)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):
            fn(*args)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn(*args)
    return graph


def kernel_breakdown(fn, *args) -> dict:
    """Microseconds per call of each GPU kernel ``fn(*args)`` launches (torch profiler), for the notes."""
    try:
        from torch.profiler import ProfilerActivity, profile

        fn(*args)
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(5):
                fn(*args)
            torch.cuda.synchronize()
        out = {e.key[:60]: e.device_time_total / 5 for e in prof.key_averages() if e.device_time_total > 0}
    except Exception as e:  # no CUPTI in the image: the breakdown is a note, not a figure
        return {"error": f"{type(e).__name__}: {str(e)[:120]}"}
    print("  kernels (us per call): " + ", ".join(f"{k} {v:.1f}" for k, v in out.items()), flush=True)
    return out


def bench_gqa(scale: float) -> list:
    """Grouped heads (40 query heads over 8 KV heads), batch 16, 32K, 1 and 4 query tokens: both kernels, 4-bit."""
    out = []
    for L in (1, 4):
        k = torch.randn(16, 8, 32768, HEAD_DIM, dtype=torch.float16, device=DEV)
        v = torch.randn_like(k)
        q = torch.randn(16, HEADS, L, HEAD_DIM, dtype=torch.float16, device=DEV)
        segs = make_cache(k, v, 4)
        del k, v
        saved = da.CONFIG["rows_max"]
        for kind, rows_max in (("rows", 1 << 20), ("dot", 0)):
            da.CONFIG["rows_max"] = rows_max
            ms = timed(da.decode_attention, q, segs, scale)
            out.append({"batch": 16, "context": 32768, "q_heads": HEADS, "kv_heads": 8, "q_len": L, "kernel": kind,
                        "ms": ms, "TBps": nbytes(*segs[0], *segs[1], q) / (ms * 1e-3) / 1e12})
            print(f"GQA 40/8 B=16 T=32768 L={L} {kind:>4}: {ms:.3f} ms", flush=True)
        da.CONFIG["rows_max"] = saved
        del segs
        torch.cuda.empty_cache()
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results"))
    ap.add_argument("--no-sweep", action="store_true", help="skip the launch-setting sweep")
    ap.add_argument("--smoke", action="store_true",
                    help="tiny shapes on CPU under TRITON_INTERPRET=1, to check the script itself")
    args = ap.parse_args()
    global DEV, HEADS, SHAPES, PREFILL, RESIDUAL, ROUNDS
    if args.smoke:
        if os.environ.get("TRITON_INTERPRET") != "1":
            sys.exit("--smoke needs TRITON_INTERPRET=1 in the environment")
        DEV, HEADS, SHAPES, PREFILL, RESIDUAL, ROUNDS = "cpu", 2, [(1, 256), (16, 512)], 128, 64, 1
    elif not torch.cuda.is_available():
        sys.exit("this benchmark needs a CUDA or ROCm GPU")
    torch.manual_seed(0)
    card = torch.cuda.get_device_name() if DEV == "cuda" else "smoke-cpu"
    scale = 1 / math.sqrt(HEAD_DIM)
    t_start = time.time()
    bw = copy_bandwidth()
    print(f"{card}: device copy {bw / 1e12:.2f} TB/s (read + write)", flush=True)

    quant = bench_quantize(bw)

    rows = []
    sweep_result = None
    for batch, ctx in sorted(SHAPES, key=lambda s: (s[0] == 1, s)):
        big = max(SHAPES, key=lambda s: s[0] * s[1] * (s[0] > 1))
        row, sw = bench_shape(batch, ctx, scale, do_sweep=(batch, ctx) == big and not args.no_sweep)
        sweep_result = sweep_result or sw
        rows.append(row)
        print(f"B={batch:>2} T={ctx:>6}: sdpa fp16 {row['sdpa_fp16_ms']:.3f} ms | 4-bit {row['q4_ms']:.3f} ms "
              f"x{row['q4_speedup']:.2f} {row['q4_TBps']:.2f} TB/s | 8-bit {row['q8_ms']:.3f} ms "
              f"x{row['q8_speedup']:.2f} {row['q8_TBps']:.2f} TB/s", flush=True)
        if "q4_graph_ms" in row:
            print(f"  as CUDA graphs: sdpa {row['sdpa_fp16_graph_ms']:.3f} ms | 4-bit {row['q4_graph_ms']:.3f} ms "
                  f"x{row['q4_graph_speedup']:.2f} | 8-bit {row['q8_graph_ms']:.3f} ms x{row['q8_graph_speedup']:.2f}",
                  flush=True)
        torch.cuda.empty_cache()

    extra = bench_gqa(scale) if DEV == "cuda" else []

    print()
    print(f"{'batch':>5} {'ctx':>7} {'sdpa ms':>8} {'4b ms':>7} {'4b x':>6} {'4b TB/s':>8} {'8b ms':>7} "
          f"{'8b x':>6} {'8b TB/s':>8} {'host us sdpa/4b/8b':>19}")
    for r in sorted(rows, key=lambda r: (r["context"], r["batch"])):
        print(f"{r['batch']:>5} {r['context']:>7} {r['sdpa_fp16_ms']:>8.3f} {r['q4_ms']:>7.3f} "
              f"{r['q4_speedup']:>6.2f} {r['q4_TBps']:>8.2f} {r['q8_ms']:>7.3f} {r['q8_speedup']:>6.2f} "
              f"{r['q8_TBps']:>8.2f} {r['sdpa_host_us']:>7.0f}/{r['q4_host_us']:.0f}/{r['q8_host_us']:.0f}")
    target = next(r for r in rows if (r["batch"], r["context"]) == max(SHAPES, key=lambda s: s[0] * s[1]))
    result = {
        "benchmark": "decode_attention", "card": card, "torch": torch.__version__,
        "triton": __import__("triton").__version__, "hip": torch.version.hip,
        "date": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
        "shape": {"heads": HEADS, "kv_heads": HEADS, "head_dim": HEAD_DIM, "q_len": 1, "group_size": GROUP,
                  "residual_fp16_tokens": RESIDUAL},
        "copy_bandwidth_Bps": bw, "quantize_pack_32k": quant, "decode": rows, "sweep": sweep_result,
        "config": {k: v for k, v in da.CONFIG.items()}, "gqa": extra,
        # decode_imma settings the library timed and chose on this card (CONFIG["imma_tune"])
        "imma_tuned": [{"class": [str(x) for x in key], "chose": choice or "defaults"}
                       for key, choice in autotune.choices().items()],
        "targets": {"q4_speedup_b16_32k": target["q4_speedup"], "q4_target": 3.2,
                    "q8_speedup_b16_32k": target["q8_speedup"], "q8_target": 1.7,
                    "quantize_fraction_of_copy_4bit": quant[4]["fraction_of_copy"], "quantize_target": 0.6},
        "seconds": time.time() - t_start,
    }
    print()
    write_results(args.out, "decode_attention", card, result)


if __name__ == "__main__":
    main()
