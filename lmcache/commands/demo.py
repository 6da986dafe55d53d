"""``lmcache demo``: compress a KV cache and show the bytes saved and the attention error.

Runs on synthetic KV with the statistics that make KV quantization hard in real models
(a few outlier key channels with large offsets, heavier-tailed values), so it needs nothing
but numpy. Every number printed is measured in this run.
"""

from __future__ import annotations

import time

import numpy as np

HELP = "quantize a KV cache at 8, 4 and 2 bits and print the bytes saved and the attention error"


def add_arguments(parser) -> None:
    parser.add_argument("--backend", default="numpy", help="backend to run on (default: numpy)")
    parser.add_argument("--tokens", type=int, default=2048, help="context length (default: 2048)")
    parser.add_argument("--layers", type=int, default=4, help="layers (default: 4)")
    parser.add_argument("--seed", type=int, default=0)


def synthetic_kv(rng: np.random.Generator, batch: int, kv_heads: int, tokens: int, head_dim: int):
    """Keys and values ``[batch, kv_heads, tokens, head_dim]`` float16 shaped like a real model's.

    Keys: a per-channel offset plus a few outlier channels 8x wider (what per-channel key
    quantization is for); values: a per-channel mean plus Student-t noise (heavier tails
    than a Gaussian).
    """
    offset = rng.normal(0, 1.5, size=(1, kv_heads, 1, head_dim))
    width = np.ones((1, kv_heads, 1, head_dim))
    width[..., rng.choice(head_dim, size=max(1, head_dim // 32), replace=False)] = 8.0
    keys = offset + width * rng.normal(0, 1, size=(batch, kv_heads, tokens, head_dim))
    values = rng.normal(0, 1, size=(1, kv_heads, 1, head_dim)) + rng.standard_t(5, size=(batch, kv_heads, tokens,
                                                                                           head_dim))
    return keys.astype(np.float16), values.astype(np.float16)


def measure(backend: str, bits, keys_per_layer, values_per_layer, queries, group_size=64, residual=128) -> dict:
    """Fill a cache with every layer's KV, attend with ``queries``; return bytes, error and time."""
    import lmcache

    cache = lmcache.Cache(backend=backend, bits=bits, group_size=group_size, residual=residual)
    be = lmcache.backends.get_backend(backend)
    errs = []
    seconds = 0.0
    for layer, (k, v) in enumerate(zip(keys_per_layer, values_per_layer)):
        t0 = time.perf_counter()
        cache.update(layer, be.from_numpy(k), be.from_numpy(v))
        out = be.to_numpy(cache.attend(layer, be.from_numpy(queries))).astype(np.float64)
        seconds += time.perf_counter() - t0
        ref = be.to_numpy(be.attention(be.from_numpy(queries.astype(np.float32)),
                                       be.from_numpy(k.astype(np.float32)),
                                       be.from_numpy(v.astype(np.float32)), 1 / np.sqrt(k.shape[-1])))
        errs.append(np.linalg.norm(out - ref) / np.linalg.norm(ref))
    s = cache.stats()
    return {"bits": bits, "nbytes": s["nbytes"], "dense_nbytes": s["dense_nbytes"],
            "attn_rel_err": float(np.mean(errs)), "seconds": seconds}


def run(args) -> int:
    import lmcache.backends  # noqa: F401  (makes lmcache.backends reachable from measure)

    if args.tokens < 1 or args.layers < 1:
        raise SystemExit("lmcache demo: --tokens and --layers must be at least 1")
    rng = np.random.default_rng(args.seed)
    batch, kv_heads, q_heads, head_dim, q_len = 1, 8, 32, 128, 16
    ks, vs = zip(*(synthetic_kv(rng, batch, kv_heads, args.tokens, head_dim) for _ in range(args.layers)))
    queries = rng.normal(0, 1, size=(batch, q_heads, min(q_len, args.tokens), head_dim)).astype(np.float16)
    print(f"lmcache demo: {args.layers} layers x {kv_heads} KV heads x {args.tokens} tokens x head_dim {head_dim}, "
          f"float16, {q_heads} query heads attending with the last {queries.shape[2]} tokens "
          f"(backend {args.backend}, group 64, residual 128)")
    rows = [measure(args.backend, bits, ks, vs, queries) for bits in (None, 8, 4, 2)]
    dense = rows[0]["nbytes"]
    header = (f"{'bits':>5} {'KV bytes':>12} {'saved':>8} {'ratio':>7} {'attention rel. error':>21} "
              f"{'update+attend':>14}")
    print(header)
    print("-" * len(header))
    for r in rows:
        saved = 1 - r["nbytes"] / dense
        print(f"{'fp16' if r['bits'] is None else r['bits']:>5} {r['nbytes']:>12,d} {saved:>8.1%} "
              f"{dense / r['nbytes']:>6.2f}x {r['attn_rel_err']:>21.2e} {r['seconds']:>13.3f}s")
    print("attention rel. error: ||out - exact|| / ||exact||, exact = float32 attention over the uncompressed KV")
    return 0
