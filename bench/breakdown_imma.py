"""Where the time of one decode call goes (GPU): the whole call against its parts, one process.

Batch 16 x 40 heads x 128, 32K tokens (the last 128 in float16), one query token, 4-bit and
8-bit. Times, each the minimum over 4 interleaved rounds of medians after an L2 flush
(``decode_attention.timed``):

* the whole call (decode_imma scales the query itself; the residual's kernel on the side stream),
  with the query scaled by torch kernels first (``CONFIG["imma_scales_query"]`` off), and with
  the residual on the main stream;
* the call without the residual, and the residual alone as a call of its own (host-bound at this
  size: mostly the time to issue it);
* the query's scaling alone, the quantized segment's kernel alone (query and partials made
  before), that kernel then the merge;

and one call's kernels on a timeline (torch profiler: stream, start and length in us).

    python bench/breakdown_imma.py [--out DIR]     # JSON breakdown_imma-<card>.json
"""

from __future__ import annotations

import argparse
import math
import os
import sys

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.join(HERE, ".."))

import decode_attention as bench  # noqa: E402
from _common import write_results  # noqa: E402

from lmcache.backends.torch.triton import decode_attention as da  # noqa: E402


def parts(q, segs, scale) -> dict:
    """name -> (function, CONFIG overrides) for the parts of one call."""
    b, hq, L, d = q.shape
    (kq, vq), _ = segs
    hkv = kq.codes.shape[1]
    n = kq.codes.shape[2]
    total = n + segs[1][0].shape[2]
    qq = da._Query(q, hkv, scale)
    m_rows, block_m = qq.m_rows, qq.block_m
    bn = da._block_n(kq, vq, "rows")
    ns = da._splits(math.ceil(n / bn), b * hkv * m_rows, q.device)
    part = da._Partials(ns, b * hkv, m_rows, d, q.device)

    def kernel():
        da._launch(qq, kq, vq, part, 0, ns, total - L, n, hkv, m_rows, L, block_m, bn, "rows", False,
                   da._imma_takes(kq, vq, "rows", False))

    def kernel_merge():
        kernel()
        return part.combine(q.dtype)

    out = {
        "call": (lambda: da.decode_attention(q, segs, scale), {}),
        "call, query scaled by torch first": (lambda: da.decode_attention(q, segs, scale),
                                              {"imma_scales_query": False}),
        "call, residual on the main stream": (lambda: da.decode_attention(q, segs, scale), {"dense_side_tokens": 0}),
        "call without residual": (lambda: da.decode_attention(q, segs[:1], scale), {}),
        "residual alone (call)": (lambda: da.decode_attention(q, segs[1:], scale), {}),
        "query scaling": (lambda: da._Query(q, hkv, scale).scaled(), {}),
        "quantized kernel alone": (kernel, {}),
        "quantized kernel + merge": (kernel_merge, {}),
    }
    return out


def timeline(fn) -> list:
    """One call's GPU kernels: (name, stream, start us, length us), from the first kernel's start."""
    from torch.profiler import ProfilerActivity, profile

    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    ev = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    if not ev:
        return []
    t0 = min(e.time_range.start for e in ev)
    return sorted(((e.name[:48], getattr(e, "device_resource_id", None), round(e.time_range.start - t0, 1),
                    round(e.time_range.end - e.time_range.start, 1)) for e in ev), key=lambda x: x[2])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=os.environ.get("OUT", os.path.join(HERE, "results")))
    args = ap.parse_args()
    torch.manual_seed(0)
    scale = 1 / 128 ** 0.5
    k = torch.randn(16, 40, 32768, 128, dtype=torch.float16, device="cuda")
    v = torch.randn_like(k)
    q = torch.randn(16, 40, 1, 128, dtype=torch.float16, device="cuda")
    da.CONFIG["imma_tune"] = {}  # the parts of a call at the default settings, none timed against others
    res = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "config": dict(da.CONFIG)}
    sdpa = [bench.timed(lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v, scale=scale))
            for _ in range(3)]
    res["sdpa_ms"] = min(sdpa)
    print(f"SDPA float16 {res['sdpa_ms']:.3f} ms")
    for bits in (4, 8):
        segs = bench.make_cache(k, v, bits)
        runs = parts(q, segs, scale)
        times = {name: [] for name in runs}
        for _ in range(4):
            for name, (fn, conf) in runs.items():
                saved = {key: da.CONFIG[key] for key in conf}
                da.CONFIG.update(conf)
                times[name].append(bench.timed(fn, warmup=2, iters=11))
                da.CONFIG.update(saved)
        best = {name: min(x) * 1e3 for name, x in times.items()}
        tl_ = timeline(runs["call"][0])
        res[f"{bits}-bit"] = {"us": best, "timeline": tl_}
        print(f"{bits}-bit, us (min of 4 rounds' medians)")
        for name, us in best.items():
            print(f"  {name:<48} {us:8.1f}")
        print("  one call's kernels (stream, start, length us):")
        for name, _stream, start, length in tl_:
            print(f"    {start:8.1f} {length:8.1f}  {name}")
        del segs
    write_results(args.out, "breakdown_imma", res["device"], res)


if __name__ == "__main__":
    main()
