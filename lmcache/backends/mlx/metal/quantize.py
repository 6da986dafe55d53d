"""Quantize + pack as a Metal kernel (DESIGN.md format), mirrored by ``ops.quantize``.

Two sources, one per grouping axis, because the packing runs along head_dim either way:

* ``axis=-1`` (values: groups of ``G`` channels of one token): one thread per token row.
  A group need not start on a byte boundary (``G`` odd at 2 or 4 bits), so one thread
  owning the whole row is what keeps the byte writes free of races.
* ``axis=-2`` (keys: groups of ``G`` tokens of one channel): one thread per (byte column,
  token group, row): it quantizes the ``8 // BITS`` channels that share its bytes.

Both round the scale and offset to the storage type ``S`` before computing the codes, use
``precise::divide`` (an IEEE division, as numpy's) and ``rint`` (half to even).
"""

from __future__ import annotations

import functools
import math

import mlx.core as mx

from ....quant import QuantSpec
from ..ops import storage_dtype
from . import HEADER, threadgroup_for

# Inputs: x [rows, D]; n_rows. Template: T (input), S (scale type), D, G, BITS.
SOURCE_CHANNELS = """
    constexpr int PER = 8 / BITS;
    constexpr int QMAX = (1 << BITS) - 1;
    uint row = thread_position_in_grid.x;
    if (row >= uint(n_rows)) return;
    // Offsets, not pointers: MLX passes a small input in the constant address space.
    size_t xo = size_t(row) * D;
    size_t co = size_t(row) * (D / PER);
    // Groups may share a byte with their neighbour: clear the row, then OR the codes in.
    for (int i = 0; i < D / PER; ++i) codes[co + i] = 0;
    for (int g0 = 0; g0 < D; g0 += G) {
        float lo_v = float(x[xo + g0]);
        float hi_v = lo_v;
        for (int i = 1; i < G; ++i) {
            float v = float(x[xo + g0 + i]);
            lo_v = metal::min(lo_v, v);
            hi_v = metal::max(hi_v, v);
        }
        S s_s = S(metal::precise::divide(hi_v - lo_v, float(QMAX)));
        S lo_s = S(lo_v);
        if (s_s == S(0)) s_s = S(1);
        size_t si = size_t(row) * (D / G) + g0 / G;
        scale[si] = s_s;
        lo[si] = lo_s;
        float s_f = float(s_s);
        float lo_f = float(lo_s);
        for (int i = 0; i < G; ++i) {
            float t = metal::precise::divide(float(x[xo + g0 + i]) - lo_f, s_f);
            t = metal::clamp(metal::rint(t), 0.0f, float(QMAX));
            int c = g0 + i;
            codes[co + c / PER] |= uint8_t(uint(t) << (BITS * (c % PER)));
        }
    }
"""

# Inputs: x [rows, n, D]; n_rows, n_groups (= n / G). Template: T, S, D, G, BITS.
SOURCE_TOKENS = """
    constexpr int PER = 8 / BITS;
    constexpr int QMAX = (1 << BITS) - 1;
    uint j = thread_position_in_grid.x;
    uint tg = thread_position_in_grid.y;
    uint row = thread_position_in_grid.z;
    if (j >= uint(D / PER) || tg >= uint(n_groups) || row >= uint(n_rows)) return;
    size_t n = size_t(n_groups) * G;
    size_t xo = size_t(row) * n * D;
    float s_f[PER];
    float lo_f[PER];
    for (int p = 0; p < PER; ++p) {
        int c = j * PER + p;
        float lo_v = float(x[xo + size_t(tg) * G * D + c]);
        float hi_v = lo_v;
        for (int i = 1; i < G; ++i) {
            float v = float(x[xo + (size_t(tg) * G + i) * D + c]);
            lo_v = metal::min(lo_v, v);
            hi_v = metal::max(hi_v, v);
        }
        S s_s = S(metal::precise::divide(hi_v - lo_v, float(QMAX)));
        S lo_s = S(lo_v);
        if (s_s == S(0)) s_s = S(1);
        size_t si = (size_t(row) * n_groups + tg) * D + c;
        scale[si] = s_s;
        lo[si] = lo_s;
        s_f[p] = float(s_s);
        lo_f[p] = float(lo_s);
    }
    for (int i = 0; i < G; ++i) {
        size_t t = size_t(tg) * G + i;
        uint packed = 0;
        for (int p = 0; p < PER; ++p) {
            float q = metal::precise::divide(float(x[xo + t * D + j * PER + p]) - lo_f[p], s_f[p]);
            q = metal::clamp(metal::rint(q), 0.0f, float(QMAX));
            packed |= uint(q) << (BITS * p);
        }
        codes[(size_t(row) * n + t) * (D / PER) + j] = uint8_t(packed);
    }
"""


@functools.cache
def kernel(axis: int):
    """The quantize kernel for grouping ``axis`` (-1 or -2), built once per process."""
    if axis == -1:
        return mx.fast.metal_kernel(name="lmcache_quantize_channels", input_names=["x", "n_rows"],
                                    output_names=["codes", "scale", "lo"], source=SOURCE_CHANNELS, header=HEADER)
    if axis == -2:
        return mx.fast.metal_kernel(name="lmcache_quantize_tokens", input_names=["x", "n_rows", "n_groups"],
                                    output_names=["codes", "scale", "lo"], source=SOURCE_TOKENS, header=HEADER)
    raise ValueError(f"axis must be -1 or -2, got {axis!r}")


def launch_params(shape: tuple, spec: QuantSpec) -> tuple[tuple[int, int, int], tuple[int, int, int]]:
    """``(grid, threadgroup)`` in threads for quantizing an array of ``shape`` ``[..., n, D]``."""
    *lead, n, d = (int(s) for s in shape)
    rows = math.prod(lead)
    if spec.axis == -1:
        grid = (rows * n, 1, 1)
    else:
        grid = (d // spec.per_byte, n // spec.group_size, rows)
    return grid, threadgroup_for(grid)


def quantize(x: mx.array, spec: QuantSpec) -> tuple[mx.array, mx.array, mx.array]:
    """Quantize and pack ``x`` ``[..., n, D]`` on the GPU; same contract as ``ops.quantize``."""
    *lead, n, d = x.shape
    sdt = storage_dtype(x.dtype)
    g = spec.group_size
    grid, tg = launch_params(x.shape, spec)
    template = [("T", x.dtype), ("S", sdt), ("D", d), ("G", g), ("BITS", spec.bits)]
    rows = math.prod(lead)
    if spec.axis == -1:
        inputs = [x.reshape(rows * n, d), rows * n]
        sshape = (*lead, n, d // g)
    else:
        inputs = [x.reshape(rows, n, d), rows, n // g]
        sshape = (*lead, n // g, d)
    codes, scale, lo = kernel(spec.axis)(
        inputs=inputs, template=template, grid=grid, threadgroup=tg,
        output_shapes=[(*lead, n, d // spec.per_byte), sshape, sshape],
        output_dtypes=[mx.uint8, sdt, sdt])
    return codes, scale, lo
