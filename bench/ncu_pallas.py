"""One call of the Pallas int8 decode kernel at the benchmark shape, to run under Nsight Compute (GPU).

    ncu --clock-control none -k regex:decode_int8 --launch-skip 2 --launch-count 1 \\
        --section WarpStateStats --section SourceCounters -o p4 python bench/ncu_pallas.py 4 splits=17
    ncu -i p4.ncu-rep --page source --csv --print-source sass > p4.csv  # per SASS instruction

Batch 16 x 40 heads x 128 channels, 32640 quantized tokens (as ``bench/decode_attention_jax.py``
lays out a 32K cache), one query token; random codes, scales and offsets (the kernel's work does
not depend on their values except through rare flushes). The kernel runs three times, so
``--launch-skip 2`` profiles a warm call. Settings after the bits are keyword arguments of
``decode_int8.decode_attention`` (integers, or text; ``kernel=lanes``: ``decode_lanes``). With
``NCU_PALLAS_TIME=1`` it also prints the time per call. ``inputs`` also serves ``bench/ab_pallas.py``.
"""

from __future__ import annotations

import os
import sys
import time

import jax
import jax.numpy as jnp

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from lmcache.backends.jax.pallas import decode_int8 as ki8  # noqa: E402
from lmcache.backends.jax.pallas import decode_lanes as dl  # noqa: E402

B, H, D, T, GROUP = 16, 40, 128, 32640, 64


def inputs(bits: int, b: int = B, t: int = T) -> tuple:
    """(q, k_codes, k_scale, k_lo, v_codes, v_scale, v_lo) of batch ``b`` and ``t`` tokens, random."""
    keys = jax.random.split(jax.random.key(0), 5)
    w = D * bits // 8
    # One batch row at a time: a random int32 array of more than 2**31 elements (8-bit, batch 16 /
    # 32K) made XLA fault with an illegal address on the H200.
    codes = lambda k: jnp.concatenate([jax.random.randint(kr, (1, H, t, w), 0, 256, jnp.int32).astype(jnp.uint8)
                                       for kr in jax.random.split(k, b)])
    ks = jax.random.uniform(keys[2], (b, H, t // GROUP, D), jnp.float16, 0.01, 0.1)
    vs = jax.random.uniform(keys[3], (b, H, t, D // GROUP), jnp.float16, 0.01, 0.1)
    q = jax.random.normal(keys[4], (b, H, D), jnp.float16)
    return jax.block_until_ready((q, codes(keys[0]), ks, -8 * ks, codes(keys[1]), vs, -8 * vs))


def parse(setting: str) -> tuple:
    """``"kernel=lanes,a=1,b=x"`` -> (the kernel module, ``{"a": 1, "b": "x"}``); the module is
    ``decode_int8`` unless ``kernel=lanes`` names ``decode_lanes``."""
    cfg = {}
    for item in filter(None, setting.split(",")):
        name, value = item.split("=")
        cfg[name] = int(value) if value.lstrip("-").isdigit() else value
    return {"int8": ki8, "lanes": dl}[cfg.pop("kernel", "int8")], cfg


def main() -> None:
    bits = int(sys.argv[1])
    mod, cfg = parse(sys.argv[2] if len(sys.argv) > 2 else "")
    args = inputs(bits)
    f = jax.jit(lambda *a: mod.decode_attention(*a, k_bits=bits, v_bits=bits, **cfg))
    for _ in range(3):
        out = jax.block_until_ready(f(*args))
    if os.environ.get("NCU_PALLAS_TIME"):
        t0 = time.perf_counter()
        for _ in range(50):
            out = f(*args)
        jax.block_until_ready(out)
        print(f"{bits}-bit {cfg}: {(time.perf_counter() - t0) / 50 * 1e3:.3f} ms per call", flush=True)


if __name__ == "__main__":
    main()
