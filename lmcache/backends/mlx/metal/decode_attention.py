"""Fused decode attention over packed K/V as a Metal kernel (flash-decoding partials).

One SIMD group of 32 threads per (batch, query head, chunk of ``chunk`` tokens). Each
thread owns head_dim channels ``lane, lane + 32, ...``: per token it dequantizes its key
channels in registers, ``simd_sum`` gives the score, and an online softmax accumulates its
value channels, so the packed codes are read once and never written out dequantized. The
kernel returns per-chunk partials ``(o, m, l)``; ``decode_partial`` merges the chunks with
MLX ops and the backend merges blocks and the full-precision residual the same way
(``ops.combine``). Mirrored by ``ops.decode_partial_quantized``.
"""

from __future__ import annotations

import functools

import mlx.core as mx

from ....quant import QuantSpec
from . import HEADER

#: Tokens per SIMD group. Unmeasured (no Apple GPU on the CI machine): small enough that a
#: decode step over a few thousand tokens still spreads over every GPU core, large enough
#: that the chunk merge stays a small fraction of the work. Tune on hardware.
CHUNK = 128
SIMD = 32

# Inputs: q [B, Hq, D] float32 (unscaled, already rotated); k_codes [B, Hkv, T, D / KPER],
# k_scale/k_lo [B, Hkv, T / KG, D]; v_codes [B, Hkv, T, D / VPER], v_scale/v_lo
# [B, Hkv, T, D / VG]; n_q_heads, n_kv_heads, n_tokens, chunk, n_chunks, sm_scale.
# Template: T (the cache's dtype: each dequantized value is rounded to it, as ``update``
# returns it), D, KBITS, KG, VBITS, VG. Outputs o [B, Hq, C, D], m/l [B, Hq, C] float32.
SOURCE = """
    constexpr int KPER = 8 / KBITS;
    constexpr int KQ = (1 << KBITS) - 1;
    constexpr int VPER = 8 / VBITS;
    constexpr int VQ = (1 << VBITS) - 1;
    constexpr int CPL = (D + 31) / 32;
    uint lane = thread_position_in_threadgroup.x;
    uint hq = thread_position_in_grid.y;
    uint bc = thread_position_in_grid.z;
    uint b = bc / uint(n_chunks);
    uint ch = bc % uint(n_chunks);
    uint hkv = hq / uint(n_q_heads / n_kv_heads);
    size_t kvrow = size_t(b) * n_kv_heads + hkv;
    size_t qo = (size_t(b) * n_q_heads + hq) * D;
    float qv[CPL];
    float acc[CPL];
    for (int j = 0; j < CPL; ++j) {
        uint c = lane + 32 * j;
        qv[j] = c < uint(D) ? float(q[qo + c]) : 0.0f;
        acc[j] = 0.0f;
    }
    float m_run = -metal::numeric_limits<float>::infinity();
    float l_run = 0.0f;
    int t0 = int(ch) * chunk;
    int t1 = metal::min(t0 + chunk, int(n_tokens));
    for (int t = t0; t < t1; ++t) {
        size_t tok = kvrow * n_tokens + t;
        float part = 0.0f;
        for (int j = 0; j < CPL; ++j) {
            uint c = lane + 32 * j;
            if (c < uint(D)) {
                uint packed = k_codes[tok * (D / KPER) + c / KPER];
                float code = float((packed >> (KBITS * (c % KPER))) & uint(KQ));
                size_t si = (kvrow * (n_tokens / KG) + t / KG) * D + c;
                part += qv[j] * float(T(code * float(k_scale[si]) + float(k_lo[si])));
            }
        }
        // Every lane runs every iteration, so the SIMD reduction sees all 32 lanes.
        float s = metal::simd_sum(part) * sm_scale;
        float m_new = metal::max(m_run, s);
        float corr = metal::exp(m_run - m_new);
        float p = metal::exp(s - m_new);
        l_run = l_run * corr + p;
        for (int j = 0; j < CPL; ++j) {
            uint c = lane + 32 * j;
            if (c < uint(D)) {
                uint packed = v_codes[tok * (D / VPER) + c / VPER];
                float code = float((packed >> (VBITS * (c % VPER))) & uint(VQ));
                size_t vi = tok * (D / VG) + c / VG;
                acc[j] = acc[j] * corr + p * float(T(code * float(v_scale[vi]) + float(v_lo[vi])));
            }
        }
        m_run = m_new;
    }
    size_t po = (size_t(b) * n_q_heads + hq) * n_chunks + ch;
    for (int j = 0; j < CPL; ++j) {
        uint c = lane + 32 * j;
        if (c < uint(D)) o[po * D + c] = acc[j];
    }
    if (lane == 0) {
        m[po] = m_run;
        l[po] = l_run;
    }
"""

