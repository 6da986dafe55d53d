"""A/B of the Pallas int8 decode kernel's launch settings on a GPU, timed in one process.

    python bench/ab_pallas.py --tag dot32 "splits=17" "splits=17,dot_tokens=64" --shape 16,32640

Each setting is a comma-separated list of ``decode_int8.decode_attention`` keyword arguments
(integers, or text such as ``key_operands=prepass``); ``kernel=lanes`` runs
``decode_lanes.decode_attention`` instead (4-bit only). The settings run on the same random cache
(``bench/ncu_pallas.py``'s inputs: batch and quantized tokens from ``--shape``, 40 heads of 128,
key and value groups of 64) in interleaved rounds; each reports the median of ``--rounds``
rounds of ``--calls`` calls, and its largest difference from the first setting's output and
log-sum-exp (every setting computes the same attention). A setting that fails to compile is
reported and left out. For where the time goes, run ``bench/ncu_pallas.py`` under Nsight Compute.
Prints a table; writes ``bench/results/decode_int8-ab-<tag>-<bits>bit-b<batch>-t<tokens>-<card>.json``
(or under ``--out``).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import jax
import jax.numpy as jnp

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import ncu_pallas  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("settings", nargs="+")
    ap.add_argument("--bits", type=int, default=4)
    ap.add_argument("--shape", default=f"{ncu_pallas.B},{ncu_pallas.T}", help="batch,tokens of the quantized block")
    ap.add_argument("--tag", default="ab")
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--calls", type=int, default=30)
    ap.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
    args = ap.parse_args()
    batch, tokens = (int(x) for x in args.shape.split(","))
    inputs = ncu_pallas.inputs(args.bits, batch, tokens)
    card = jax.devices()[0].device_kind
    rows, fns, first = [], [], None
    for setting in args.settings:
        mod, cfg = ncu_pallas.parse(setting)
        fn = jax.jit(lambda *a, cfg=cfg, mod=mod: mod.decode_attention(*a, k_bits=args.bits, v_bits=args.bits, **cfg))
        try:
            out, lse = jax.block_until_ready(fn(*inputs))
        except Exception as e:  # a setting that does not compile is reported and left out
            print(f"{setting}: {type(e).__name__}: {str(e)[:400]}", flush=True)
            continue
        first = first or (out, lse)
        rows.append({"setting": setting, "max_abs_diff_out": float(jnp.max(jnp.abs(out - first[0]))),
                     "max_abs_diff_lse": float(jnp.max(jnp.abs(lse - first[1])))})
        fns.append(fn)
    times = [[] for _ in fns]
    for _ in range(args.rounds):
        for fn, ts in zip(fns, times):
            jax.block_until_ready(fn(*inputs))
            t0 = time.perf_counter()
            for _ in range(args.calls):
                out = fn(*inputs)
            jax.block_until_ready(out)
            ts.append((time.perf_counter() - t0) / args.calls * 1e3)
    print(f"{card}, {args.bits}-bit, batch {batch} / {tokens} tokens")
    print(f"{'ms':>7} {'diff':>8}  setting")
    for row, ts in zip(rows, times):
        row["ms"] = statistics.median(ts)
        row["ms_rounds"] = ts
        print(f"{row['ms']:7.3f} {row['max_abs_diff_out']:8.1e}  {row['setting']}")
    os.makedirs(args.out, exist_ok=True)
    name = "".join(c if c.isalnum() else "-" for c in card).strip("-")
    path = os.path.join(args.out, f"decode_int8-ab-{args.tag}-{args.bits}bit-b{batch}-t{tokens}-{name}.json")
    with open(path, "w") as f:
        json.dump({"card": card, "jax": jax.__version__, "bits": args.bits, "shape": [batch, ncu_pallas.H, tokens,
                   ncu_pallas.D], "date": time.strftime("%Y-%m-%d"), "rows": rows}, f, indent=1)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
