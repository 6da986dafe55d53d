"""One decode call of the working tree's kernels at the benchmark shape, to run under Nsight Compute (GPU).

    ncu --clock-control none -k regex:_decode_kernel --launch-skip 2 --launch-count 1 \\
        --section WarpStateStats --section SchedulerStats --section Occupancy \\
        python bench/ncu_imma.py 4 step=2,l2_ahead=1,stages=0

Batch 16 x 40 heads x 128, 32K tokens, one query token (as ``bench/decode_attention.py``); the
decode function runs three times, so ``--launch-skip 2`` profiles a warm call. The settings are
``CONFIG`` entries of ``decode_attention`` for the given bits, named as the benchmark's sweep names
them (``decode_attention.IMMA_PER_BITS``: ``step``, ``l2_ahead``, ``stages``), and ``pps``
(``programs_per_sm``).
"""

from __future__ import annotations

import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import decode_attention as bench  # noqa: E402

from lmcache.backends.torch.triton import decode_attention as da  # noqa: E402


def main() -> None:
    bits = int(sys.argv[1])
    da.CONFIG["imma_tune"] = {}  # the settings named here, not the library's timed choice
    for item in (sys.argv[2].split(",") if len(sys.argv) > 2 else []):
        name, value = item.split("=")
        if name == "pps":
            da.CONFIG["programs_per_sm"] = int(value)
        else:
            key = bench.IMMA_PER_BITS[name]
            da.CONFIG[key] = {**da.CONFIG[key], bits: int(value)}
    torch.manual_seed(0)
    k = torch.randn(16, 40, 32768, 128, dtype=torch.float16, device="cuda")
    v = torch.randn_like(k)
    q = torch.randn(16, 40, 1, 128, dtype=torch.float16, device="cuda")
    segs = bench.make_cache(k, v, bits)
    del k, v
    for _ in range(3):
        da.decode_attention(q, segs, 128 ** -0.5)
    torch.cuda.synchronize()


if __name__ == "__main__":
    main()
