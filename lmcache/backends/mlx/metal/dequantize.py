"""Unpack + dequantize as a Metal kernel, mirrored by ``ops.dequantize``.

One thread per output element: it reads its byte, shifts its code out, and computes
``code * scale + lo`` in float32, the product rounded before the sum as in the reference
(``HEADER`` turns Metal's multiply-add contraction off), then casts to the output type.
"""

from __future__ import annotations

import functools
import math

import mlx.core as mx

from ....quant import QuantSpec
from . import HEADER, threadgroup_for

# Inputs: codes [rows, n, D / PER], scale, lo; n_rows, n_tokens. Template: O (output type),
# D, G, BITS, AXIS (1: groups along head_dim, per token; 2: groups along tokens, per channel).
SOURCE = """
    constexpr int PER = 8 / BITS;
    constexpr int QMAX = (1 << BITS) - 1;
    uint c = thread_position_in_grid.x;
    uint t = thread_position_in_grid.y;
    uint row = thread_position_in_grid.z;
    if (c >= uint(D) || t >= uint(n_tokens) || row >= uint(n_rows)) return;
    size_t tok = size_t(row) * n_tokens + t;
    uint packed = codes[tok * (D / PER) + c / PER];
    float code = float((packed >> (BITS * (c % PER))) & uint(QMAX));
    size_t si = AXIS == 2 ? (size_t(row) * (n_tokens / G) + t / G) * D + c : tok * (D / G) + c / G;
    float y = code * float(scale[si]);
    y = y + float(lo[si]);
    out[tok * D + c] = O(y);
"""


@functools.cache
def kernel():
    """The dequantize kernel, built once per process."""
    return mx.fast.metal_kernel(name="lmcache_dequantize", input_names=["codes", "scale", "lo", "n_rows", "n_tokens"],
                                output_names=["out"], source=SOURCE, header=HEADER)


def launch_params(shape: tuple) -> tuple[tuple[int, int, int], tuple[int, int, int]]:
    """``(grid, threadgroup)`` in threads for a dequantized output of ``shape`` ``[..., n, D]``."""
    *lead, n, d = (int(s) for s in shape)
    rows = math.prod(lead)
    grid = (d, n, rows)
    return grid, threadgroup_for(grid)


def dequantize(codes: mx.array, scale: mx.array, lo: mx.array, spec: QuantSpec, dtype) -> mx.array:
    """Unpack and dequantize on the GPU; same contract as ``ops.dequantize``."""
    *lead, n, p = codes.shape
    d = p * spec.per_byte
    rows = math.prod(lead)
    grid, tg = launch_params((*lead, n, d))
    template = [("O", dtype), ("D", d), ("G", spec.group_size), ("BITS", spec.bits),
                ("AXIS", 1 if spec.axis == -1 else 2)]
    (out,) = kernel()(inputs=[codes, scale, lo, rows, n], template=template, grid=grid, threadgroup=tg,
                      output_shapes=[(*lead, n, d)], output_dtypes=[dtype])
    return out
