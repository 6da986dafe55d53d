"""Fused decode attention over the compressed cache, split along the sequence (flash-decoding).

Kernels over the same partial-result format, all reading the packed codes where they lie
(never writing a dequantized copy of the cache). The common decode step on NVIDIA GPUs, 4- or
8-bit K and V at head dim 128 and a few query rows per KV head, goes to the integer matrix-unit
kernel of ``decode_imma`` (``decode_mma``, float16 matrix units for 4-bit codes, stays for when
``CONFIG["imma"]`` is off); the three here take the rest:

``_decode_qrows_kernel`` (a few query rows per KV head over a segment quantized on both sides,
float16/bfloat16 scales, the layouts the matrix-unit kernels do not take): one program per query row and split. A small
``_key_operands_kernel`` first writes, per query row and key group, the scaled query
``a = q * scale * 2**-e_j`` field-major (each field's operands load as one vector in the layout
of the code words) and the group's constant. Fields are shifted, a run of neighbours at a time,
to bits ``e_j`` high in the mantissa and OR-ed into the bits of 2**23 (``_field_hi``): the float
is ``2**23 + code * 2**e_j``, so ``a * field = q * scale * (2**(23 - e_j) + code)`` and the
constants come off once per group (keys) or once per split (values) instead of once per code:
one LOP3 and one fused multiply-add per code, and a shift per run (3 per 4-bit word for keys,
4 for values). Values keep one running output per token slot; a tile's scales load with its
words when the next tile is prefetched.

``_decode_rows_kernel`` (the same rows over segments with a dense side, or float32 scales): one program
per query row and split, no matrix units. Codes are read as 32-bit words and turned into
floats without the slow int-to-float conversion: a field masked in place and OR-ed with
the exponent of 2**23 is the float ``2**23 + code * 2**e``; subtracting 2**23 leaves
``code * 2**e`` exactly, and the power of two is folded into the query (keys) or applied
once at the end (values). Keys go one field at a time through a chain of fused
multiply-adds, ``q . (c * s + lo) = (q * s) . c + q . lo`` (a tile lies inside one key group).
Values: each of the ``BLOCK_N`` token slots of a tile keeps its own running output, so the
loop never reduces across threads except for one max per tile (reducing every tile over its
tokens measured 1.7x slower). The accumulators are rescaled only when the running max grows.

``_decode_kernel`` (many query rows: grouped heads x several query tokens): one program
handles one (sequence, KV head) pair, every query row of that head (padded to 16 for the
tensor cores), and one split of the sequence's tiles:

* keys (grouped per channel over ``GK`` tokens): a tile of ``BLOCK_N <= GK`` tokens shares one
  scale and offset per channel, so ``q . (c * s + lo) = (q * s) . c + q . lo``: the query is
  scaled once per tile and the codes go straight into the matrix product. The nibbles of a
  byte go to separate rows (phase-major order), matching a query loaded in the same order;
* values (grouped per token over ``GV`` channels): ``p @ (c * s + lo) = (p * s) @ c + p @ lo``
  per channel group, as a batched product over (nibble phase, group).

Each split writes its running max, sum and unnormalised output; ``_Partials.combine`` merges them.
A segment is a (K block, V block) pair of the cache, a dense residual, or a paged pool
reached through a block table; ``attend_view`` runs one launch per segment.
"""

from __future__ import annotations

import functools
import math
import os
from contextlib import nullcontext

import torch
import triton
import triton.language as tl

from ...base import KVView, QuantBlock
from . import is_pow2

_LOG2E = 1.4426950408889634
# Splits are chosen for about CONFIG["programs_per_sm"] programs per multiprocessor (so one
# long sequence still fills the GPU), each streaming at least this many tiles.
_MIN_TILES_PER_SPLIT = 8
# Launch settings, measured on one H200 (bench/decode_attention.py, torch 2.11, Triton 3.6,
# 2026-11-28; its sweep is in bench/results/decode_attention-NVIDIA-H200.json, the same-process
# comparison with the previous kernels in decode_attention-ab-NVIDIA-H200.json). Batch 16 x 40
# heads x 32K tokens, one query row per KV head. 4-bit: the matrix-unit kernel (decode_mma)
# 1.48 ms with 128 programs per SM (1.62 with 64; with prefetch 1.73), the qrows kernel at its
# best 1.84 ms (1 warp, 8-token tiles), the previous qrows kernel 1.83-2.0 ms, the row kernel
# 3.7 ms. 8-bit: qrows with 2 warps / 32 tokens and prefetch 2.28 ms (4 warps 2.38; the
# previous kernel 2.57). Matrix-unit kernel for many rows: 4 warps, no pipelining, 64-token
# tiles; it runs from 3 query rows per KV head (GQA 40/8, 4 query tokens: 3.25 ms, the row
# kernel 5.0 ms).
CONFIG = {
    # 128: decode_imma with shared-memory stages, one tile per step, 12 resident programs per SM
    # (4-bit 0.793 ms at 128; 8-bit 1.332, 1.327 at 96). With two tiles per step and no stages it
    # was best at 64 (4-bit 0.819 ms at 64, 0.842 at 128, 0.904 at 256; 8-bit 1.352 / 1.354 / 1.388).
    "programs_per_sm": 128,
    "rows_max": 2,  # query rows per KV head up to which the row kernels run
    "rows": {"num_warps": 2, "num_stages": 2, "block_n": 32, "qrows": True},
    # segments quantized on both sides (float16/bfloat16 scales), when "rows" has "qrows";
    # "mma": 4-bit K and V with head dim 128 take decode_mma's matrix-unit kernel instead
    "qrows": {"num_warps": 1, "num_stages": 2, "block_n": 8, "prefetch": False, "mma": True},
    "qrows8": {"num_warps": 2, "num_stages": 1, "block_n": 32, "prefetch": True},  # either side 8-bit
    "dot": {"num_warps": 4, "num_stages": 1, "block_n": 64},
    # 4- and 8-bit K and V with head dim 128 (one or two query rows per KV head) take
    # decode_imma's integer matrix-unit kernel before any of the above. Same shape, one process
    # (decode_imma-ab-NVIDIA-H200.json, two cards): 4-bit 1.21-1.26 ms with one tile's loads
    # issued at a time (two at a time 1.43-1.50: 220 registers), the first version 1.33-1.62;
    # 8-bit 1.72-1.96 ms (the first version 1.74-1.94; qrows 2.50-2.56 in earlier runs).
    # Programs per SM 64-256 within 5%. Registers 154 -> 124 (16 one-warp programs per SM) by
    # keeping the output in memory between folds: no change in time.
    # Its loads and key operands (the other schedules measured are in bench/NOTES-decode-kernels.md
    # and were removed in the seventh session): the next step's key words an iteration ahead of
    # its key product (4-bit 1.14 ms against 1.18 at the top of each iteration and 1.30-1.48 with
    # the value words too, at 128 programs per SM); the key B registers made in the kernel from the
    # key scales every step (4-bit 0.854 ms, one tile per step) rather than by a pre-kernel through
    # memory (0.920) or once per key group (0.872).
    "imma": True,
    # decode_imma's 32-token tiles per loop step under one softmax step (1 or 2), by the wider
    # side's bits (2 with key groups of 64 or more): more bytes in flight per warp. Two
    # (238 registers at 4-bit / 255 at 8-bit), same run, 64 programs per SM: 4-bit 0.819 ms (one
    # tile per step 0.840), 8-bit 1.352 (1.420). Register caps that allow more programs per SM were
    # slower (4-bit 0.834 at 224, 0.871 at 200; 8-bit spills). Four tiles per step (eighth session)
    # spill at 255 registers: 4-bit 1.18-1.22 ms against 0.812 (bench/NOTES-decode-kernels.md).
    # With shared-memory stages (below) one tile per step is faster: its 128 and 164 registers
    # (12 programs per SM) against 168 and 216 with two (ninth session, bench/NOTES-decode-kernels.md).
    "imma_step": {4: 1, 8: 1},
    # decode_imma on sm_90: the tiles of the loop step this many steps ahead brought into L2 by
    # one bulk prefetch per tile and side (0: none). One H200, one process, three runs: 4-bit
    # 0.811 / 0.811 / 0.818 ms at 1 against 0.820 / 0.819 / 0.832 at 0; 2: 0.839, 4: 1.07 (what is
    # fetched early is evicted before it is read). 8-bit: 1.378 / 1.390 at 1 against 1.355 / 1.383.
    # The evict-first hint or .cg on the loads made it slower (bench/results/decode_imma-ab-*).
    # With the stages below, 0: the prefetch one or two steps beyond them was slower (4-bit 0.825 /
    # 0.849 ms against 0.818 at 16 resident programs; 8-bit 1.463 / 1.762 against 1.327).
    "imma_l2_ahead": {4: 0, 8: 0},
    # decode_imma on sm_90: 0, or the loop reads its tiles from a ring of this many stages in shared
    # memory that the TMA unit fills (stages - 1 loop steps ahead): bytes on their way wait in
    # shared memory, not in registers. One H200, one process, batch 16 / 32K, one tile per step:
    # 4-bit 0.793 ms at 3 stages (163 registers, 12 programs per SM), 0.870 at 2, 0.804 at 4 (96 per
    # SM), 0.818 at 3 capped to 128 registers (16 per SM); two tiles per step without stages and
    # with the L2 prefetch 0.823. 8-bit 1.327 at 2 stages against 1.366 (ninth session).
    "imma_stages": {4: 3, 8: 2},
    # decode_imma: 0, or a cap on its registers per thread, for more programs per SM.
    "imma_maxnreg": {4: 0, 8: 0},
    # decode_imma's grid (splits, rows) rather than (rows, splits): the splits of a row are launched
    # one after another, not the same split of every row, so the programs resident at once read
    # fewer rows, at more places in each. Batch 16 / 32K, one process: on one H200 4-bit 0.780 ->
    # 0.769 ms at 64 programs per SM, 0.791 -> 0.781 at 128, 8-bit 1.304 -> 1.312 at 128; on another
    # 4-bit 0.765 -> 0.767 at 64, 8-bit 1.277 -> 1.287 (bench/results/decode_imma-ab-splits-fast-,
    # -splits-fast-card2-NVIDIA-H200.json): a candidate of the timing below, not the default.
    "imma_splits_fast": {4: False, 8: False},
    # decode_imma: 0, or (percent, div): about that percent of each row's tiles in short splits of
    # 1 / div of the others' tiles, launched last. Equal splits leave the last wave of programs
    # part-full, and a lone program cannot go faster than its dependent chain per tile: batch 16 /
    # 32K, 4-bit, 11 / 13 / 14 / 15 / 16 splits per row (51 / 64 / 66 / 70 / 75 programs per SM, 4.4 /
    # 5.3 / 5.7 / 6.1 / 6.5 waves of 12 per SM) took 0.786 / 0.760 / 0.760 / 0.784 / 0.774 ms
    # (decode_imma-ab-pps-fine-NVIDIA-H200.json). Short splits last fill in what the long ones leave:
    # on two other cards 4-bit 0.780-0.782 -> 0.769-0.770 ms at 64 programs per SM with (10, 2) and
    # at 51 with (20, 4), 8-bit 1.305-1.306 (128 per SM) -> 1.290-1.291 at 51 with (10, 4)
    # (decode_imma-ab-tail-, -tail-card2-NVIDIA-H200.json). Candidates of the timing below.
    "imma_tail": {4: 0, 8: 0},
    # Quantized tokens (summed over the batch) from which the dense segments of a decode call run on
    # a second stream, beside the quantized ones (0: never).
    "dense_side_tokens": 1 << 17,
    # Fewest tiles per split of a dense (float16) segment such as the recent-token residual:
    # fewer splits mean fewer partials to merge, more mean more programs for a short segment.
    # The 128-token residual at batch 16: 27.6 us as one split (8), 16.0 us as four (1).
    "dense_min_tiles": 1,
    # decode_imma takes the query as given and scales it itself: no kernel runs before it. The
    # float32 scaled query the other kernels take is then made on the side stream, where only the
    # dense residual needs it, and the residual's kernel overlaps the quantized one better. Batch
    # 16 / 32K, one process (tenth session): 4-bit 0.782 -> 0.772 ms, 8-bit 1.302 -> 1.294
    # (bench/results/decode_imma-ab-query-NVIDIA-H200.json); on another card the call 797.0 -> 777.6
    # us, of which the residual 7.5 us where it was 17.8 (breakdown_imma-NVIDIA-H200.json).
    "imma_scales_query": True,
    # decode_imma settings timed against the defaults above (``imma_step``, ``imma_l2_ahead``,
    # ``imma_stages``, ``imma_splits_fast``, ``imma_tail`` by the wider side's bits, ``programs_per_sm``)
    # on the first call of each class of problem (device, widths, rows, length) with at least
    # ``imma_tune_tokens`` quantized tokens over the batch; the fastest is kept (``autotune.py``). Two
    # tiles per step with the L2 prefetch at 4 bits, against the stages, batch 16 / 32K, same process
    # on three H200s: 0.766 / 0.759 / 0.810 ms against 0.770 / 0.777 / 0.776
    # (bench/results/decode_imma-ab-prologue-regs-, -live-,
    # -live-card2-NVIDIA-H200.json). The same at 8 bits without the L2 prefetch: 1.315-1.323 ms
    # against 1.275-1.304 at batch 16 / 32K; grouped-query shapes may differ. The stages at 64
    # programs per SM, 4-bit: 0.768 ms against 0.777 at 128 (96: 0.785, 160: 0.784) on a fourth card,
    # where two tiles per step took 0.820 (decode_imma-ab-pps-staged-NVIDIA-H200.json). Then the
    # stages at 64 with the other grid order (``imma_splits_fast``) and with short splits last
    # (``imma_tail``), above.
    "imma_tune": {4: [{"imma_step": 2, "imma_l2_ahead": 1, "imma_stages": 0, "programs_per_sm": 64},
                      {"programs_per_sm": 64}, {"programs_per_sm": 64, "imma_splits_fast": True},
                      {"programs_per_sm": 64, "imma_tail": (10, 2)}, {"programs_per_sm": 51, "imma_tail": (20, 4)}],
                  8: [{"imma_step": 2, "imma_l2_ahead": 0, "imma_stages": 0, "programs_per_sm": 64},
                      {"programs_per_sm": 51, "imma_tail": (10, 4)}, {"programs_per_sm": 64, "imma_tail": (10, 4)}]},
    "imma_tune_tokens": 1 << 17,
}
# decode_imma settings (overrides of the defaults) imposed while autotune times them
_FORCED: dict | None = None
_MAGIC = tl.constexpr(0x4B000000)  # the bits of float 2**23
_MAGIC_F = tl.constexpr(8388608.0)


