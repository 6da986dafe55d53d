"""The decode kernels of an earlier revision against the working tree's, in one process (GPU).

Launch settings and card-to-card differences move a kernel's time by 10-20% between lent
machines, so a change is judged against the previous kernel on the same data in the same
run, interleaved. Write the earlier kernels next to the current ones first:

    python bench/ab_kernels.py --setup HEAD     # writes _old_decode_attention.py (untracked)
    python bench/ab_kernels.py                  # on the GPU; JSON to $OUT or bench/results

Batch 16 x 40 heads x 128, 32K tokens, one query token; 4 rounds, the minimum of the
per-round medians.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
KERNEL = "lmcache/backends/torch/triton/decode_attention.py"
OLD = os.path.join(HERE, "..", "lmcache/backends/torch/triton/_old_decode_attention.py")


def setup(rev: str) -> None:
    src = subprocess.run(["git", "show", f"{rev}:{KERNEL}"], capture_output=True, text=True, check=True,
                         cwd=os.path.join(HERE, "..")).stdout
    with open(OLD, "w") as f:
        f.write(f"# {KERNEL} at {rev}, for bench/ab_kernels.py; not part of the package\n" + src)
    print(f"wrote {os.path.normpath(OLD)}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--setup", metavar="REV", help="write the kernels of git revision REV and stop")
    ap.add_argument("--out", default=os.environ.get("OUT", os.path.join(HERE, "results")))
    args = ap.parse_args()
    if args.setup:
        setup(args.setup)
        return
    import torch

    sys.path.insert(0, HERE)
    import decode_attention as bench

    from lmcache.backends.torch.triton import _old_decode_attention as old
    from lmcache.backends.torch.triton import decode_attention as new

    torch.manual_seed(0)
    scale = 1 / 128 ** 0.5
    k = torch.randn(16, 40, 32768, 128, dtype=torch.float16, device="cuda")
    v = torch.randn_like(k)
    q = torch.randn(16, 40, 1, 128, dtype=torch.float16, device="cuda")
    grids = {4: [(1, 16, False, 2), (1, 8, True, 1)], 8: [(4, 32, True, 1), (2, 32, True, 1)]}
    res = {"device": torch.cuda.get_device_name(), "torch": torch.__version__}
    for bits in (4, 8):
        segs = bench.make_cache(k, v, bits)
        key = "qrows" if bits == 4 else "qrows8"
        cfgs = {"old default": (old, dict(old.CONFIG[key])), "new default": (new, dict(new.CONFIG[key]))}
        for mod, name in ((old, "old"), (new, "new")):
            for nw, bn, pf, st in grids[bits]:
                cfgs[f"{name} w{nw} bn{bn} prefetch={pf}"] = (mod, {"num_warps": nw, "block_n": bn, "prefetch": pf,
                                                                    "num_stages": st, "mma": False})
        times = {n: [] for n in cfgs}
        for _ in range(4):
            for n, (mod, c) in cfgs.items():
                mod.CONFIG[key] = c
                times[n].append(bench.timed(mod.decode_attention, q, segs, scale, warmup=2, iters=9))
        err = bench.rel_err(new.decode_attention(q, segs, scale), old.decode_attention(q, segs, scale))
        res[f"{bits}-bit"] = {"rel_diff_new_vs_old": err, "ms": {n: min(x) for n, x in times.items()}}
        print(f"{bits}-bit (outputs differ by {err:.1e} relative)")
        for n, x in times.items():
            print(f"  {n:<34} {min(x):7.3f} ms")
        del segs
    os.makedirs(args.out, exist_ok=True)
    card = "".join(ch if ch.isalnum() else "-" for ch in res["device"]).strip("-")
    path = os.path.join(args.out, f"decode_attention-ab-{card}.json")
    with open(path, "w") as f:
        json.dump(res, f, indent=1)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