_INPUTS = ["q", "k_codes", "k_scale", "k_lo", "v_codes", "v_scale", "v_lo",
           "n_q_heads", "n_kv_heads", "n_tokens", "chunk", "n_chunks", "sm_scale"]


@functools.cache
def kernel():
    """The decode attention kernel, built once per process."""
    return mx.fast.metal_kernel(name="lmcache_decode_attention", input_names=_INPUTS,
                                output_names=["o", "m", "l"], source=SOURCE, header=HEADER)


def launch_params(batch: int, q_heads: int, n_tokens: int, chunk: int = CHUNK):
    """``(grid, threadgroup, n_chunks)`` for ``batch`` x ``q_heads`` queries over ``n_tokens``.

    One 32-thread SIMD group per (query head, batch x chunk); ``n_chunks = ceil(n_tokens / chunk)``.
    """
    if min(batch, q_heads, n_tokens, chunk) < 1:
        raise ValueError(f"batch, q_heads, n_tokens and chunk must be positive, "
                         f"got {batch}, {q_heads}, {n_tokens}, {chunk}")
    n_chunks = -(-n_tokens // chunk)
    return (SIMD, q_heads, batch * n_chunks), (SIMD, 1, 1), n_chunks


def decode_partial(q: mx.array, kq: tuple, k_spec: QuantSpec, vq: tuple, v_spec: QuantSpec, scale: float,
                   dtype=mx.float32, chunk: int = CHUNK) -> tuple[mx.array, mx.array, mx.array]:
    """Single-query attention partial over packed K/V on the GPU; contract of ``ops.decode_partial_quantized``.

    ``q``: float32 ``[B, Hq, D]``; ``kq``/``vq``: ``(codes, scale, lo)`` with keys grouped
    along tokens (``k_spec.axis == -2``) and values along head_dim. Returns float32
    ``(o [B, Hq, D], m [B, Hq], l [B, Hq])``.
    """
    b, hq, d = q.shape
    hkv, t = kq[0].shape[1], kq[0].shape[2]
    grid, tg, n_chunks = launch_params(b, hq, t, chunk)
    template = [("T", dtype), ("D", d), ("KBITS", k_spec.bits), ("KG", k_spec.group_size), ("VBITS", v_spec.bits),
                ("VG", v_spec.group_size)]
    o, m, l_ = kernel()(inputs=[q, *kq, *vq, hq, hkv, t, chunk, n_chunks, float(scale)], template=template,
                        grid=grid, threadgroup=tg,
                        output_shapes=[(b, hq, n_chunks, d), (b, hq, n_chunks), (b, hq, n_chunks)],
                        output_dtypes=[mx.float32, mx.float32, mx.float32])
    if n_chunks == 1:
        return o[:, :, 0], m[..., 0], l_[..., 0]
    m_all = m.max(axis=-1)
    w = mx.exp(m - m_all[..., None])
    return (o * w[..., None]).sum(axis=-2), m_all, (l_ * w).sum(axis=-1)