@triton.jit
def _codes_f16(c):
    """int32 codes below 1024 as float16, exactly, with no int-to-float conversion.

    OR-ing a code into the mantissa of 1024.0 (bits 0x6400) gives 1024 + code, and the
    subtraction of 1024 is exact: the slow converter (a quarter of the multiply-add rate)
    is never used.
    """
    return (c | 0x6400).to(tl.int16).to(tl.float16, bitcast=True) - 1024.0


@triton.jit
def _tile_bases(n0, b, h, tbl_ptr, stbl_b, skc_b, skc_h, sks_b, sks_h, svc_b, svc_h, svs_b, svs_h,
                PAGED: tl.constexpr, PAGE: tl.constexpr):
    """Where the tile starting at token ``n0`` of (sequence ``b``, KV head ``h``) lies.

    Returns ``(loc, k_base, ks_base, v_base, vs_base)``: the tile's first token within its
    row (its page, when ``PAGED``: the page comes from the block table) and the element
    offsets of that row of the key codes, key scales, value codes and value scales.
    """
    if PAGED:
        row = tl.load(tbl_ptr + b * stbl_b + n0 // PAGE).to(tl.int64)
        loc = n0 % PAGE
    else:
        row = b.to(tl.int64)
        loc = n0
    return (loc, row * skc_b + h * skc_h, row * sks_b + h * sks_h, row * svc_b + h * svc_h,
            row * svs_b + h * svs_h)


@triton.jit
def _decode_kernel(q_ptr, kc_ptr, ks_ptr, kl_ptr, vc_ptr, vs_ptr, vl_ptr, o_ptr, m_ptr, l_ptr, tbl_ptr, len_ptr,
                   skc_b, skc_h, skc_t, sks_b, sks_h, sks_t, svc_b, svc_h, svc_t, svs_b, svs_h, svs_t, stbl_b,
                   T, QOFF, tiles_per_split, split_base, Hkv, M, L,
                   D: tl.constexpr, KBITS: tl.constexpr, VBITS: tl.constexpr, GK: tl.constexpr, GV: tl.constexpr,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, PAGED: tl.constexpr, PAGE: tl.constexpr,
                   F32: tl.constexpr):
    bh = tl.program_id(0)
    split = tl.program_id(1)
    b = bh // Hkv
    h = bh % Hkv
    rows = tl.arange(0, BLOCK_M)
    row_ok = rows < M
    qpos = QOFF + rows % L  # last token each query row may see
    if PAGED:
        T = tl.load(len_ptr + b)
        qpos = qpos + T
    n_tiles = tl.cdiv(T, BLOCK_N)
    t_lo = split * tiles_per_split
    t_hi = tl.minimum(t_lo + tiles_per_split, n_tiles)
    offs_n = tl.arange(0, BLOCK_N)

    # ---- the query rows, in the order the key codes unpack to
    PK: tl.constexpr = 8 // KBITS if KBITS > 0 else 1
    WK: tl.constexpr = D // PK
    cols = tl.arange(0, D)
    kch = (cols % WK) * PK + cols // WK  # channel of phase-major column: byte w, nibble i
    q = tl.load(q_ptr + (bh * M + rows[:, None]) * D + kch[None, :], mask=row_ok[:, None], other=0.0)

    m_i = tl.full([BLOCK_M], -1.0e30, tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    PV: tl.constexpr = 8 // VBITS if VBITS > 0 else 1
    NG: tl.constexpr = D // GV if VBITS > 0 else 1
    WG: tl.constexpr = GV // PV if VBITS > 0 else D
    if VBITS > 0:
        acc = tl.zeros([PV * NG, BLOCK_M, WG], tl.float32)
        acc_lo = tl.zeros([NG, BLOCK_M], tl.float32)
    else:
        acc = tl.zeros([BLOCK_M, D], tl.float32)
        acc_lo = tl.zeros([NG, BLOCK_M], tl.float32)

    for tile in range(t_lo, t_hi):
        n0 = tile * BLOCK_N
        loc, k_base, ks_base, v_base, vs_base = _tile_bases(n0, b, h, tbl_ptr, stbl_b, skc_b, skc_h, sks_b, sks_h,
                                                            svc_b, svc_h, svs_b, svs_h, PAGED, PAGE)
        tok = loc + offs_n
        tok_ok = (n0 + offs_n) < T

        # ---- scores, base 2 (q carries scale * log2(e))
        if KBITS > 0:
            wk = tl.arange(0, WK)
            # Loaded token-major (16-byte loads along the packed row), transposed for the product.
            byt = tl.load(kc_ptr + k_base + tok[:, None] * skc_t + wk[None, :], mask=tok_ok[:, None], other=0)
            ph = tl.arange(0, PK) * KBITS
            c = (byt.to(tl.int32)[:, None, :] >> ph[None, :, None]) & (2 ** KBITS - 1)  # [N, PK, WK]
            c = tl.trans(tl.reshape(c, [BLOCK_N, D]))
            sk_off = ks_base + (loc // GK) * sks_t + kch
            sk = tl.load(ks_ptr + sk_off).to(tl.float32)
            lk = tl.load(kl_ptr + sk_off).to(tl.float32)
            qs = q * sk[None, :]
            bias = tl.sum(q * lk[None, :], axis=1)
            if F32:  # float32 caches: exact products, as the reference
                s = tl.dot(qs, c.to(tl.float32), input_precision="ieee") + bias[:, None]
            else:  # q * scale rounds once; codes enter as 1024 + code (see _codes_f16), the 1024s come off after
                s = tl.dot(qs.to(tl.float16), _codes_f16(c)) + bias[:, None]
        else:
            k = tl.load(kc_ptr + k_base + tok[None, :] * skc_t + cols[:, None], mask=tok_ok[None, :], other=0.0)
            s = tl.dot(q, k.to(tl.float32), input_precision="ieee")
        ok = tok_ok[None, :] & ((n0 + offs_n)[None, :] <= qpos[:, None])
        s = tl.where(ok, s, float("-inf"))

        # ---- online softmax
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        alpha = tl.math.exp2(m_i - m_new)
        p = tl.math.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        m_i = m_new

        # ---- values
        if VBITS > 0:
            g = tl.arange(0, NG)
            w = tl.arange(0, WG)
            vb = tl.load(vc_ptr + v_base + tok[None, :, None] * svc_t + (g[:, None, None] * WG + w[None, None, :]),
                         mask=tok_ok[None, :, None], other=0)  # [NG, N, WG]
            vph = tl.arange(0, PV) * VBITS
            cv = (vb.to(tl.int32)[None] >> vph[:, None, None, None]) & (2 ** VBITS - 1)  # [PV, NG, N, WG]
            cv = tl.reshape(cv, [PV * NG, BLOCK_N, WG])
            vs_off = vs_base + tok[None, :] * svs_t + g[:, None]  # [NG, N]
            sv = tl.load(vs_ptr + vs_off, mask=tok_ok[None, :], other=0.0).to(tl.float32)
            lv = tl.load(vl_ptr + vs_off, mask=tok_ok[None, :], other=0.0).to(tl.float32)
            ps = p[None, :, :] * sv[:, None, :]  # [NG, M, N]
            ps = tl.reshape(tl.broadcast_to(ps[None], [PV, NG, BLOCK_M, BLOCK_N]), [PV * NG, BLOCK_M, BLOCK_N])
            if F32:
                pv = tl.dot(ps, cv.to(tl.float32), input_precision="ieee")
            else:
                pv = tl.dot(ps.to(tl.float16), _codes_f16(cv))
            acc = acc * alpha[None, :, None] + pv
            acc_lo = acc_lo * alpha[None, :] + tl.sum(p[None, :, :] * lv[:, None, :], axis=2)
        else:
            v = tl.load(vc_ptr + v_base + tok[:, None] * svc_t + cols[None, :], mask=tok_ok[:, None], other=0.0)
            acc = acc * alpha[:, None] + tl.dot(p, v.to(tl.float32), input_precision="ieee")

    # ---- this split's partial result
    ps_idx = (split_base + split) * tl.num_programs(0) + bh
    tl.store(m_ptr + ps_idx * M + rows, m_i, mask=row_ok)
    tl.store(l_ptr + ps_idx * M + rows, l_i, mask=row_ok)
    o_base = o_ptr + ps_idx * M * D
    if VBITS > 0:
        j = tl.arange(0, PV * NG)
        ch = (j % NG)[:, None, None] * GV + tl.arange(0, WG)[None, None, :] * PV + (j // NG)[:, None, None]
        lo_b = tl.broadcast_to(acc_lo[None], [PV, NG, BLOCK_M])
        out = acc + tl.reshape(lo_b, [PV * NG, BLOCK_M])[:, :, None]
        tl.store(o_base + rows[None, :, None] * D + ch, out, mask=row_ok[None, :, None])
    else:
        tl.store(o_base + rows[:, None] * D + cols[None, :], acc, mask=row_ok[:, None])


@triton.jit
def _fields(words, BITS: tl.constexpr, PW: tl.constexpr):
    """Codes of int32 ``words`` [N, W] as floats [N, PW, W]: field j is ``code * 2**e_j`` (see module doc)."""
    j = tl.arange(0, PW)
    off = j * BITS
    sh = tl.maximum(off + BITS - 23, 0)  # shift only fields that would not fit under the 2**23 mantissa
    e = off - sh
    mask = (tl.zeros_like(e) + (2 ** BITS - 1)) << e
    f = (words[:, None, :] >> sh[None, :, None]) & mask[None, :, None]
    return (f | _MAGIC).to(tl.float32, bitcast=True) - _MAGIC_F


@triton.jit
def _field_scale(BITS: tl.constexpr, PW: tl.constexpr):
    """``2**-e_j`` for the fields of ``_fields``, exact (built from exponent bits)."""
    j = tl.arange(0, PW)
    off = j * BITS
    e = off - tl.maximum(off + BITS - 23, 0)
    return ((127 - e) << 23).to(tl.float32, bitcast=True)


@triton.jit
def _row_program(T, QOFF, tiles_per_split, Hkv, M, L, len_ptr, BLOCK_N: tl.constexpr, PAGED: tl.constexpr):
    """What a row-kernel program (one query row of M per KV head, one split) works on.

    Returns ``(pid, split, bh, r, b, h, qpos, T, t_lo, t_hi)``: the program and split ids, the
    (sequence, KV head) pair ``bh`` = ``b * Hkv + h``, the row ``r``, the last position that row
    may see, the tokens of the segment (its sequence's, when ``PAGED``) and the split's tiles.
    """
    return _row_program_at(tl.program_id(0), tl.program_id(1), T, QOFF, tiles_per_split, Hkv, M, L, len_ptr, BLOCK_N,
                           PAGED)


@triton.jit
def _row_program_at(pid, split, T, QOFF, tiles_per_split, Hkv, M, L, len_ptr, BLOCK_N: tl.constexpr,
                    PAGED: tl.constexpr):
    """``_row_program`` of program ``pid`` (of ``B * Hkv * M``) and split ``split``, wherever the grid has them."""
    bh = pid // M
    r = pid % M
    b = bh // Hkv
    h = bh % Hkv
    qpos = QOFF + r % L
    if PAGED:
        T = tl.load(len_ptr + b)
        qpos = qpos + T
    t_lo = split * tiles_per_split
    t_hi = tl.minimum(t_lo + tiles_per_split, tl.cdiv(T, BLOCK_N))
    return pid, split, bh, r, b, h, qpos, T, t_lo, t_hi


@triton.jit
def _online_softmax(s, s_max, m_i, acc, acc_lo, l_s):
    """One tile's base-2 scores ``s`` (any shape; ``s_max`` their max) into a row's running softmax.

    Returns ``(p, m_i, acc, acc_lo, l_s)``; the accumulators are rescaled only when the running
    max grows.
    """
    m_new = tl.maximum(m_i, s_max)
    if m_new > m_i:
        alpha = tl.math.exp2(m_i - m_new)
        acc = acc * alpha
        acc_lo = acc_lo * alpha
        l_s = l_s * alpha
        m_i = m_new
    p = tl.math.exp2(s - m_i)
    return p, m_i, acc, acc_lo, l_s + p


@triton.jit
def _store_row_stats(m_ptr, l_ptr, split_base, split, bh, M, r, m_i, l_s):
    """Store a row-kernel split's max and sum (``l_s`` per token slot); return its partial-result index."""
    ps_idx = (split_base + split) * (tl.num_programs(0) // M) + bh
    tl.store(m_ptr + ps_idx * M + r, m_i)
    tl.store(l_ptr + ps_idx * M + r, tl.sum(l_s, axis=0))
    return ps_idx


@triton.jit
def _decode_rows_kernel(q_ptr, kc_ptr, ks_ptr, kl_ptr, vc_ptr, vs_ptr, vl_ptr, o_ptr, m_ptr, l_ptr, tbl_ptr, len_ptr,
                        skc_b, skc_h, skc_t, sks_b, sks_h, sks_t, svc_b, svc_h, svc_t, svs_b, svs_h, svs_t, stbl_b,
                        T, QOFF, tiles_per_split, split_base, Hkv, M, L,
                        D: tl.constexpr, KBITS: tl.constexpr, VBITS: tl.constexpr, GK: tl.constexpr,
                        GV: tl.constexpr, BLOCK_N: tl.constexpr, PAGED: tl.constexpr, PAGE: tl.constexpr):
    # One program: one query row (of M per KV head) of one (sequence, KV head), one split.
    # Quantized sides are int32 words (strides in words); dense sides are float arrays.
    pid, split, bh, r, b, h, qpos, T, t_lo, t_hi = _row_program(T, QOFF, tiles_per_split, Hkv, M, L, len_ptr,
                                                                BLOCK_N, PAGED)
    offs_n = tl.arange(0, BLOCK_N)

    PKW: tl.constexpr = 32 // KBITS if KBITS > 0 else 1
    WKW: tl.constexpr = D // PKW
    PVW: tl.constexpr = 32 // VBITS if VBITS > 0 else 1
    WVW: tl.constexpr = D // PVW
    if KBITS == 0:
        kchan = tl.arange(0, D)
        q = tl.load(q_ptr + pid * D + kchan)
    m_i = tl.max(tl.full([BLOCK_N], -1.0e30, tl.float32), axis=0)
    l_s = tl.zeros([BLOCK_N], tl.float32)
    if VBITS > 0:  # one running output per token slot, reduced once at the end
        acc = tl.zeros([BLOCK_N, PVW, WVW], tl.float32)
        acc_lo = tl.zeros([BLOCK_N, WVW], tl.float32)
        wv = tl.arange(0, WVW)
        gv = (wv * PVW) // GV  # the value group of each word (a word never straddles two)
    else:
        acc = tl.zeros([BLOCK_N, D], tl.float32)
        acc_lo = tl.zeros([BLOCK_N, 1], tl.float32)
        wv = tl.arange(0, D)

    for tile in range(t_lo, t_hi):
        n0 = tile * BLOCK_N
        loc, k_base, ks_base, v_base, vs_base = _tile_bases(n0, b, h, tbl_ptr, stbl_b, skc_b, skc_h, sks_b, sks_h,
                                                            svc_b, svc_h, svs_b, svs_h, PAGED, PAGE)
        tok = loc + offs_n
        tok_ok = (n0 + offs_n) < T

        # ---- scores (base 2: q carries scale * log2 e); a tile lies inside one key group
        if KBITS > 0:
            wk = tl.arange(0, WKW)
            kw = tl.load(kc_ptr + k_base + tok[:, None] * skc_t + wk[None, :], mask=tok_ok[:, None], other=0)
            sk_row = ks_ptr + ks_base + (loc // GK) * sks_t + wk * PKW
            lk_row = kl_ptr + ks_base + (loc // GK) * sks_t + wk * PKW
            # One field at a time over 2-D [N, WKW] tiles: a chain of fused multiply-adds.
            sacc = tl.zeros([BLOCK_N, WKW], tl.float32)
            qlo = tl.zeros([WKW], tl.float32)
            for j in tl.static_range(PKW):
                sh = j * KBITS + KBITS - 23 if j * KBITS + KBITS > 23 else 0
                e = j * KBITS - sh
                qj = tl.load(q_ptr + pid * D + wk * PKW + j)
                skj = tl.load(sk_row + j).to(tl.float32)
                lkj = tl.load(lk_row + j).to(tl.float32)
                fj = (((kw >> sh) & ((2 ** KBITS - 1) << e)) | _MAGIC).to(tl.float32, bitcast=True) - _MAGIC_F
                sacc += fj * (qj * skj * (1.0 / (1 << e)))[None, :]
                qlo += qj * lkj
            s = tl.sum(sacc + qlo[None, :], axis=1)
        else:
            kd = tl.load(kc_ptr + k_base + tok[:, None] * skc_t + kchan[None, :], mask=tok_ok[:, None], other=0.0)
            s = tl.sum(kd.to(tl.float32) * q[None, :], axis=1)
        ok = tok_ok & ((n0 + offs_n) <= qpos)
        s = tl.where(ok, s, float("-inf"))

        # ---- online softmax, one running output per token slot; rescale only when the max grows
        p, m_i, acc, acc_lo, l_s = _online_softmax(s, tl.max(s, axis=0), m_i, acc, acc_lo, l_s)

        # ---- values
        if VBITS > 0:
            vw = tl.load(vc_ptr + v_base + tok[:, None] * svc_t + wv[None, :], mask=tok_ok[:, None], other=0)
            cv = _fields(vw, VBITS, PVW)  # [N, PVW, WVW]
            vs_off = vs_base + tok[:, None] * svs_t + gv[None, :]
            sv = tl.load(vs_ptr + vs_off, mask=tok_ok[:, None], other=0.0).to(tl.float32)
            lv = tl.load(vl_ptr + vs_off, mask=tok_ok[:, None], other=0.0).to(tl.float32)
            acc = acc + cv * (p[:, None] * sv)[:, None, :]
            acc_lo = acc_lo + p[:, None] * lv
        else:
            vd = tl.load(vc_ptr + v_base + tok[:, None] * svc_t + wv[None, :], mask=tok_ok[:, None], other=0.0)
            acc = acc + p[:, None] * vd.to(tl.float32)

    # ---- this split's partial result: reduce the token slots once
    ps_idx = _store_row_stats(m_ptr, l_ptr, split_base, split, bh, M, r, m_i, l_s)
    o_base = o_ptr + (ps_idx * M + r) * D
    if VBITS > 0:
        o = tl.sum(acc, axis=0) * _field_scale(VBITS, PVW)[:, None] + tl.sum(acc_lo, axis=0)[None, :]
        tl.store(o_base + wv[None, :] * PVW + tl.arange(0, PVW)[:, None], o)
    else:
        tl.store(o_base + wv, tl.sum(acc, axis=0))


@triton.jit
def _field_hi(words, j: tl.constexpr, BITS: tl.constexpr, ELO: tl.constexpr, magic):
    """Field ``j`` of int32 ``words`` as the float ``2**23 + code * 2**e_j``, e_j in [ELO, 23 - BITS].

    Fields go in runs of ``R = (23 - BITS - ELO) // BITS + 1`` neighbours: one shift moves a
    run to bits ELO, ELO + BITS, ... (``e_j = ELO + (j % R) * BITS``), so the eight fields of a
    4-bit word cost 3 shifts for ELO = 11 instead of 7. The field is OR-ed into the bits of
    2**23: scaled by ``2**-e_j`` that is ``2**(23 - e_j) + code``, whose constant the caller
    removes once per tile instead of once per code; ELO bounds that constant, hence the
    rounding it brings. ``magic`` is 0x4B000000 passed in at run time: a constant would be a
    second immediate, which one LOP3 cannot take (two instructions per code instead of one).
    """
    R: tl.constexpr = (23 - BITS - ELO) // BITS + 1
    S: tl.constexpr = (j // R) * R * BITS - ELO  # this run's right shift (negative: left)
    E: tl.constexpr = ELO + (j - (j // R) * R) * BITS  # not j % R: the interpreter's int j has no % constexpr
    if S > 0:
        x = words >> S
    elif S < 0:
        x = words << (-S)
    else:
        x = words
    return ((x & ((2 ** BITS - 1) << E)) | magic).to(tl.float32, bitcast=True)


@triton.jit
def _fields_hi(words, BITS: tl.constexpr, PW: tl.constexpr, ELO: tl.constexpr, magic):
    """Every field of int32 ``words`` [N, W, 1] as in ``_field_hi``: floats [N, W, PW].

    The field axis is last and the words arrive with it (of size one), so the fields stay
    in the thread, in the layout the words were loaded in.
    """
    R: tl.constexpr = (23 - BITS - ELO) // BITS + 1
    j = tl.arange(0, PW)[None, None, :]
    sh = (j // R) * (R * BITS) - ELO  # as in _field_hi
    x = (words << tl.maximum(-sh, 0)) >> tl.maximum(sh, 0)  # sign bits an arithmetic shift brings lie above
    mask = tl.full(j.shape, 2 ** BITS - 1, tl.int32) << _field_exp(j, BITS, ELO)
    return ((x & mask) | magic).to(tl.float32, bitcast=True)


@triton.jit
def _field_exp(j, BITS: tl.constexpr, ELO: tl.constexpr):
    """``e_j`` of ``_field_hi`` for int32 field indices ``j`` (a tensor)."""
    return (j % ((23 - BITS - ELO) // BITS + 1)) * BITS + ELO  # tensor first: constexpr + tensor stays constexpr


@triton.jit
def _pow2(e):
    """``2**e`` as float32 for int32 ``e`` in [-126, 127], exactly (built from exponent bits)."""
    return ((e + 127) << 23).to(tl.float32, bitcast=True)


@triton.jit
def _group_program(T, Hkv, M, len_ptr, tbl_ptr, stbl_b, sks_b, sks_h, GK: tl.constexpr, PAGED: tl.constexpr,
                   PAGE: tl.constexpr):
    """What a key-operand program (one query row ``pid``, one key group ``g``) works on.

    Returns ``(pid, g, live, loc, ks_base)``: ``live`` when the group holds tokens, and where its
    key scales lie (see ``_tile_bases``).
    """
    pid = tl.program_id(0)
    g = tl.program_id(1)
    b = (pid // M) // Hkv
    if PAGED:
        T = tl.load(len_ptr + b)
    loc, _, ks_base, _, _ = _tile_bases(g * GK, b, (pid // M) % Hkv, tbl_ptr, stbl_b, 0, 0, sks_b, sks_h, 0, 0, 0, 0,
                                        PAGED, PAGE)
    return pid, g, g * GK < T, loc, ks_base


@triton.jit
def _key_operands_kernel(q_ptr, ks_ptr, kl_ptr, a_ptr, bias_ptr, tbl_ptr, len_ptr, sks_b, sks_h, sks_t, stbl_b,
                         T, G, Hkv, M, D: tl.constexpr, KBITS: tl.constexpr, GK: tl.constexpr,
                         PAGED: tl.constexpr, PAGE: tl.constexpr, ELK: tl.constexpr):
    # One program: one query row, one key group. a = q * scale * 2**-e_j (float32, field-major:
    # the j-th field of every word is contiguous, so the decode kernel loads each field's
    # operands as one vector in the layout of its code words) and bias = q . lo - 2**23 * sum(a),
    # the constant of _field_hi folded in.
    pid, g, live, loc, ks_base = _group_program(T, Hkv, M, len_ptr, tbl_ptr, stbl_b, sks_b, sks_h, GK, PAGED, PAGE)
    if live:
        PK: tl.constexpr = 32 // KBITS
        WK: tl.constexpr = D // PK
        j = tl.arange(0, PK)[:, None]
        w = tl.arange(0, WK)[None, :]
        ch = w * PK + j
        off = ks_base + (loc // GK) * sks_t + ch
        q = tl.load(q_ptr + pid * D + ch)
        a = q * tl.load(ks_ptr + off).to(tl.float32) * _pow2(-_field_exp(j, KBITS, ELK))
        tl.store(a_ptr + (pid * G + g) * D + j * WK + w, a)
        bias = tl.sum(tl.sum(q * tl.load(kl_ptr + off).to(tl.float32) - 8388608.0 * a, axis=1), axis=0)
        tl.store(bias_ptr + pid * G + g, bias)


@triton.jit
def _tile_words(n0, end, b, h, offs_n, kc_ptr, vc_ptr, tbl_ptr, stbl_b, skc_b, skc_h, skc_t, svc_b, svc_h, svc_t,
                wk, wv3, PAGED: tl.constexpr, PAGE: tl.constexpr):
    """The int32 code words of the tile at token ``n0``: keys [N, WK], values [N, WV, 1]; zeros from ``end`` on."""
    loc, k_base, _, v_base, _ = _tile_bases(n0, b, h, tbl_ptr, stbl_b, skc_b, skc_h, 0, 0, svc_b, svc_h, 0, 0,
                                            PAGED, PAGE)
    ok = (n0 + offs_n)[:, None] < end
    kw = tl.load(kc_ptr + k_base + (loc + offs_n)[:, None] * skc_t + wk, mask=ok, other=0)
    vw = tl.load(vc_ptr + v_base + (loc + offs_n)[:, None, None] * svc_t + wv3, mask=ok[:, :, None], other=0)
    return kw, vw


@triton.jit
def _tile_scales(n0, end, b, h, offs_n, vs_ptr, vl_ptr, tbl_ptr, stbl_b, svs_b, svs_h, svs_t, gv,
                 PAGED: tl.constexpr, PAGE: tl.constexpr):
    """The value scales and offsets [N, WV] of the tile at token ``n0``, as stored; zeros from ``end`` on."""
    loc, _, _, _, vs_base = _tile_bases(n0, b, h, tbl_ptr, stbl_b, 0, 0, 0, 0, 0, 0, svs_b, svs_h, PAGED, PAGE)
    ok = (n0 + offs_n)[:, None] < end
    vs_off = vs_base + (loc + offs_n)[:, None] * svs_t + gv
    return tl.load(vs_ptr + vs_off, mask=ok, other=0.0), tl.load(vl_ptr + vs_off, mask=ok, other=0.0)


@triton.jit
def _decode_qrows_kernel(q_ptr, kc_ptr, a_ptr, bias_ptr, vc_ptr, vs_ptr, vl_ptr, o_ptr, m_ptr, l_ptr, tbl_ptr,
                         len_ptr, skc_b, skc_h, skc_t, svc_b, svc_h, svc_t, svs_b, svs_h, svs_t, stbl_b,
                         T, G, QOFF, tiles_per_split, split_base, Hkv, M, L, magic,
                         D: tl.constexpr, KBITS: tl.constexpr, VBITS: tl.constexpr, GK: tl.constexpr,
                         GV: tl.constexpr, BLOCK_N: tl.constexpr, PAGED: tl.constexpr, PAGE: tl.constexpr,
                         PREFETCH: tl.constexpr, ELK: tl.constexpr, ELV: tl.constexpr):
    # One program: one query row (of M per KV head) of one (sequence, KV head), one split,
    # both sides quantized; codes read as int32 words [BLOCK_N, W]. Keys: the scaled query
    # of each key group comes from _key_operands_kernel, field-major, so each field's
    # operands load as one vector in the words' layout; score = sum_j field_j * a_j + bias
    # with no per-code subtraction (see _field_hi). Values: one running output per token slot
    # (no reduction across threads in the loop), the constant of _field_hi folded into lo.
    pid, split, bh, r, b, h, qpos, T, t_lo, t_hi = _row_program(T, QOFF, tiles_per_split, Hkv, M, L, len_ptr,
                                                                BLOCK_N, PAGED)
    offs_n = tl.arange(0, BLOCK_N)

    PK: tl.constexpr = 32 // KBITS
    WK: tl.constexpr = D // PK
    PV: tl.constexpr = 32 // VBITS
    WV: tl.constexpr = D // PV
    EHV: tl.constexpr = 23 - VBITS  # values are scaled by 2**-EHV
    wk = tl.arange(0, WK)[None, :]
    wv = tl.arange(0, WV)[None, :]
    wv3 = tl.arange(0, WV)[None, :, None]
    gv = (wv * PV) // GV  # the value group of each word (a word never straddles two)
    m_i = tl.max(tl.full([BLOCK_N], -1.0e30, tl.float32), axis=0)
    l_s = tl.zeros([BLOCK_N], tl.float32)
    acc = tl.zeros([BLOCK_N, WV, PV], tl.float32)
    acc_lo = tl.zeros([BLOCK_N, WV], tl.float32)
    acc_c = tl.zeros([BLOCK_N, WV], tl.float32)  # sum of p * scale: the constant of _field_hi

    end = tl.minimum(T, t_hi * BLOCK_N)  # this split's last token + 1
    if PREFETCH:
        kw_n, vw_n = _tile_words(t_lo * BLOCK_N, end, b, h, offs_n, kc_ptr, vc_ptr, tbl_ptr, stbl_b, skc_b, skc_h,
                                 skc_t, svc_b, svc_h, svc_t, wk, wv3, PAGED, PAGE)
        sv_n, lv_n = _tile_scales(t_lo * BLOCK_N, end, b, h, offs_n, vs_ptr, vl_ptr, tbl_ptr, stbl_b, svs_b, svs_h,
                                  svs_t, gv, PAGED, PAGE)
    for tile in range(t_lo, t_hi):
        n0 = tile * BLOCK_N
        if PREFETCH:  # this tile's words and scales came with the last one; load the next tile's now
            kw = kw_n
            vw = vw_n
            sv = sv_n
            lv = lv_n
            kw_n, vw_n = _tile_words(n0 + BLOCK_N, end, b, h, offs_n, kc_ptr, vc_ptr, tbl_ptr, stbl_b, skc_b, skc_h,
                                     skc_t, svc_b, svc_h, svc_t, wk, wv3, PAGED, PAGE)
            sv_n, lv_n = _tile_scales(n0 + BLOCK_N, end, b, h, offs_n, vs_ptr, vl_ptr, tbl_ptr, stbl_b, svs_b, svs_h,
                                      svs_t, gv, PAGED, PAGE)
        else:
            kw, vw = _tile_words(n0, end, b, h, offs_n, kc_ptr, vc_ptr, tbl_ptr, stbl_b, skc_b, skc_h, skc_t, svc_b,
                                 svc_h, svc_t, wk, wv3, PAGED, PAGE)

        # ---- scores, base 2 (q carries scale * log2 e); a tile lies inside one key group
        a_row = a_ptr + (pid * G + n0 // GK) * D + wk
        sacc = tl.zeros([BLOCK_N, WK], tl.float32)
        for j in tl.static_range(PK):
            sacc += _field_hi(kw, j, KBITS, ELK, magic) * tl.load(a_row + j * WK)
        s = tl.sum(sacc, axis=1) + tl.load(bias_ptr + pid * G + n0 // GK)
        s = tl.where(((n0 + offs_n) < T) & ((n0 + offs_n) <= qpos), s, float("-inf"))

        # ---- online softmax, one running output per token slot; rescale only when the max grows
        # (inline, not _online_softmax: with a third accumulator through it ptxas spills 56 bytes
        # at 8 bits, 2 warps, 32-token tiles)
        m_new = tl.maximum(m_i, tl.max(s, axis=0))
        if m_new > m_i:
            alpha = tl.math.exp2(m_i - m_new)
            acc = acc * alpha
            acc_lo = acc_lo * alpha
            acc_c = acc_c * alpha
            l_s = l_s * alpha
            m_i = m_new
        p = tl.math.exp2(s - m_i)
        l_s += p

        # ---- values: p @ (c * s + lo) = (p * s) @ c + p @ lo per group
        if not PREFETCH:  # loaded where used: with the words they cost registers (measured slower)
            sv, lv = _tile_scales(n0, end, b, h, offs_n, vs_ptr, vl_ptr, tbl_ptr, stbl_b, svs_b, svs_h, svs_t, gv,
                                  PAGED, PAGE)
        ps = p[:, None] * sv.to(tl.float32)
        acc_lo += p[:, None] * lv.to(tl.float32)
        acc_c += ps
        acc += _fields_hi(vw, VBITS, PV, ELV, magic) * (ps * (1.0 / (1 << EHV)))[:, :, None]

    ps_idx = _store_row_stats(m_ptr, l_ptr, split_base, split, bh, M, r, m_i, l_s)
    # acc / 2**-EHV holds p * s * (2**(23 - EHV) + code * 2**(e_j - EHV)), summed: take the constant
    # off, scale each field by 2**(EHV - e_j), add the offsets
    ev = _field_exp(tl.arange(0, PV)[None, :], VBITS, ELV)
    o = (tl.sum(acc, axis=0) - tl.sum(acc_c, axis=0)[:, None] * (1 << (23 - EHV))) * _pow2(-ev + EHV) \
        + tl.sum(acc_lo, axis=0)[:, None]  # [WV, PV]
    tl.store(o_ptr + (ps_idx * M + r) * D + tl.arange(0, WV)[:, None] * PV + tl.arange(0, PV)[None, :], o)


def _qrows_config(kbits: int, vbits: int) -> dict:
    """The qrows launch settings for a segment of ``kbits``/``vbits`` codes (8-bit ones have their own)."""
    return CONFIG["qrows8"] if 8 in (kbits, vbits) else CONFIG["qrows"]


def _use_mma(side_k, side_v) -> bool:
    """Whether a quantized segment goes to the matrix-unit row kernel (``decode_mma``)."""
    from . import decode_mma

    return (CONFIG["qrows"].get("mma", False) and isinstance(side_k, QuantBlock)
            and decode_mma.supported(side_k, side_v, side_k.codes.device))


def _use_imma(side_k, side_v, page: int | None) -> bool:
    """Whether a quantized segment (paged with ``page`` tokens per page) goes to ``decode_imma``."""
    from . import decode_imma

    return (CONFIG.get("imma", False) and isinstance(side_k, QuantBlock)
            and decode_imma.supported(side_k, side_v, side_k.codes.device, page))


def _block_n(side_k, side_v, kind: str, page: int | None = None) -> int | None:
    """Tokens per tile for a segment with kernel ``kind`` ("rows"/"dot"), or ``None`` if it cannot take it."""
    bn = CONFIG[kind]["block_n"]
    if (kind == "rows" and CONFIG["rows"]["qrows"] and isinstance(side_k, QuantBlock) and isinstance(side_v, QuantBlock)
            and side_k.scale.dtype != torch.float32):
        if _use_imma(side_k, side_v, page):
            bn = 32
        elif _use_mma(side_k, side_v):
            bn = 16
        else:
            bn = _qrows_config(side_k.spec.bits, side_v.spec.bits)["block_n"]
    if isinstance(side_k, QuantBlock):
        g = side_k.spec.group_size
        if not is_pow2(g) or g < 16:
            return None
        bn = min(bn, g)  # one key group per tile: one scale per channel
        if kind == "rows" and side_k.codes.shape[-1] % 4:
            return None
    if isinstance(side_v, QuantBlock):
        sp = side_v.spec
        d = side_v.codes.shape[-1] * sp.per_byte
        if not is_pow2(sp.group_size) or d % sp.group_size:
            return None
        if kind == "rows" and (side_v.codes.shape[-1] % 4 or sp.group_size < 32 // sp.bits):
            return None
        if kind == "dot" and sp.group_size // sp.per_byte < 16:
            return None
    return bn


@functools.lru_cache(maxsize=16)
def _num_sms_of(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def _num_sms(device: torch.device) -> int:
    if device.type == "cuda":
        return _num_sms_of(device.index if device.index is not None else torch.cuda.current_device())
    return 4  # the interpreter: a few splits, so tests exercise the merge


def _splits(n_tiles: int, programs: int, device: torch.device, min_tiles: int = _MIN_TILES_PER_SPLIT,
            pps: int | None = None) -> int:
    want = max(1, math.ceil(_num_sms(device) * (pps or CONFIG["programs_per_sm"]) / max(1, programs)))
    return max(1, min(want, n_tiles // min_tiles if device.type == "cuda" else n_tiles))


def _side_arrays(x, bits_out: list, words: bool):
    """(codes-or-dense, scale, lo, strides...) of one side of a segment; codes as int32 words if ``words``."""
    if isinstance(x, QuantBlock):
        bits_out.append((x.spec.bits, x.spec.group_size))
        c, s, lo = x.codes, x.scale, x.lo
        if c.stride(-1) != 1 or s.stride(-1) != 1 or lo.stride() != s.stride():
            c, s, lo = c.contiguous(), s.contiguous(), lo.contiguous()
        if words:
            if any(st % 4 for st in c.stride()[:-1]) or c.storage_offset() % 4:
                c = c.contiguous()
            c = c.view(torch.int32)
        return c, s, lo, (c.stride(0), c.stride(1), c.stride(2)), (s.stride(0), s.stride(1), s.stride(2))
    bits_out.append((0, 1))
    if x.stride(-1) != 1:
        x = x.contiguous()
    return x, x, x, (x.stride(0), x.stride(1), x.stride(2)), (0, 0, 0)


@triton.jit
def _combine_kernel(o_ptr, m_ptr, l_ptr, out_ptr, mo_ptr, lo_ptr, n_splits, rows, chunk, D: tl.constexpr,
                    DC: tl.constexpr, BS: tl.constexpr, FINAL: tl.constexpr):
    # One program: dimensions DC * e .. DC * e + DC - 1 (program axis 2) of one query row of one
    # (sequence, KV head), splits chunk * c .. chunk * c + c - 1 (c = ``chunk``, program axis 1).
    # Every split's partial output reweighted to the running max over splits (BS at a time);
    # FINAL: normalised and written in the output dtype, else written as one partial (output, max,
    # denominator) of a smaller merge. One or two launches instead of eight torch operations,
    # which at batch 1 cost more than the attention; programs over slices of the dimensions, so
    # that a batch's merge is not one long dependent chain per row.
    row = tl.program_id(0)
    first = tl.program_id(1) * chunk
    stop = tl.minimum(first + chunk, n_splits)
    sp = tl.arange(0, BS)
    d = tl.program_id(2) * DC + tl.arange(0, DC)
    m_run = tl.max(tl.full([BS], -1.0e30, tl.float32), axis=0)
    den = tl.sum(tl.zeros([BS], tl.float32), axis=0)
    acc = tl.zeros([DC], tl.float32)
    for s0 in range(first, stop, BS):
        ok = s0 + sp < stop
        m = tl.load(m_ptr + (s0 + sp) * rows + row, mask=ok, other=-1.0e30)
        m_new = tl.maximum(m_run, tl.max(m, axis=0))
        alpha = tl.math.exp2(m_run - m_new)
        w = tl.math.exp2(m - m_new)
        den = den * alpha + tl.sum(w * tl.load(l_ptr + (s0 + sp) * rows + row, mask=ok, other=0.0), axis=0)
        o = tl.load(o_ptr + ((s0 + sp) * rows + row)[:, None] * D + d[None, :], mask=ok[:, None], other=0.0)
        acc = acc * alpha + tl.sum(o * w[:, None], axis=0)
        m_run = m_new
    if FINAL:
        tl.store(out_ptr + row * D + d, (acc / den).to(out_ptr.dtype.element_ty))
    else:
        at = tl.program_id(1) * rows + row
        tl.store(out_ptr + at * D + d, acc)
        if tl.program_id(2) == 0:
            tl.store(mo_ptr + at, m_run)
            tl.store(lo_ptr + at, den)


# Up to this many splits one program per row and 32 dimensions merges them all; above it,
# programs over chunks of _COMBINE_CHUNK splits merge them into one partial each first
# (bench/combine_splits.py, one H200, 40 rows, GPU us at 19 / 105 / 131 / 515 splits: one level
# 5.5 / 9.2 / 10.7 / 25.1, chunked 5.4 / 9.1 / 9.9 / 13.1, eight torch operations 49-76; with one
# program per row over all 128 dimensions it was 9.8 / 32.1 / 39.0 / 135.4 and 9.7 / 26.3 / 17.5 /
# 18.9 chunked).
_COMBINE_KERNEL_MAX_SPLITS = 64
_COMBINE_CHUNK = 32
_COMBINE_DIMS = 32  # dimensions per merge program


class _Partials:
    """The split results of every segment of one attention call, merged by ``combine``."""

    def __init__(self, n_splits: int, bh: int, m: int, d: int, device):
        self.o = torch.empty((n_splits, bh, m, d), dtype=torch.float32, device=device)
        self.m = torch.empty((n_splits, bh, m), dtype=torch.float32, device=device)
        self.l = torch.empty((n_splits, bh, m), dtype=torch.float32, device=device)

    def combine(self, dtype: torch.dtype) -> torch.Tensor:
        """``[bh, M, D]`` in ``dtype``: every split's output reweighted to the global max and normalised."""
        n, bh, m, d = self.o.shape
        dc = _COMBINE_DIMS if d % _COMBINE_DIMS == 0 else d
        part = self
        while n > _COMBINE_KERNEL_MAX_SPLITS:
            chunks = triton.cdiv(n, _COMBINE_CHUNK)
            fewer = _Partials(chunks, bh, m, d, self.o.device)
            _combine_kernel[(bh * m, chunks, d // dc)](part.o, part.m, part.l, fewer.o, fewer.m, fewer.l, n, bh * m,
                                                       _COMBINE_CHUNK, D=d, DC=dc, BS=_COMBINE_CHUNK, FINAL=False,
                                                       num_warps=1)
            part, n = fewer, chunks
        out = torch.empty((bh, m, d), dtype=dtype, device=self.o.device)
        _combine_kernel[(bh * m, 1, d // dc)](part.o, part.m, part.l, out, out, out, n, bh * m, n, D=d, DC=dc,
                                              BS=min(32, triton.next_power_of_2(n)), FINAL=True, num_warps=1)
        return out


class _Query:
    """One call's query rows ``rows`` [B * Hkv, M, D] as given (decode_imma scales them itself)
    and, made once by ``scaled``, float32 times ``scale`` * log2 e (the other kernels)."""

    def __init__(self, q: torch.Tensor, hkv: int, scale: float):
        b, hq, L, d = q.shape
        self.m_rows = hq // hkv * L
        self.block_m = max(16, triton.next_power_of_2(self.m_rows))
        self.rows = q.reshape(b * hkv, self.m_rows, d).contiguous()
        self.scale = scale * _LOG2E
        self._f32 = None

    def scaled(self) -> torch.Tensor:
        """float32 [B * Hkv, M, D]: the rows times scale * log2 e."""
        if self._f32 is None:
            self._f32 = self.rows.to(torch.float32) * self.scale
        return self._f32


def _imma_takes(kside, vside, kind: str, f32: bool, page: int | None = None) -> bool:
    """Whether a segment goes to ``decode_imma`` (else the query must be ``_Query.scaled``)."""
    return kind == "rows" and CONFIG["rows"]["qrows"] and not f32 and _use_imma(kside, vside, page)


def _launch(qq: _Query, kside, vside, part: _Partials, split_base: int, n_splits: int, qoff: int, T: int,
            hkv: int, m_rows: int, L: int, block_m: int, block_n: int, kind: str, f32: bool, imma: bool, paged=None,
            isets: dict | None = None, tail: tuple | None = None):
    """One segment's kernels into ``part``; ``imma``: ``_imma_takes`` of the segment (its caller has it);
    ``isets``: decode_imma's settings (``_imma_settings``; default ``_imma_defaults``); ``tail``:
    ``_tail_splits`` of the segment (decode_imma's splits of two sizes)."""
    kb, vb = [], []
    rows = kind == "rows"
    kc, ks, kl, skc, sks = _side_arrays(kside, kb, rows)
    vc, vs, vl, svc, svs = _side_arrays(vside, vb, rows)
    q2 = None if imma else qq.scaled()
    d = qq.rows.shape[-1]
    if paged is None:
        tbl, lens, stbl, page = qq.rows, qq.rows, 0, block_n  # unused placeholders
    else:
        tbl, lens, page = paged
        stbl = tbl.stride(0)
    bh = qq.rows.shape[0]
    tiles_per_split = tail[1] if tail else max(1, math.ceil(math.ceil(T / block_n) / n_splits))
    cfg = CONFIG[kind]
    if imma:
        from . import decode_imma

        wide = max(kb[0][0], vb[0][0])
        isets = isets or _imma_defaults(wide)
        raw = CONFIG["imma_scales_query"]
        decode_imma.launch(qq.rows if raw else qq.scaled(), (kc, ks, kl, skc, sks), (vc, vs, vl, svc, svs),
                           kb[0][0], vb[0][0], kb[0][1], part, split_base, n_splits, tiles_per_split, qoff, T, hkv,
                           m_rows, L, (tbl, lens, stbl, page, paged is not None), isets["imma_step"],
                           isets["imma_l2_ahead"], isets["imma_stages"], CONFIG["imma_maxnreg"][wide],
                           qq.scale if raw else 1.0, isets["imma_splits_fast"], tail and tail[2:])
        return
    common = (q2, kc, ks, kl, vc, vs, vl, part.o, part.m, part.l, tbl, lens,
              *skc, *sks, *svc, *svs, stbl, T, qoff, tiles_per_split, split_base, hkv, m_rows, L)
    if rows and cfg["qrows"] and not f32 and _use_mma(kside, vside):
        from . import decode_mma

        decode_mma.launch(q2, (kc, ks, kl, skc, sks), (vc, vs, vl, svc, svs), kb[0][1], part, split_base, n_splits,
                          tiles_per_split, qoff, T, hkv, m_rows, L, (tbl, lens, stbl, page, paged is not None),
                          CONFIG["qrows"]["prefetch"])
    elif rows and cfg["qrows"] and kb[0][0] > 0 and vb[0][0] > 0 and not f32:  # float16 key operands
        qc = _qrows_config(kb[0][0], vb[0][0])
        # The lowest bit _field_hi moves a field to: keys are summed per tile; values over the
        # whole split, so they keep more headroom against rounding.
        elk = qc.get("elo_k", 11 if kb[0][0] < 8 else 7)
        elv = qc.get("elo_v", 15)
        g = math.ceil(T / kb[0][1])
        a_op = torch.empty((bh * m_rows, g, d), dtype=torch.float32, device=q2.device)
        bias = torch.empty((bh * m_rows, g), dtype=torch.float32, device=q2.device)
        _key_operands_kernel[(bh * m_rows, g)](
            q2, ks, kl, a_op, bias, tbl, lens, *sks, stbl, T, g, hkv, m_rows, D=d, KBITS=kb[0][0], GK=kb[0][1],
            PAGED=paged is not None, PAGE=page, ELK=elk, num_warps=1)
        _decode_qrows_kernel[(bh * m_rows, n_splits)](
            q2, kc, a_op, bias, vc, vs, vl, part.o, part.m, part.l, tbl, lens, *skc, *svc, *svs, stbl, T, g, qoff,
            tiles_per_split, split_base, hkv, m_rows, L, 0x4B000000, D=d, KBITS=kb[0][0], VBITS=vb[0][0], GK=kb[0][1],
            GV=vb[0][1], BLOCK_N=block_n, PAGED=paged is not None, PAGE=page, PREFETCH=qc["prefetch"], ELK=elk,
            ELV=elv, num_warps=qc["num_warps"], num_stages=qc["num_stages"])
    elif rows:
        _decode_rows_kernel[(bh * m_rows, n_splits)](
            *common, D=d, KBITS=kb[0][0], VBITS=vb[0][0], GK=kb[0][1], GV=vb[0][1], BLOCK_N=block_n,
            PAGED=paged is not None, PAGE=page, num_warps=cfg["num_warps"],
            num_stages=cfg["num_stages"])
    else:
        _decode_kernel[(bh, n_splits)](
            *common, D=d, KBITS=kb[0][0], VBITS=vb[0][0], GK=kb[0][1], GV=vb[0][1], BLOCK_M=block_m,
            BLOCK_N=block_n, PAGED=paged is not None, PAGE=page, F32=f32, num_warps=cfg["num_warps"],
            num_stages=cfg["num_stages"])


def _finish(part: _Partials, q: torch.Tensor) -> torch.Tensor:
    return part.combine(q.dtype).reshape(q.shape)


def _kind(m_rows: int) -> str:
    return "rows" if m_rows <= CONFIG["rows_max"] else "dot"


def decode_attention(q: torch.Tensor, segments: list, scale: float) -> torch.Tensor | None:
    """Causal attention of ``q`` ``[B, Hq, L, D]`` over ``segments`` of the cache, oldest first.

    Each segment is ``(k, v)``: a ``QuantBlock`` or a dense ``[B, Hkv, T_i, D]`` tensor per side,
    with the same ``T_i``. Query ``l`` sits at position ``T - L + l`` (``T`` = all tokens).
    Returns ``[B, Hq, L, D]`` in ``q``'s dtype, or ``None`` when a segment has a layout the
    kernel does not take (the caller then dequantizes).
    """
    b, hq, L, d = q.shape
    if not segments or not is_pow2(d) or d < 16:
        return None
    first = segments[0][0]
    hkv = (first.codes if isinstance(first, QuantBlock) else first).shape[1]
    qq = _Query(q, hkv, scale)
    m_rows, block_m = qq.m_rows, qq.block_m
    kind = _kind(m_rows)
    if kind == "dot" and block_m > 128:
        return None
    lens, bns = [], []
    for ks, vs in segments:
        bn = _block_n(ks, vs, kind)
        if bn is None:
            return None
        bns.append(bn)
        lens.append((ks.codes if isinstance(ks, QuantBlock) else ks).shape[2])
    total = sum(lens)
    f32 = any((x.scale if isinstance(x, QuantBlock) else x).dtype == torch.float32 for s in segments for x in s)
    dense = [not isinstance(ks, QuantBlock) for ks, _ in segments]
    quant_tokens = b * sum(n for n, dn in zip(lens, dense) if not dn)
    side = _use_side(q.device, quant_tokens, any(dense))
    imma = [_imma_takes(ks, vs, kind, f32) for ks, vs in segments]
    isets = _imma_settings(q, segments, scale, imma, quant_tokens, m_rows)
    raw = CONFIG["imma_scales_query"]
    if any(not (dn and side) and not (raw and im) for im, dn in zip(imma, dense)):
        qq.scaled()  # a launch on this stream takes it: made before the side stream waits for this one
    side = _side_stream(q.device) if side else None
    programs = b * hkv * (m_rows if kind == "rows" else 1)
    # each decode_imma segment's settings: the call's, or (widths that differ) its own defaults
    sets = [(isets or _imma_defaults(max(ks.spec.bits, vs.spec.bits))) if im else None
            for (ks, vs), im in zip(segments, imma)]
    splits = [_splits(math.ceil(n / bn), programs, q.device,
                      _MIN_TILES_PER_SPLIT if isinstance(ks, QuantBlock) else CONFIG["dense_min_tiles"],
                      st["programs_per_sm"] if st else None)
              for (ks, _), n, bn, st in zip(segments, lens, bns, sets)]
    tails = [_tail_splits(math.ceil(n / bn), ns, st["imma_tail"]) if st and st["imma_tail"] else None
             for n, bn, ns, st in zip(lens, bns, splits, sets)]
    splits = [t[0] if t else ns for t, ns in zip(tails, splits)]
    part = _Partials(sum(splits), b * hkv, m_rows, d, q.device)
    launches, base, pos = [], 0, 0
    for (ks, vs), n, bn, ns, dn, im, st, tl_ in zip(segments, lens, bns, splits, dense, imma, sets, tails):
        launches.append((dn, (qq, ks, vs, part, base, ns, total - L - pos, n, hkv, m_rows, L, block_m, bn, kind, f32,
                              im, None, st, tl_)))
        base += ns
        pos += n
    if side is not None:  # the dense segments first: their few programs start before the long ones fill the GPU
        launches.sort(key=lambda x: not x[0])
    for dn, args in launches:
        with torch.cuda.stream(side) if side is not None and dn else nullcontext():
            _launch(*args)
    if side is not None:
        torch.cuda.current_stream(q.device).wait_stream(side)
    return _finish(part, q)


def _tail_splits(n_tiles: int, n_splits: int, tail) -> tuple | None:
    """``(splits, tiles_per_split, tail_at, small)`` for a segment of ``n_tiles`` tiles per row
    that ``n_splits`` even splits would cover: about ``tail[0]`` percent of the tiles go to splits of
    ``1 / tail[1]`` the others' tiles, placed last (launched last); ``None`` where none would be long."""
    pct, div = tail
    each = math.ceil(n_tiles / n_splits)
    long = n_tiles * (100 - pct) // (100 * each)
    if long < 1 or long >= n_splits:
        return None
    small = max(1, math.ceil(each / div))
    return long + math.ceil((n_tiles - long * each) / small), each, long, small


def _imma_defaults(wide: int) -> dict:
    """decode_imma's settings from CONFIG for ``wide`` (the wider side's bits): ``imma_step``,
    ``imma_l2_ahead``, ``imma_stages``, ``imma_splits_fast``, ``imma_tail`` and ``programs_per_sm``."""
    return {"imma_step": CONFIG["imma_step"][wide], "imma_l2_ahead": CONFIG["imma_l2_ahead"][wide],
            "imma_stages": CONFIG["imma_stages"][wide], "imma_splits_fast": CONFIG["imma_splits_fast"][wide],
            "imma_tail": CONFIG["imma_tail"][wide], "programs_per_sm": CONFIG["programs_per_sm"]}


def _imma_settings(q: torch.Tensor, segments: list, scale: float, imma: list, quant_tokens: int,
                   m_rows: int) -> dict | None:
    """decode_imma's settings for this call (``None`` where no segment takes it, or segments of
    different widths do: ``_launch`` then takes each one's defaults): the defaults, or
    the fastest of them and ``CONFIG["imma_tune"]``'s alternatives, timed on the first call of
    this class of problem with at least ``CONFIG["imma_tune_tokens"]`` quantized tokens
    (``autotune.choose``; while a CUDA graph is captured, nothing is timed: an earlier choice or
    the defaults; ``LMCACHE_AUTOTUNE=0``: always the defaults, so that results do not depend on
    which candidate a card timed faster). ``quant_tokens``: the quantized tokens over the batch."""
    widths = {max(ks.spec.bits, vs.spec.bits) for (ks, vs), im in zip(segments, imma) if im}
    if len(widths) != 1:
        return None
    wide = widths.pop()
    base = _imma_defaults(wide)
    if _FORCED is not None:
        return {**base, **_FORCED}
    alts = CONFIG["imma_tune"].get(wide, [])
    if (not alts or q.device.type != "cuda" or quant_tokens < CONFIG["imma_tune_tokens"]
            or os.environ.get("LMCACHE_AUTOTUNE", "").strip() == "0"):
        return base
    from . import autotune

    codes = [ks.codes for (ks, _), im in zip(segments, imma) if im]
    index = q.device.index if q.device.index is not None else torch.cuda.current_device()
    key = ("decode_imma", index, wide, q.shape[0] * codes[0].shape[1], m_rows,
           max(c.shape[2] for c in codes).bit_length(), q.dtype)
    if torch.cuda.is_current_stream_capturing():
        return {**base, **autotune.chosen(key, {})}

    def run(forced: dict) -> None:
        global _FORCED
        _FORCED = forced
        try:
            decode_attention(q, segments, scale)
        finally:
            _FORCED = None

    return {**base, **autotune.choose(key, [{}, *alts], run, q.device)}


_SIDE_STREAMS: dict = {}


def _use_side(device: torch.device, quant_tokens: int, dense: bool) -> bool:
    """Whether the dense segments (the recent-token residual), if there are any, run on a second
    stream: when the quantized ones hold enough tokens (``quant_tokens``, over the batch) to keep
    the GPU busy meanwhile (``CONFIG["dense_side_tokens"]``). The residual's few programs then run
    beside the quantized segments' kernels instead of after them."""
    return (device.type == "cuda" and dense and bool(CONFIG["dense_side_tokens"])
            and quant_tokens >= CONFIG["dense_side_tokens"])


def _side_stream(device: torch.device):
    """The second stream of ``_use_side``, after it has waited for the current one (the query and
    partials exist on it); the caller makes the current stream wait for it before merging."""
    key = (device.index, torch.cuda.current_stream(device).cuda_stream)
    if key not in _SIDE_STREAMS:
        _SIDE_STREAMS[key] = torch.cuda.Stream(device)
    side = _SIDE_STREAMS[key]
    side.wait_stream(torch.cuda.current_stream(device))
    return side


def attend_view(q: torch.Tensor, view: KVView, scale: float, rotate) -> torch.Tensor | None:
    """``decode_attention`` over a cache ``KVView`` (rotating queries/outputs where stored rotated).

    Returns ``None`` when the view holds a layout the kernel does not take.
    """
    segments = list(zip(view.k_blocks, view.v_blocks))
    if view.k_res is not None:
        segments.append((view.k_res, view.v_res))
    if any(isinstance(x, QuantBlock) and x.spec.axis != (-2 if i == 0 else -1) for s in segments
           for i, x in enumerate(s)):
        return None
    if view.rotate_k:
        q = rotate(q)
    out = decode_attention(q, segments, scale)
    if out is not None and view.rotate_v:
        out = rotate(out)
    return out


def paged_decode_attention(q: torch.Tensor, pool, table: torch.Tensor, lengths: torch.Tensor, max_len: int,
                           scale: float, k_res=None, v_res=None) -> torch.Tensor | None:
    """``decode_attention`` over a ``PagedKVPool`` through the int32 block ``table`` ``[B, max_pages]``.

    ``lengths``: int32 ``[B]`` quantized tokens per sequence (``max_len`` their maximum); then the
    dense ``k_res``/``v_res`` ``[B, Hkv, R, D]``. Returns ``None`` if the pool's layout is not
    one the kernel takes.
    """
    b, hq, L, d = q.shape
    hkv = pool.kv_heads
    kq = QuantBlock(pool.k_codes, pool.k_scale, pool.k_lo, pool.k_spec)
    vq = QuantBlock(pool.v_codes, pool.v_scale, pool.v_lo, pool.v_spec)
    qq = _Query(q, hkv, scale)
    m_rows, block_m = qq.m_rows, qq.block_m
    kind = _kind(m_rows)
    bn = _block_n(kq, vq, kind, pool.page_size)
    if bn is None or pool.page_size % bn or not is_pow2(d) or d < 16 or (kind == "dot" and block_m > 128):
        return None
    r = 0 if k_res is None else k_res.shape[2]
    f32 = pool.k_scale.dtype == torch.float32
    side = _use_side(q.device, b * max_len, r > 0)
    imma = _imma_takes(kq, vq, kind, f32, pool.page_size)
    if (r and not side) or not (CONFIG["imma_scales_query"] and imma):
        qq.scaled()  # a launch on this stream takes it: made before the side stream waits for this one
    side = _side_stream(q.device) if side else None
    programs = b * hkv * (m_rows if kind == "rows" else 1)
    ns = _splits(math.ceil(max_len / bn), programs, q.device)
    nr = 1 if r else 0
    part = _Partials(ns + nr, b * hkv, m_rows, d, q.device)
    if r:
        with torch.cuda.stream(side) if side is not None else nullcontext():
            _launch(qq, k_res, v_res, part, ns, 1, r - L, r, hkv, m_rows, L, block_m, CONFIG[kind]["block_n"], kind,
                    f32, False)
    _launch(qq, kq, vq, part, 0, ns, r - L, max_len, hkv, m_rows, L, block_m, bn, kind, f32, imma,
            paged=(table, lengths, pool.page_size))
    if side is not None:
        torch.cuda.current_stream(q.device).wait_stream(side)
    return _finish(part, q)
