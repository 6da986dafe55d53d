"""Quantize+pack and unpack+dequantize throughput of the numpy backend against numpy's copy.

A 64 MiB float32 KV tensor ``[1, 32, 4096, 128]``: keys grouped per channel over 64 tokens
(``axis=-2``), values per token over 64 channels (``axis=-1``), at 8, 4 and 2 bits. GB/s
counts the float32 bytes consumed (quantize) or produced (dequantize), the same bytes the
copy moves, so the ratio is the fraction of the copy bandwidth reached. Target: >= 10%.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import numpy as np
from _common import cpu_name  # noqa: E402

from lmcache.backends import get_backend
from lmcache.backends.base import QuantBlock
from lmcache.quant import QuantSpec

SHAPE = (1, 32, 4096, 128)  # 64 MiB of float32


def timeit(fn, repeat: int) -> float:
    fn()  # warm-up (page faults, caches)
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results"))
    args = ap.parse_args()
    be = get_backend("numpy")
    x = np.random.default_rng(0).standard_normal(SHAPE, dtype=np.float32)
    nbytes = x.nbytes
    dst = np.empty_like(x)
    copy_s = timeit(lambda: np.copyto(dst, x), args.repeat)
    copy_gbs = nbytes / copy_s / 1e9
    rows = []
    for bits in (8, 4, 2):
        for side, axis in (("keys", -2), ("values", -1)):
            spec = QuantSpec(bits, 64, axis)
            q_s = timeit(lambda spec=spec: be.quantize(x, spec), args.repeat)
            blk: QuantBlock = be.quantize(x, spec)
            d_s = timeit(lambda blk=blk: be.dequantize(blk, "float32"), args.repeat)
            rows.append({"bits": bits, "side": side, "quantize_gbs": nbytes / q_s / 1e9,
                         "dequantize_gbs": nbytes / d_s / 1e9})
    cpu = cpu_name()
    print(f"numpy backend, {nbytes / 2**20:.0f} MiB float32 {SHAPE}, group 64, median of {args.repeat}, on {cpu}")
    print(f"numpy copy (np.copyto): {copy_gbs:.2f} GB/s")
    print(f"{'bits':>4} {'side':>7} {'quantize GB/s':>14} {'% of copy':>10} {'dequantize GB/s':>16} {'% of copy':>10}")
    for r in rows:
        print(f"{r['bits']:>4} {r['side']:>7} {r['quantize_gbs']:>14.2f} {r['quantize_gbs'] / copy_gbs:>10.1%} "
              f"{r['dequantize_gbs']:>16.2f} {r['dequantize_gbs'] / copy_gbs:>10.1%}")
    worst = min(min(r["quantize_gbs"], r["dequantize_gbs"]) for r in rows) / copy_gbs
    print(f"slowest direction: {worst:.1%} of the copy bandwidth (target >= 10%)")
    os.makedirs(args.out, exist_ok=True)
    tag = "cpu-" + "".join(c if c.isalnum() else "-" for c in cpu).strip("-").lower()
    path = os.path.join(args.out, f"quant_cpu-{tag}.json")
    with open(path, "w") as f:
        json.dump({"device": cpu, "cores": os.cpu_count(), "numpy": np.__version__, "shape": SHAPE,
                   "bytes": nbytes, "copy_gbs": copy_gbs, "rows": rows, "worst_fraction_of_copy": worst}, f, indent=1)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
