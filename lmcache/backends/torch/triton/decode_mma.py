"""Decode attention over 4-bit K and V on the matrix units (NVIDIA sm_80+, inline PTX).

The row kernels of ``decode_attention`` spend about five instructions per code (a shift, a
LOP3, a fused multiply-add and their share of the rest). Here the codes go to
``mma.sync.m16n8k16`` as float16 pairs made from a code word by one LOP3
(``(w & 0x000F000F) | 0x64006400`` puts two nibbles 16 bits apart into two float16
mantissas: ``1024 + code``) and one ``sub.f16x2`` of 1024, so two codes cost about two
instructions and the products are free.

One program: one query row (of ``M`` per KV head), one split, one warp, 16-token tiles.

* Keys: ``S[t] = sum_k A[t, k] B[k]``. Lane ``(r, q) = (lane // 4, lane % 4)`` holds the A
  fragment of tokens ``r`` and ``r + 8``: words ``4q .. 4q + 3`` of each token give 16
  nibble pairs, which the head dimensions are permuted to match (the permutation is applied
  to B). B is the query times the key scale of the group, split into float16 high and low
  parts in columns 0 and 1 (so the sum is float32-exact), prepared per group by
  ``_key_operands_kernel`` with the group's bias ``q . lo``.
* Values: ``O[d] = sum_t A[d, t] P[t]``, rows are head dimensions (dimension ``16r + j`` and
  ``16r + 8 + j`` for lane row ``r`` and tile ``j``), K the 16 tokens, and the columns of B
  are ``p * scale`` of value group 0 and 1, high and low parts. A pair of tokens' nibbles comes
  from two words by one PRMT. The accumulators stay in the matrix-unit layout for the whole
  split (32 floats a lane).

Codes in a high nibble of their byte come out as ``16 * code``: the 1/16 goes into B
(keys) or the output (values). Only the layout of one config is taken (``supported``): head
dim 128, 4-bit codes on both sides, value groups of 64, float16/bfloat16 scales.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from ...base import QuantBlock
from . import capability
from .decode_attention import _group_program, _online_softmax, _row_program, _tile_bases

_MAGIC_H2 = 0x64006400  # float16 1024.0 in both halves


def supported(side_k, side_v, device: torch.device) -> bool:
    """Whether a (K, V) segment can take this kernel on ``device``."""
    if not (isinstance(side_k, QuantBlock) and isinstance(side_v, QuantBlock)):
        return False
    if device.type != "cuda" or torch.version.hip or os.environ.get("TRITON_INTERPRET") == "1":
        return False
    if capability(device)[0] < 8:
        return False
    ks, vs = side_k.spec, side_v.spec
    return (ks.bits == 4 and vs.bits == 4 and side_k.codes.shape[-1] == 64 and side_v.codes.shape[-1] == 64
            and ks.group_size >= 16 and vs.group_size == 64 and side_k.scale.dtype != torch.float32
            and side_v.scale.dtype != torch.float32)


@triton.jit
def _mma(a, b, c):
    """``mma.sync.m16n8k16`` (float16 in, float32 accumulate) on lane fragments, 4 elements each.

    ``a``: int32 [32, 4 * n] float16 pairs (a0a1, a2a3, a4a5, a6a7 per group of 4); ``b``: int32
    [32, 4 * n] as (b0b1, -, b2b3, -); ``c``: float32 [32, 4 * n]. One product per group of 4.
    """
    return tl.inline_asm_elementwise(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {$0,$1,$2,$3}, {$4,$5,$6,$7}, {$8,$10}, "
        "{$12,$13,$14,$15};",
        "=f,=f,=f,=f,r,r,r,r,r,r,r,r,f,f,f,f", [a, b, c], dtype=tl.float32, is_pure=True, pack=4)


@triton.jit
def _prmt(a, b, sel):
    """Bytes of ``a`` (0-3) and ``b`` (4-7) picked by the nibbles of ``sel`` (PTX ``prmt``)."""
    return tl.inline_asm_elementwise("prmt.b32 $0, $1, $2, $3;", "=r,r,r,r", [a, b, sel], dtype=tl.int32,
                                     is_pure=True, pack=1)


@triton.jit
def _minus_1024(x, magic):
    """float16 pairs ``1024 + v`` (int32 bits) minus 1024 in both halves: ``v`` exactly.

    The matrix units' float32 sums round toward zero, so a constant of 1024 per code summed
    over a split would bias the result; without it the sums hold only the codes.
    """
    return tl.inline_asm_elementwise("sub.f16x2 $0, $1, $2;", "=r,r,r", [x, magic + tl.zeros_like(x)],
                                     dtype=tl.int32, is_pure=True, pack=1)


@triton.jit
def _spread_p(p4):
    """Each lane ``(r, q)`` gets p of tokens ``2q, 2q+1, 2q+8, 2q+9`` from lanes ``8q`` and ``8q + 4``.

    ``p4``: int32 bits [32, 4] as (p[r], -, p[r + 8], -) per lane, valid in lanes with q = 0.
    """
    return tl.inline_asm_elementwise(
        "{ .reg .u32 l, s0, s1;\n"
        "mov.u32 l, %laneid;\n and.b32 l, l, 3;\n shl.b32 s0, l, 3;\n add.u32 s1, s0, 4;\n"
        "shfl.sync.idx.b32 $0, $4, s0, 0x1f, 0xffffffff;\n"
        "shfl.sync.idx.b32 $1, $4, s1, 0x1f, 0xffffffff;\n"
        "shfl.sync.idx.b32 $2, $6, s0, 0x1f, 0xffffffff;\n"
        "shfl.sync.idx.b32 $3, $6, s1, 0x1f, 0xffffffff; }",
        "=r,=r,=r,=r,r,r,r,r", [p4], dtype=tl.int32, is_pure=False, pack=4)


@triton.jit
def _half_bits(x):
    """float16 ``x`` as its 16 bits in the low half of an int32."""
    return x.to(tl.int16, bitcast=True).to(tl.int32) & 0xFFFF


@triton.jit
def _key_operands_kernel(q_ptr, ks_ptr, kl_ptr, bk_ptr, bias_ptr, tbl_ptr, len_ptr, sks_b, sks_h, sks_t, stbl_b,
                         T, G, Hkv, M, GK: tl.constexpr, PAGED: tl.constexpr, PAGE: tl.constexpr):
    # One program: one query row, one key group. bk [rows, G, 8 lanes, 16]: lane (r, q) of
    # columns r = 0 (high parts) and 1 (low parts), for chunk c and slot s the float16 pair of
    # word 4q + c // 2, nibbles (i, i + 4) with i = 2 * (c % 2) + s, as the decode kernel's A.
    pid, g, live, loc, ks_base = _group_program(T, Hkv, M, len_ptr, tbl_ptr, stbl_b, sks_b, sks_h, GK, PAGED, PAGE)
    if live:
        lane = tl.arange(0, 8)[:, None, None]
        cs = tl.arange(0, 16)[None, :, None]
        hh = tl.arange(0, 2)[None, None, :]
        c = cs // 2
        i = 2 * (c % 2) + cs % 2
        dim = 8 * (4 * (lane % 4) + c // 2) + i + 4 * hh  # [8, 16, 2]
        row = ks_base + (loc // GK) * sks_t
        x = tl.load(q_ptr + pid * 128 + dim) * tl.load(ks_ptr + row + dim).to(tl.float32)
        x = tl.where(i % 2 == 1, x * 0.0625, x)  # a high nibble of its byte arrives as 16 * code
        hi = x.to(tl.float16)
        lo = (x - hi.to(tl.float32)).to(tl.float16)
        val = tl.where(lane < 4, hi, lo)
        w_lo, w_hi = tl.split(_half_bits(val))
        tl.store(bk_ptr + ((pid * G + g) * 8 + tl.arange(0, 8)[:, None]) * 16 + tl.arange(0, 16)[None, :],
                 w_lo | (w_hi << 16))
        d = tl.arange(0, 128)
        qlo = tl.sum(tl.load(q_ptr + pid * 128 + d) * tl.load(kl_ptr + row + d).to(tl.float32), axis=0)
        tl.store(bias_ptr + pid * G + g, qlo)


@triton.jit
def _tile_words(n0, end, b, h, r, q, u4, u2, kc_ptr, vc_ptr, tbl_ptr, stbl_b, skc_b, skc_h, skc_t, svc_b, svc_h,
                svc_t, PAGED: tl.constexpr, PAGE: tl.constexpr):
    """The code words a lane needs for the tile at ``n0`` (zeros from ``end`` on): key words
    ``4q .. 4q + 3`` of tokens ``r`` and ``r + 8`` [32, 4], value words ``2r, 2r + 1`` of tokens
    ``2q``, ``2q + 1``, ``2q + 8``, ``2q + 9`` [32, 2]."""
    loc, k_base, _, v_base, _ = _tile_bases(n0, b, h, tbl_ptr, stbl_b, skc_b, skc_h, 0, 0, svc_b, svc_h, 0, 0,
                                            PAGED, PAGE)
    k_row = kc_ptr + k_base + 4 * q + u4
    kw0 = tl.load(k_row + (loc + r) * skc_t, mask=n0 + r < end, other=0)
    kw1 = tl.load(k_row + (loc + r + 8) * skc_t, mask=n0 + r + 8 < end, other=0)
    v_row = vc_ptr + v_base + 2 * r + u2
    vw0 = tl.load(v_row + (loc + 2 * q) * svc_t, mask=n0 + 2 * q < end, other=0)
    vw1 = tl.load(v_row + (loc + 2 * q + 1) * svc_t, mask=n0 + 2 * q + 1 < end, other=0)
    vw8 = tl.load(v_row + (loc + 2 * q + 8) * svc_t, mask=n0 + 2 * q + 8 < end, other=0)
    vw9 = tl.load(v_row + (loc + 2 * q + 9) * svc_t, mask=n0 + 2 * q + 9 < end, other=0)
    return kw0, kw1, vw0, vw1, vw8, vw9


@triton.jit
def _decode_kernel(bk_ptr, bias_ptr, kc_ptr, vc_ptr, vs_ptr, vl_ptr, o_ptr, m_ptr, l_ptr, tbl_ptr, len_ptr,
                   skc_b, skc_h, skc_t, svc_b, svc_h, svc_t, svs_b, svs_h, svs_t, stbl_b,
                   T, G, QOFF, tiles_per_split, split_base, Hkv, M, L, magic,
                   GK: tl.constexpr, PAGED: tl.constexpr, PAGE: tl.constexpr, PREFETCH: tl.constexpr):
    pid, split, bh, rq, b, h, qpos, T, t_lo, t_hi = _row_program(T, QOFF, tiles_per_split, Hkv, M, L, len_ptr, 16,
                                                                 PAGED)
    end = tl.minimum(T, t_hi * 16)

    lane = tl.arange(0, 32)
    r = (lane // 4)[:, None]  # [32, 1]
    q = (lane % 4)[:, None]
    u4 = tl.arange(0, 4)[None, :]
    u2 = tl.arange(0, 2)[None, :]
    t8 = tl.arange(0, 2)[None, :]
    e32 = tl.arange(0, 32)[None, :]
    # key A: element 8u + 2i + t8 of a lane is pair i of word 4q + u of token r + 8 * t8
    i_k = tl.arange(0, 4)[None, None, :, None]
    sh_k = (i_k // 2) * 8
    m_k = tl.where(i_k % 2 == 0, 0x000F000F, 0x00F000F0)
    # value A: element 4j + 2pg + u (j = 2 * byte + odd) from PRMT of the tokens' words
    byt = tl.arange(0, 4)[None, :, None, None]
    sel = byt | (byt << 4) | ((byt + 4) << 8) | ((byt + 4) << 12)
    m_v = tl.where(tl.arange(0, 2)[None, None, :, None, None] == 0, 0x000F000F, 0x00F000F0)
    tok4 = 2 * q + tl.where(u4 < 2, u4, u4 + 6)  # [32, 4]: 2q, 2q + 1, 2q + 8, 2q + 9
    col = r % 2  # value B column parity: high part (0) or low part (1)
    gv = r // 2  # value group of the column (lanes r >= 4 give zero columns)

    m_i = tl.max(tl.full([32], -1.0e30, tl.float32), axis=0)
    l2 = tl.zeros([32, 2], tl.float32)
    acc = tl.zeros([32, 32], tl.float32)
    acc_lo = tl.zeros([32, 4], tl.float32)
    if PREFETCH:
        kw0_n, kw1_n, vw0_n, vw1_n, vw8_n, vw9_n = _tile_words(t_lo * 16, end, b, h, r, q, u4, u2, kc_ptr, vc_ptr,
                                                               tbl_ptr, stbl_b, skc_b, skc_h, skc_t, svc_b, svc_h,
                                                               svc_t, PAGED, PAGE)
    for tile in range(t_lo, t_hi):
        n0 = tile * 16
        loc, _, _, _, vs_base = _tile_bases(n0, b, h, tbl_ptr, stbl_b, 0, 0, 0, 0, 0, 0, svs_b, svs_h, PAGED, PAGE)
        g = n0 // GK
        if PREFETCH:  # this tile's words came with the last one; load the next tile's now
            kw0, kw1, vw0, vw1, vw8, vw9 = kw0_n, kw1_n, vw0_n, vw1_n, vw8_n, vw9_n
            kw0_n, kw1_n, vw0_n, vw1_n, vw8_n, vw9_n = _tile_words(n0 + 16, end, b, h, r, q, u4, u2, kc_ptr, vc_ptr,
                                                                   tbl_ptr, stbl_b, skc_b, skc_h, skc_t, svc_b,
                                                                   svc_h, svc_t, PAGED, PAGE)
        else:
            kw0, kw1, vw0, vw1, vw8, vw9 = _tile_words(n0, end, b, h, r, q, u4, u2, kc_ptr, vc_ptr, tbl_ptr, stbl_b,
                                                       skc_b, skc_h, skc_t, svc_b, svc_h, svc_t, PAGED, PAGE)
        bk = tl.load(bk_ptr + ((pid * G + g) * 8 + lane[:, None]) * 16 + (e32 // 4) * 2 + (e32 % 4) // 2,
                     mask=lane[:, None] < 8, other=0)
        vmask = (r < 4) & (n0 + tok4 < end)
        vs_off = vs_base + (loc + tok4) * svs_t + gv
        sv = tl.load(vs_ptr + vs_off, mask=vmask, other=0.0).to(tl.float32)
        lv = tl.load(vl_ptr + vs_off, mask=vmask, other=0.0).to(tl.float32)
        bias = tl.load(bias_ptr + pid * G + g)

        # ---- scores: 8 products of 16 tokens x 16 dims, summed in the thread
        kw = tl.join(kw0, kw1)[:, :, None, :]  # [32, 4 (u), 1, 2 (t8)]
        ak = tl.reshape(_minus_1024(((kw >> sh_k) & m_k) | magic, magic), [32, 32])
        ck = tl.sum(tl.reshape(_mma(ak, bk, tl.zeros([32, 32], tl.float32)), [32, 8, 4]), axis=1)
        c_hi, c_lo = tl.split(tl.reshape(ck, [32, 2, 2]))  # columns 0 and 1 of rows r, r + 8
        tok2 = n0 + r + 8 * t8
        s = tl.where((q == 0) & (tok2 < T) & (tok2 <= qpos), c_hi + c_lo + bias, float("-inf"))

        # ---- online softmax (lanes with q = 0 hold the scores); rescale only when the max grows
        p, m_i, acc, acc_lo, l2 = _online_softmax(s, tl.max(tl.max(s, axis=1), axis=0), m_i, acc, acc_lo, l2)

        # ---- values: B = p * scale (float16 high / low parts) in the lanes' columns
        pb = tl.reshape(tl.join(p, p), [32, 4]).to(tl.int32, bitcast=True)
        p4 = _spread_p(pb).to(tl.float32, bitcast=True)  # [32, 4]: tokens 2q, 2q+1, 2q+8, 2q+9
        pv = p4 * sv
        hi = pv.to(tl.float16)
        val = tl.where(col == 0, hi, (pv - hi.to(tl.float32)).to(tl.float16))
        acc_lo += tl.where(col == 0, p4 * lv, 0.0)
        b_lo, b_hi = tl.split(tl.reshape(_half_bits(val), [32, 2, 2]))  # tokens (2q, 2q+8), (2q+1, 2q+9)
        bv = b_lo | (b_hi << 16)  # [32, 2]: b0b1, b2b3
        bv = tl.reshape(tl.broadcast_to(tl.reshape(tl.join(bv, bv), [32, 1, 4]), [32, 8, 4]), [32, 32])
        xa = tl.permute(tl.join(vw0, vw8), (0, 2, 1))[:, None, :, :]  # [32, 1, 2 (pg), 2 (u)]
        xb = tl.permute(tl.join(vw1, vw9), (0, 2, 1))[:, None, :, :]
        y = _prmt(xa, xb, sel)  # [32, 4 (byte), 2, 2]
        av = tl.reshape(_minus_1024((y[:, :, None, :, :] & m_v) | magic, magic), [32, 32])
        acc = _mma(av, bv, acc)

    # ---- this split's partial result
    ps_idx = (split_base + split) * (tl.num_programs(0) // M) + bh
    tl.store(m_ptr + ps_idx * M + rq, m_i)
    tl.store(l_ptr + ps_idx * M + rq, tl.sum(tl.sum(l2, axis=1), axis=0))
    # group g's offsets: sum(p * lo)
    lo0 = tl.sum(tl.sum(tl.where(gv == 0, acc_lo, 0.0), axis=1), axis=0)
    lo1 = tl.sum(tl.sum(tl.where(gv == 1, acc_lo, 0.0), axis=1), axis=0)
    ce, co = tl.split(tl.reshape(acc, [32, 8, 2, 2]))  # columns 2q and 2q + 1 of rows r, r + 8
    og = r // 4  # the group of dimensions 16r + j and 16r + 8 + j; lane q = og holds its columns
    j = tl.arange(0, 8)[None, :, None]
    f = tl.where(j % 2 == 0, 1.0, 0.0625)
    o = (ce + co) * f + tl.where(og == 0, lo0, lo1)[:, :, None]
    dim = 16 * r[:, :, None] + j + 8 * tl.arange(0, 2)[None, None, :]
    tl.store(o_ptr + (ps_idx * M + rq) * 128 + dim, o, mask=(q == og)[:, :, None])


def launch(q2, kside: tuple, vside: tuple, gk: int, part, split_base: int, n_splits: int, tiles_per_split: int,
           qoff: int, T: int, hkv: int, m_rows: int, L: int, table: tuple, prefetch: bool) -> None:
    """Run the key-operand and decode kernels for one segment into ``part`` (from ``decode_attention._launch``).

    ``q2``: float32 [B * Hkv, M, 128] (scale * log2 e folded in); ``kside``/``vside``: a
    ``QuantBlock`` that ``supported`` accepts as ``decode_attention._side_arrays`` gives it
    (int32 code words, scale, offset, their strides); ``gk``: the key group size; ``table``:
    ``(table, lengths, table stride, page size, paged)``; ``prefetch``: load each tile's code
    words while the previous tile is computed.
    """
    kc, ks, kl, skc, sks = kside
    vc, vs, vl, svc, svs = vside
    tbl, lens, stbl, page, paged = table
    rows = q2.shape[0] * m_rows
    g = triton.cdiv(T, gk)
    bk = torch.empty((rows, g, 8, 16), dtype=torch.int32, device=q2.device)
    bias = torch.empty((rows, g), dtype=torch.float32, device=q2.device)
    _key_operands_kernel[(rows, g)](q2, ks, kl, bk, bias, tbl, lens, *sks, stbl, T, g, hkv, m_rows, GK=gk,
                                    PAGED=paged, PAGE=page, num_warps=1)
    _decode_kernel[(rows, n_splits)](
        bk, bias, kc, vc, vs, vl, part.o, part.m, part.l, tbl, lens, *skc, *svc, *svs, stbl,
        T, g, qoff, tiles_per_split, split_base, hkv, m_rows, L, _MAGIC_H2, GK=gk, PAGED=paged, PAGE=page,
        PREFETCH=prefetch, num_warps=1, num_stages=1)
