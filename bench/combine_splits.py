"""The merge of split-decode partials on the GPU: eight torch operations against the combine kernel.

A decode call splits each (sequence, KV head) row over many programs (flash-decoding) and merges
their partial outputs at the end. At batch 1 a long context makes more splits than one level of
programs merges well (128K tokens: ~500 splits over 40 rows), so above
``_COMBINE_KERNEL_MAX_SPLITS`` splits chunks of 32 are merged by their own programs first
(``decode_attention._Partials.combine``). This times, per (splits, rows) shape of one query row and
head dim 128: the torch formula, the kernel over all splits in one level (a program per row and 32
dimensions), and the chunked kernel wherever there are more than 32 splits (two launches); GPU
time per call (as ``decode_attention.timed``: CUDA events, L2 flushed) and the host time to issue
it. JSON to ``bench/results`` (or ``--out``).

    python bench/combine_splits.py
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, ".."))
sys.path.insert(0, HERE)
import decode_attention as bench  # noqa: E402
from _common import write_results  # noqa: E402

from lmcache.backends.torch.triton import decode_attention as da  # noqa: E402

# (splits, rows): batch 1 x 40 heads at 4K / 32K / 128K with 64 programs per SM, and batch 16 at 32K
# (with 64 and with 128 programs per SM, the float16 residual's 4 splits included in the second)
SHAPES = [(19, 40), (105, 40), (131, 40), (422, 40), (515, 40), (13, 640), (30, 640)]


def torch_merge(part: da._Partials, dtype: torch.dtype) -> torch.Tensor:
    """The merge as torch operations (the path above 128 splits before the chunked kernel)."""
    w = torch.exp2(part.m - part.m.amax(dim=0))
    return ((part.o * w[..., None]).sum(dim=0) / (part.l * w).sum(dim=0)[..., None]).to(dtype)


def kernel_merge(part: da._Partials, dtype: torch.dtype, limit: int) -> torch.Tensor:
    """``part.combine`` with up to ``limit`` splits merged in one level."""
    saved = da._COMBINE_KERNEL_MAX_SPLITS
    da._COMBINE_KERNEL_MAX_SPLITS = limit
    try:
        return part.combine(dtype)
    finally:
        da._COMBINE_KERNEL_MAX_SPLITS = saved


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=os.environ.get("OUT", os.path.join(HERE, "results")))
    args = ap.parse_args()
    bench.DEV = "cuda"
    g = torch.Generator(device="cuda").manual_seed(0)
    rows = []
    print(f"{'splits':>6} {'rows':>5} | {'torch us':>9} {'one level':>10} {'chunked':>8} | host us: torch / chunked")
    for n, r in SHAPES:
        part = da._Partials(n, r, 1, 128, "cuda")
        part.o.normal_(generator=g)
        part.m.normal_(generator=g).mul_(4)
        part.l.uniform_(0.5, 1.5, generator=g)
        ref = torch_merge(part, torch.float32)
        res = {"splits": n, "rows": r}
        for name, fn, extra in (("torch", torch_merge, ()), ("one_level", kernel_merge, (1 << 30,)),
                                ("chunked", kernel_merge, (da._COMBINE_CHUNK,))):
            out = fn(part, torch.float16, *extra)
            res[f"{name}_max_abs_err"] = float((out.float() - ref).abs().max())
            res[f"{name}_us"] = bench.timed(fn, part, torch.float16, *extra, warmup=3, iters=25) * 1e3
            res[f"{name}_host_us"] = bench.host_us(fn, part, torch.float16, *extra)
        rows.append(res)
        print(f"{n:>6} {r:>5} | {res['torch_us']:9.1f} {res['one_level_us']:10.1f} {res['chunked_us']:8.1f} | "
              f"{res['torch_host_us']:.0f} / {res['chunked_host_us']:.0f}")
    card = torch.cuda.get_device_name()
    write_results(args.out, "combine_splits", card,
                  {"benchmark": "combine_splits", "card": card, "torch": torch.__version__, "rows": rows})


if __name__ == "__main__":
    main()
