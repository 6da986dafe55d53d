"""Decode attention over 4- or 8-bit K and V on the integer matrix units (``mma.sync`` u8, inline PTX).

The codes are unsigned bytes already (8-bit) or one mask away from them (4-bit: ``w & 0x0F0F0F0F``
and ``w & 0xF0F0F0F0``, the second 16 times the code, which the other operand absorbs), so they
enter ``mma.sync.m16n8k32`` with no conversion to floating point. The other operand is made
integer instead, in fixed point with 8-bit limbs in separate columns: the sums are exact int32,
the limbs are weighted back in float32 once per tile (keys) or once per flush (values).

One program: one query row (of ``M`` per KV head), one split, one warp, 32-token tiles, one or
two (``STEP``) per loop step under one softmax step. Lane ``l``: ``g = l // 4``, ``t = l % 4``
(fragment layouts in ``ptx``).

* Keys: ``S = A B``, A the codes (16 tokens x 32 dimensions per k-step, two m-tiles, four
  k-steps), B the query times the key scale, ``round(q_d s_d 2**e)`` in three signed limbs
  (columns 0-2), with ``2**-e`` and the group's bias ``q . lo``, made every step from the key
  scales (``_key_operands``). Lane ``(g, t)`` loads tokens ``4g .. 4g + 3``; the head
  dimensions are permuted so its words are its A registers, and B takes the same permutation.
  Its score lanes (``t = 0``) end with those four tokens' scores.
* Values: ``O = A B``, A the codes transposed (16 dimensions x 32 tokens per m-tile, eight
  m-tiles), B ``p * scale`` in fixed point (``x < 2**23``: a float add of ``2**23`` rounds it and
  leaves its three bytes as limbs; column ``3G + limb`` for value group ``G``). Lane ``(g, t)``
  loads dimensions ``16g .. 16g + 15`` of tokens ``4t + i`` and ``4t + 16 + i`` and transposes
  bytes so a register holds four tokens. The int32 accumulators are folded into float32 only
  when the softmax reference moves (it moves when a score passes it by more than ``_TAU``, so p
  stays below ``2**_TAU``) or every ``_FLUSH_TILES`` tiles, against overflow; the float32
  output waits in the split's partial-output row between folds, not in registers. The fixed
  point ``F`` follows the largest value scale seen so far (set to twice a step's largest when
  one passes it, at a fold), so no pass over the split's scales precedes the loop.
* Loads (sm_90, ``STAGES``): lane 0 has the TMA unit copy whole tiles (key rows, value rows,
  value scales and offsets) into a ring of shared-memory stages ``STAGES - 1`` steps ahead, each
  stage with an mbarrier; the warp waits for a stage's phase and reads its words from shared
  memory. Bytes on their way then take no registers. Elsewhere the next step's key words are
  loaded into registers an iteration ahead, and the value words at the top of the step.
* Swapped pairs (with the stages). A stage holds the tile as it is in memory (a bulk copy does
  not swizzle), so lanes reading the same offset of rows 256 bytes apart hit the same banks:
  Nsight Compute counted 112 shared-memory wavefronts per 4-bit tile where 48 would do, and the
  L1 data pipe 77% busy. So key lanes of odd ``g`` hold tokens ``4g + (i ^ 1)`` in their i-th
  words, and value lanes of odd ``t`` tokens ``4t + (i ^ 1)`` (and ``+ 16``): rows an odd number
  apart lie on the other half of the banks. The two swaps meet: a value lane's p come from key
  lanes ``g = t`` and ``t + 4``, of ``t``'s parity, so its B rows and A columns name the same
  tokens; the value scales are read in that order too, and only the scores' token numbers
  (``tok_at``) change. 4-bit 0.790 -> 0.713-0.718 ms at batch 16 / 32K, same process.

Only the layout of one config is taken (``supported``): head dim 128, 4- or 8-bit codes on each
side, value groups of 64, key groups of at least 32, float16/bfloat16 scales.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from ...base import QuantBlock
from . import capability, ptx
from .decode_attention import _row_program_at, _tile_bases

if os.environ.get("TRITON_INTERPRET") == "1":
    ptx.emulate_in_interpreter()

TILE = 32
_TAU = tl.constexpr(3.0)  # the softmax reference moves when a score passes it by more than this (log2)
_P_MAX = tl.constexpr(8.0)  # 2**_TAU: the largest p
_FLUSH_TILES = tl.constexpr(1024)  # a tile adds below 255 * 255 * 32 < 2**21 to a value accumulator
_X_RANGE = tl.constexpr(8388608.0 - 65536.0)  # fixed-point values of p * scale stay below 2**23
_I2F = tl.constexpr(0x4B400000)  # bits of 1.5 * 2**23; plus an int32 n, |n| < 2**22: the float n + 12582912


def supported(side_k, side_v, device: torch.device, page: int | None = None) -> bool:
    """Whether a (K, V) segment (paged with ``page`` tokens per page, if given) can take this kernel."""
    if not (isinstance(side_k, QuantBlock) and isinstance(side_v, QuantBlock)):
        return False
    interp = os.environ.get("TRITON_INTERPRET") == "1"
    if not interp and (device.type != "cuda" or torch.version.hip or capability(device)[0] < 8):
        return False
    ks, vs = side_k.spec, side_v.spec
    gk = ks.group_size
    return (ks.bits in (4, 8) and vs.bits in (4, 8) and side_k.codes.shape[-1] * ks.per_byte == 128
            and side_k.codes.shape[2] % TILE == 0
            and side_v.codes.shape[-1] * vs.per_byte == 128 and vs.group_size == 64 and gk >= TILE
            and gk & (gk - 1) == 0 and side_k.scale.dtype != torch.float32 and side_v.scale.dtype != torch.float32
            and (page is None or page % TILE == 0))


_LO4 = tl.constexpr(0x0F0F0F0F)
_HI4 = tl.constexpr(-0x0F0F0F10)  # 0xF0F0F0F0 as int32


@triton.jit
def _split4(x):
    """The 4 columns of ``x`` [32, 4] ([32] each)."""
    a, b = tl.split(tl.reshape(x, [32, 2, 2]))
    x0, x2 = tl.split(a)
    x1, x3 = tl.split(b)
    return x0, x1, x2, x3


@triton.jit
def _key_words(tile, t_hi, end, b, h, g, t, u4, kc_ptr, tbl_ptr, stbl_b, skc_b, skc_h, skc_t, KBITS: tl.constexpr,
               PAGED: tl.constexpr, PAGE: tl.constexpr):
    """Key words of tile ``tile``'s tokens ``4g + e`` (4-bit [32, 4], 8-bit [32, 4, 2]). Nothing
    from ``end`` on (a multiple of 32: segments hold whole key groups, so a tile is all in or all
    out); a tile past ``t_hi`` reads (masked) at the last tile's addresses."""
    ok = tile * 32 + tl.zeros([32, 1], tl.int32) < end
    at = tl.minimum(tile, t_hi - 1) * 32
    loc, k_base, _, _, _ = _tile_bases(at, b, h, tbl_ptr, stbl_b, skc_b, skc_h, 0, 0, 0, 0, 0, 0, PAGED, PAGE)
    tok = 4 * g
    if KBITS == 4:  # words 4t .. 4t + 3
        p = kc_ptr + k_base + 4 * t + u4
        k0 = tl.load(p + (loc + tok) * skc_t, mask=ok, other=0)
        k1 = tl.load(p + (loc + tok + 1) * skc_t, mask=ok, other=0)
        k2 = tl.load(p + (loc + tok + 2) * skc_t, mask=ok, other=0)
        k3 = tl.load(p + (loc + tok + 3) * skc_t, mask=ok, other=0)
    else:  # words 8t .. 8t + 7, two 16-byte loads
        p = kc_ptr + k_base + 8 * t + u4
        k0 = _load8(p + (loc + tok) * skc_t, ok)
        k1 = _load8(p + (loc + tok + 1) * skc_t, ok)
        k2 = _load8(p + (loc + tok + 2) * skc_t, ok)
        k3 = _load8(p + (loc + tok + 3) * skc_t, ok)
    return k0, k1, k2, k3


@triton.jit
def _scale_loads(tile, t_hi, b, h, kd, tbl_ptr, stbl_b, ks_ptr, kl_ptr, sks_b, sks_h, sks_t, GK: tl.constexpr,
                 PAGED: tl.constexpr, PAGE: tl.constexpr):
    """The key scales and offsets of tile ``tile``'s group at the lane's dimensions ``kd`` [32, 4]
    (past ``t_hi``: the last tile's)."""
    at = tl.minimum(tile, t_hi - 1) * 32
    loc, _, ks_base, _, _ = _tile_bases(at, b, h, tbl_ptr, stbl_b, 0, 0, sks_b, sks_h, 0, 0, 0, 0, PAGED, PAGE)
    row = ks_base + (loc // GK) * sks_t
    return tl.load(ks_ptr + row + kd), tl.load(kl_ptr + row + kd)


@triton.jit
def _key_operands(q4, qx4, sc):
    """A key group's B registers ([32, 4] twice, as ``_key_d`` takes them), ``2**-e`` and bias,
    made in the decode kernel from the group's scales ``ks`` and offsets ``kl`` at the lane's four
    dimensions (those of B register ``g`` of the lanes of column ``t``): ``x = q * scale`` (``qx4``,
    with the 4-bit high nibbles' 1/16), fixed point ``round(x 2**(21 - e))`` (``2**e`` above the
    group's largest ``|x|``), its three balanced limbs as the bytes of ``x + 0x808080`` with the top bits flipped,
    moved to the lanes that hold them by ``ptx.key_b``. Bias: ``q . offset`` over the warp.
    ``sc``: ``(ks, kl)`` as ``_scale_loads`` gives them."""
    ks, kl = sc
    x = qx4 * ks.to(tl.float32)
    amax = tl.max(tl.max(tl.abs(x), axis=1), axis=0)
    ex = ((amax.to(tl.int32, bitcast=True) >> 23) & 0xFF) - 127  # amax < 2**(ex + 1)
    ex = tl.minimum(tl.maximum(ex, -100), 100)
    up = ((148 - ex) << 23).to(tl.float32, bitcast=True)  # 2**(21 - ex): |x| * up < 2**22
    down = ((106 + ex) << 23).to(tl.float32, bitcast=True)
    # bits of x * up + 1.5 * 2**23 minus _I2F are round(x * up); plus 0x808080, byte k is limb k + 128
    u = (x * up + 12582912.0).to(tl.int32, bitcast=True) - (_I2F - 0x808080)
    u0, u1, u2, u3 = _split4(u)
    w0, w1, w2, _ = ptx.transpose4(u0, u1, u2, u3)
    flip = -0x7F7F7F80  # 0x80808080 as int32: limb + 128 -> the limb's two's-complement byte
    b0, b1, b2, b3, b4, b5, b6, b7 = ptx.key_b(w0 ^ flip, w1 ^ flip, w2 ^ flip)
    bias = tl.sum(tl.sum(q4 * kl.to(tl.float32), axis=1), axis=0)
    return _join4(b0, b1, b2, b3), _join4(b4, b5, b6, b7), down, bias


@triton.jit
def _step_key_words(tile, t_hi, end, b, h, g, t, u4, kc_ptr, tbl_ptr, stbl_b, skc_b, skc_h, skc_t,
                    KBITS: tl.constexpr, PAGED: tl.constexpr, PAGE: tl.constexpr, STEP: tl.constexpr):
    """``_key_words`` of the ``STEP`` tiles from ``tile`` on (a tuple)."""
    a = _key_words(tile, t_hi, end, b, h, g, t, u4, kc_ptr, tbl_ptr, stbl_b, skc_b, skc_h, skc_t, KBITS, PAGED, PAGE)
    if STEP == 1:
        r = (a,)
    else:
        r = (a, _key_words(tile + 1, t_hi, end, b, h, g, t, u4, kc_ptr, tbl_ptr, stbl_b, skc_b, skc_h, skc_t, KBITS,
                           PAGED, PAGE))
    return r


@triton.jit
def _join4(x0, x1, x2, x3):
    """[32, 4] of four [32] (``_split4``'s inverse)."""
    return tl.reshape(tl.join(tl.join(x0, x2), tl.join(x1, x3)), [32, 4])


@triton.jit
def _value_loads(tile, t_hi, end, b, h, g, t, gs, gl, vc_ptr, vs_ptr, vl_ptr, tbl_ptr, stbl_b, svc_b, svc_h, svc_t,
                 svs_b, svs_h, svs_t, VBITS: tl.constexpr, PAGED: tl.constexpr, PAGE: tl.constexpr,
                 SCONTIG: tl.constexpr):
    """What tile ``tile``'s value product reads, issued together (masks as ``_key_words``): value
    words of tokens ``4t + i + 16Q`` ([32, J] each, Q-major), value scales and offsets [32, 4 (i), 2 (Q)]."""
    ok = tile * 32 + tl.zeros([32, 1], tl.int32) < end
    at = tl.minimum(tile, t_hi - 1) * 32
    loc, _, _, v_base, vs_base = _tile_bases(at, b, h, tbl_ptr, stbl_b, 0, 0, 0, 0, svc_b, svc_h, svs_b, svs_h, PAGED,
                                             PAGE)
    J: tl.constexpr = 2 if VBITS == 4 else 4
    pv = vc_ptr + v_base + J * g + tl.arange(0, J)[None, :]
    tv = 4 * t
    v00 = tl.load(pv + (loc + tv) * svc_t, mask=ok, other=0)
    v01 = tl.load(pv + (loc + tv + 1) * svc_t, mask=ok, other=0)
    v02 = tl.load(pv + (loc + tv + 2) * svc_t, mask=ok, other=0)
    v03 = tl.load(pv + (loc + tv + 3) * svc_t, mask=ok, other=0)
    v10 = tl.load(pv + (loc + tv + 16) * svc_t, mask=ok, other=0)
    v11 = tl.load(pv + (loc + tv + 17) * svc_t, mask=ok, other=0)
    v12 = tl.load(pv + (loc + tv + 18) * svc_t, mask=ok, other=0)
    v13 = tl.load(pv + (loc + tv + 19) * svc_t, mask=ok, other=0)
    if SCONTIG:  # [.., T, 2] scales: four tokens' two groups in one 16-byte load
        so = vs_base + (loc + tv) * 2 + tl.arange(0, 8)[None, :]
        sv = _pick_group(tl.load(vs_ptr + so, mask=ok, other=0.0), tl.load(vs_ptr + so + 32, mask=ok, other=0.0), gs)
        lv = _pick_group(tl.load(vl_ptr + so, mask=ok, other=0.0), tl.load(vl_ptr + so + 32, mask=ok, other=0.0), gl)
    else:
        ts = tv[:, :, None] + tl.arange(0, 4)[None, :, None] + 16 * tl.arange(0, 2)[None, None, :]
        vs_off = vs_base + (loc + ts) * svs_t
        sv = tl.load(vs_ptr + vs_off + gs[:, :, None], mask=ok[:, :, None], other=0.0)
        lv = tl.load(vl_ptr + vs_off + gl[:, :, None], mask=ok[:, :, None], other=0.0)
    return v00, v01, v02, v03, v10, v11, v12, v13, sv, lv


@triton.jit
def _step_value_loads(tile, t_hi, end, b, h, g, t, gs, gl, vc_ptr, vs_ptr, vl_ptr, tbl_ptr, stbl_b, svc_b, svc_h,
                      svc_t, svs_b, svs_h, svs_t, VBITS: tl.constexpr, PAGED: tl.constexpr, PAGE: tl.constexpr,
                      SCONTIG: tl.constexpr, STEP: tl.constexpr):
    """``_value_loads`` of the ``STEP`` tiles from ``tile`` on (a tuple of their tuples)."""
    a = _value_loads(tile, t_hi, end, b, h, g, t, gs, gl, vc_ptr, vs_ptr, vl_ptr, tbl_ptr, stbl_b, svc_b, svc_h,
                     svc_t, svs_b, svs_h, svs_t, VBITS, PAGED, PAGE, SCONTIG)
    if STEP == 1:
        r = (a,)
    else:
        r = (a, _value_loads(tile + 1, t_hi, end, b, h, g, t, gs, gl, vc_ptr, vs_ptr, vl_ptr, tbl_ptr, stbl_b, svc_b,
                             svc_h, svc_t, svs_b, svs_h, svs_t, VBITS, PAGED, PAGE, SCONTIG))
    return r


@triton.jit
def _l2_tiles(tile, end, b, h, kc_ptr, vc_ptr, vs_ptr, tbl_ptr, stbl_b, skc_b, skc_h, skc_t, svc_b, svc_h, svc_t,
              svs_b, svs_h, N: tl.constexpr, PAGED: tl.constexpr, PAGE: tl.constexpr, SCONTIG: tl.constexpr):
    """Ask for the key words, value words and (``SCONTIG``) value scales of the ``N`` tiles from
    ``tile`` on to be brought into L2 (``ptx.l2_bulk``, lane 0); none from ``end`` on. Rows of codes
    are contiguous along the tokens (``launch`` checks it)."""
    lane = tl.arange(0, 32)
    for i in tl.static_range(N):
        n0 = (tile + i) * 32
        on = ((lane == 0) & (n0 < end)).to(tl.int32)
        k_at, v_at, vs_at, _ = _tile_sources(n0, end, b, h, kc_ptr, vc_ptr, vs_ptr, vs_ptr, tbl_ptr, stbl_b, skc_b,
                                             skc_h, skc_t, svc_b, svc_h, svc_t, svs_b, svs_h, PAGED, PAGE)
        ptx.l2_bulk(on, k_at, 128 * skc_t + 0 * lane)
        ptx.l2_bulk(on, v_at, 128 * svc_t + 0 * lane)
        if SCONTIG:
            ptx.l2_bulk(on, vs_at, 128 + 0 * lane)


@triton.jit
def _tile_sources(n0, end, b, h, kc_ptr, vc_ptr, vs_ptr, vl_ptr, tbl_ptr, stbl_b, skc_b, skc_h, skc_t, svc_b, svc_h,
                  svc_t, svs_b, svs_h, PAGED: tl.constexpr, PAGE: tl.constexpr):
    """Global byte addresses (int64 [32], the same in every lane) of the 32-token tile at token
    ``n0``: its key rows, value rows, value scales and value offsets (``[.., T, 2]``). A tile from
    ``end`` on takes the last tile's addresses (the bulk operations that read them are off)."""
    loc, k_base, _, v_base, vs_base = _tile_bases(tl.minimum(n0, tl.maximum(end - 32, 0)), b, h, tbl_ptr, stbl_b,
                                                  skc_b, skc_h, 0, 0, svc_b, svc_h, svs_b, svs_h, PAGED, PAGE)
    zero = tl.zeros([32], tl.int64)
    return ((kc_ptr + k_base + loc * skc_t).to(tl.int64, bitcast=True) + zero,
            (vc_ptr + v_base + loc * svc_t).to(tl.int64, bitcast=True) + zero,
            (vs_ptr + vs_base + loc * 2).to(tl.int64, bitcast=True) + zero,
            (vl_ptr + vs_base + loc * 2).to(tl.int64, bitcast=True) + zero)


@triton.constexpr_function
def _tile_stage_bytes(kbits, vbits):
    """Bytes of one 32-token tile in a shared-memory stage: key rows, value rows, value scales and
    offsets (host code and kernels alike)."""
    return 512 * kbits + 512 * vbits + 256


@triton.jit
def _stage_tiles(tile, end, b, h, dst, bar, kc_ptr, vc_ptr, vs_ptr, vl_ptr, tbl_ptr, stbl_b, skc_b, skc_h, skc_t,
                 svc_b, svc_h, svc_t, svs_b, svs_h, KBITS: tl.constexpr, VBITS: tl.constexpr, N: tl.constexpr,
                 PAGED: tl.constexpr, PAGE: tl.constexpr):
    """Lane 0 asks the TMA unit to copy the ``N`` tiles from ``tile`` on (none from ``end`` on)
    into the shared-memory stage at ``dst``, counted on the stage's barrier ``bar``, which it
    arrives at. A tile's place in the stage: its key rows, value rows, value scales and value
    offsets, one after another (``_tile_stage_bytes``); the next tile follows. Rows of codes are
    contiguous along the tokens, value scales and offsets ``[.., T, 2]`` (``launch`` checks it)."""
    lane = tl.arange(0, 32)
    KT: tl.constexpr = 512 * KBITS
    VT: tl.constexpr = 512 * VBITS
    TB: tl.constexpr = _tile_stage_bytes(KBITS, VBITS)
    lead = (lane == 0).to(tl.int32)
    n_in = 0
    for i in tl.static_range(N):
        n_in += ((tile + i) * 32 < end).to(tl.int32)
    ptx.arrive_tx(lead, bar + 0 * lane, n_in * TB + 0 * lane)
    for i in tl.static_range(N):
        n0 = (tile + i) * 32
        on = lead * (n0 < end).to(tl.int32)
        k_at, v_at, vs_at, vl_at = _tile_sources(n0, end, b, h, kc_ptr, vc_ptr, vs_ptr, vl_ptr, tbl_ptr, stbl_b,
                                                 skc_b, skc_h, skc_t, svc_b, svc_h, svc_t, svs_b, svs_h, PAGED, PAGE)
        d = dst + i * TB + 0 * lane
        bb = bar + 0 * lane
        ptx.bulk_copy(on, d, k_at, KT + 0 * lane, bb)
        ptx.bulk_copy(on, d + KT, v_at, VT + 0 * lane, bb)
        ptx.bulk_copy(on, d + (KT + VT), vs_at, 128 + 0 * lane, bb)
        ptx.bulk_copy(on, d + (KT + VT + 128), vl_at, 128 + 0 * lane, bb)


@triton.jit
def _pin(x, ptr, never):
    """``x`` [32, n], its value unchanged, as the result of a load that never happens (``never``
    is false at run time, which the compiler cannot know) from ``ptr`` [32, n] (rows of ``n``
    contiguous elements): loads anchor Triton's layouts, so ``x`` and what is made from it keep
    one row per lane, as the loads of the unstaged kernel have them, where the shared-memory
    reads (inline asm) alone leave the layouts to defaults that spread rows over lanes."""
    N: tl.constexpr = x.shape[1]
    return tl.load(ptr + tl.arange(0, 32)[:, None] * N + tl.arange(0, N)[None, :], mask=never, other=x)


@triton.jit
def _staged_key_words(src, tok, kc_ptr, never, KBITS: tl.constexpr):
    """``_key_words`` of the tile at shared address ``src`` (its key rows first, 16 * KBITS bytes
    each: ``_stage_tiles``), read after ``tok`` (``ptx.wait``); ``kc_ptr``, ``never``: ``_pin``'s."""
    lane = tl.arange(0, 32)
    row = 16 * KBITS
    a = src + 4 * (lane // 4) * row + 4 * KBITS * (lane % 4)  # token 4g, words KBITS * t on
    # odd lane groups read tokens 4g + (i ^ 1) (swapped pairs, module doc): at 4 bits the two
    # groups of a quarter-warp then read the two halves of the banks, not the same half
    a0, a1 = _swapped_rows(a, (lane // 4) % 2, row)
    k0 = _staged_words(tok, a0, kc_ptr, never, KBITS)
    k1 = _staged_words(tok, a1, kc_ptr, never, KBITS)
    k2 = _staged_words(tok, a0 + 2 * row, kc_ptr, never, KBITS)
    k3 = _staged_words(tok, a1 + 2 * row, kc_ptr, never, KBITS)
    return k0, k1, k2, k3


@triton.jit
def _swapped_rows(a, par, row):
    """Shared addresses of the lane's rows 0 and 1 (``row`` bytes apart from ``a`` on), the other
    way round where ``par`` is 1 (swapped pairs, module doc); rows 2 and 3 follow each by ``2 * row``."""
    return a + par * row, a + (1 - par) * row


@triton.jit
def _staged_words(tok, a, ptr, never, KBITS: tl.constexpr):
    """Words 0-3 (4-bit: [32, 4]) or 0-7 (8-bit: [32, 4, 2] as ``_load8``) at shared address ``a``."""
    w = ptx.lds128(tok, a)
    x = _pin(_join4(w[0], w[1], w[2], w[3]), ptr, never)
    if KBITS == 8:
        v = ptx.lds128(tok, a + 16)
        x = tl.join(x, _pin(_join4(v[0], v[1], v[2], v[3]), ptr, never))
    return x


@triton.jit
def _staged_value_loads(src, tok, ok, gs, gl, vs_ptr, vc_ptr, f32_ptr, never, KBITS: tl.constexpr,
                        VBITS: tl.constexpr):
    """``_value_loads`` of the tile at shared address ``src`` (``_stage_tiles``: key rows, value
    rows, value scales and offsets), read after ``tok``; scales and offsets of a tile past the
    end (``ok`` false: its stage holds stale bytes) are 0, as the loads' masks make them.
    ``vc_ptr``, ``f32_ptr`` (int32 and float32 rows, never read) and ``never``: ``_pin``'s."""
    lane = tl.arange(0, 32)
    g = lane // 4
    t = lane % 4
    row = 16 * VBITS
    v = src + 512 * KBITS
    a = v + 4 * t * row + 2 * VBITS * g  # the dimensions 16g .. 16g + 15 of token 4t
    # odd t read tokens 4t + (i ^ 1) (swapped pairs, module doc): at 4 bits a half-warp's four t
    # then take two halves of the banks (2-way conflicts, not 4-way); the scales below follow
    par = t % 2
    a0, a1 = _swapped_rows(a, par, row)
    v00 = _staged_value_words(tok, a0, vc_ptr, never, VBITS)
    v01 = _staged_value_words(tok, a1, vc_ptr, never, VBITS)
    v02 = _staged_value_words(tok, a0 + 2 * row, vc_ptr, never, VBITS)
    v03 = _staged_value_words(tok, a1 + 2 * row, vc_ptr, never, VBITS)
    v10 = _staged_value_words(tok, a0 + 16 * row, vc_ptr, never, VBITS)
    v11 = _staged_value_words(tok, a1 + 16 * row, vc_ptr, never, VBITS)
    v12 = _staged_value_words(tok, a0 + 18 * row, vc_ptr, never, VBITS)
    v13 = _staged_value_words(tok, a1 + 18 * row, vc_ptr, never, VBITS)
    s = v + 512 * VBITS + 16 * t  # tokens 4t .. 4t + 3: a word each, (group 0, group 1) halves
    # prmt selectors: the half of value group ``grp`` of the lane's own word (even t) or of its pair's
    sel_s = 0x10 + 0x22 * tl.reshape(gs, [32]) + 0x44 * par
    sel_l = 0x10 + 0x22 * tl.reshape(gl, [32]) + 0x44 * par
    sv = tl.join(_pin(_staged_group(tok, s, sel_s, vs_ptr), f32_ptr, never),
                 _pin(_staged_group(tok, s + 64, sel_s, vs_ptr), f32_ptr, never))
    lv = tl.join(_pin(_staged_group(tok, s + 128, sel_l, vs_ptr), f32_ptr, never),
                 _pin(_staged_group(tok, s + 192, sel_l, vs_ptr), f32_ptr, never))
    return v00, v01, v02, v03, v10, v11, v12, v13, tl.where(ok, sv, 0.0), tl.where(ok, lv, 0.0)


@triton.jit
def _staged_value_words(tok, a, ptr, never, VBITS: tl.constexpr):
    """A lane's value words of one token at shared address ``a``: [32, 2] (4-bit) or [32, 4]."""
    if VBITS == 4:
        x = ptx.lds64(tok, a)
        w = _pin(tl.join(x[0], x[1]), ptr, never)
    else:
        w = _staged_words(tok, a, ptr, never, 4)
    return w


@triton.jit
def _staged_group(tok, a, sel, vs_ptr):
    """One value group's scales of the four tokens' (group 0, group 1) scale pairs at shared
    address ``a``, as float32 [32, 4] (of the dtype of ``vs_ptr``'s elements): word ``i``'s half
    where ``sel`` [32] is ``0x10 + 0x22 * group``, word ``i ^ 1``'s where it is that plus ``0x44``
    (swapped pairs, module doc)."""
    w0, w1, w2, w3 = ptx.lds128(tok, a)
    x = _join4(ptx.prmt(w0, w1, sel), ptx.prmt(w1, w0, sel), ptx.prmt(w2, w3, sel), ptx.prmt(w3, w2, sel))
    return x.to(tl.int16).to(vs_ptr.dtype.element_ty, bitcast=True).to(tl.float32)


@triton.jit
def _staged_step(src, tok, tile, end, gs, gl, kc_ptr, vc_ptr, vs_ptr, f32_ptr, never, KBITS: tl.constexpr,
                 VBITS: tl.constexpr, STEP: tl.constexpr):
    """The key words (as ``_step_key_words``) and value loads (as ``_step_value_loads``) of the
    ``STEP`` tiles from ``tile`` on, from their stage at shared address ``src``."""
    TB: tl.constexpr = _tile_stage_bytes(KBITS, VBITS)
    kw0 = _staged_key_words(src, tok, kc_ptr, never, KBITS)
    vw0 = _staged_value_loads(src, tok, tile * 32 < end, gs, gl, vs_ptr, vc_ptr, f32_ptr, never, KBITS, VBITS)
    if STEP == 1:
        r = ((kw0,), (vw0,))
    else:
        kw1 = _staged_key_words(src + TB, tok, kc_ptr, never, KBITS)
        vw1 = _staged_value_loads(src + TB, tok, (tile + 1) * 32 < end, gs, gl, vs_ptr, vc_ptr, f32_ptr, never, KBITS,
                                  VBITS)
        r = ((kw0, kw1), (vw0, vw1))
    return r


@triton.jit
def _pick_group(x0, x1, grp):
    """Value group ``grp`` [32, 1] of four tokens' (group 0, group 1) pairs, [32, 8] for Q = 0
    (``x0``) and 1 (``x1``): [32, 4 (i), 2 (Q)]."""
    a0, b0 = tl.split(tl.reshape(x0, [32, 4, 2]))
    a1, b1 = tl.split(tl.reshape(x1, [32, 4, 2]))
    return tl.join(tl.where(grp == 0, a0, b0), tl.where(grp == 0, a1, b1))


@triton.jit
def _load8(p, ok):
    """Words 0-7 at ``p`` (which covers 0-3) as [32, 4, 2]: word ``u + 4 * last``."""
    return tl.join(tl.load(p, mask=ok, other=0), tl.load(p + 4, mask=ok, other=0))


@triton.jit
def _key_d(k0, k1, k2, k3, kb01, kb23, KBITS: tl.constexpr):
    """The key product's D fragment, 4 int32 [32, 2 (m-tile)]: lane (g, t) holds tokens ``4g + e``
    (m-tile ``e // 2``, row ``g + 8 * (e % 2)``)."""
    b00, b01, b10, b11 = _split4(kb01)
    b20, b21, b30, b31 = _split4(kb23)
    if KBITS == 4:  # word s gives k-step s: low nibbles, then high nibbles
        w00, w01, w02, w03 = _split4(k0)
        w10, w11, w12, w13 = _split4(k1)
        w20, w21, w22, w23 = _split4(k2)
        w30, w31, w32, w33 = _split4(k3)
        a00, a01, a02, a03 = _kstep4(w00, w10, w20, w30)
        a10, a11, a12, a13 = _kstep4(w01, w11, w21, w31)
        a20, a21, a22, a23 = _kstep4(w02, w12, w22, w32)
        a30, a31, a32, a33 = _kstep4(w03, w13, w23, w33)
    else:  # words 2s, 2s + 1 give k-step s
        w00, w01, w02, w03, w04, w05, w06, w07 = _words8(k0)
        w10, w11, w12, w13, w14, w15, w16, w17 = _words8(k1)
        w20, w21, w22, w23, w24, w25, w26, w27 = _words8(k2)
        w30, w31, w32, w33, w34, w35, w36, w37 = _words8(k3)
        a00, a01, a02, a03 = _kstep8(w00, w10, w20, w30, w01, w11, w21, w31)
        a10, a11, a12, a13 = _kstep8(w02, w12, w22, w32, w03, w13, w23, w33)
        a20, a21, a22, a23 = _kstep8(w04, w14, w24, w34, w05, w15, w25, w35)
        a30, a31, a32, a33 = _kstep8(w06, w16, w26, w36, w07, w17, w27, w37)
    return ptx.mma_keys(a00, a01, a02, a03, a10, a11, a12, a13, a20, a21, a22, a23, a30, a31, a32, a33,
                        b00[:, None], b01[:, None], b10[:, None], b11[:, None], b20[:, None], b21[:, None],
                        b30[:, None], b31[:, None])


@triton.jit
def _kstep4(w0, w1, w2, w3):
    """A registers of one k-step from word s of tokens 0-3 (4-bit): rows g (token 0 / 2 for
    m-tile 0 / 1) and g + 8 (token 1 / 3), low nibbles (k 4t ..) then high nibbles (k 4t + 16 ..)."""
    r0 = tl.join(w0, w2)
    r1 = tl.join(w1, w3)
    return r0 & _LO4, r1 & _LO4, r0 & _HI4, r1 & _HI4


@triton.jit
def _kstep8(w0, w1, w2, w3, v0, v1, v2, v3):
    """A registers of one k-step (8-bit): word 2s (``w``) and 2s + 1 (``v``) of tokens 0-3."""
    return tl.join(w0, w2), tl.join(w1, w3), tl.join(v0, v2), tl.join(v1, v3)


@triton.jit
def _words8(k):
    """The 8 words of a [32, 4, 2] load pair, each [32]: word ``u + 4 * last``."""
    lo, hi = tl.split(k)
    x0, x1, x2, x3 = _split4(lo)
    x4, x5, x6, x7 = _split4(hi)
    return x0, x1, x2, x3, x4, x5, x6, x7


@triton.jit
def _value_regs(w0, w1, w2, w3, VBITS: tl.constexpr):
    """The two A registers (half 0, 1), [32, 8 (m-tile)], of four tokens' value words [32, J]:
    bytes transposed so a register holds the four tokens of one dimension."""
    r0, r1, r2, r3 = ptx.transpose4(w0, w1, w2, w3)  # byte b of the four tokens, [32, J]
    if VBITS == 4:  # m-tile (J, i, jj) from byte i + 2jj; half 0 / 1: low / high nibbles
        v = tl.reshape(tl.join(tl.join(r0, r1), tl.join(r2, r3)), [32, 8])
        return v & _LO4, v & _HI4
    else:  # m-tile (J, jj), half i: byte i + 2jj
        return tl.reshape(tl.join(r0, r2), [32, 8]), tl.reshape(tl.join(r1, r3), [32, 8])


@triton.jit
def _fold(c0, c1, c2, c3, w0, w1, f, VBITS: tl.constexpr):
    """int32 value accumulators (the D fragment, [32, 8] each) at fixed point ``f`` -> float32
    [32, 8] of half 0 and 1: the lane's columns weighted (``w0``/``w1``: columns ``2t``/``2t + 1``,
    times ``1 / f``, and 1/16 for the high nibbles' half at 4-bit), summed over the 4 lanes of the group."""
    h0 = tl.where(f > 0, 1.0 / f, 0.0)
    if VBITS == 4:  # rows g + 8 hold high nibbles: 16 * code
        h1 = 0.0625 * h0
    else:
        h1 = h0
    x0 = c0.to(tl.float32) * (w0 * h0) + c1.to(tl.float32) * (w1 * h0)
    x1 = c2.to(tl.float32) * (w0 * h1) + c3.to(tl.float32) * (w1 * h1)
    return ptx.bfly(ptx.bfly(x0, 1), 2), ptx.bfly(ptx.bfly(x1, 1), 2)


@triton.jit
def _scores(n0, ko, kw, end, qpos, tok_at, t, wk0, wk1, KBITS: tl.constexpr):
    """Base-2 scores [32, 4] of the 32-token tile at ``n0`` in lanes t = 0 (tokens ``n0 + tok_at``:
    ``4g + e``, or ``4g + (e ^ (g % 2))`` as swapped pairs read them, module doc), -inf elsewhere
    and past ``end`` or ``qpos``, from its key group's ``_key_operands`` ``ko`` and its key words
    ``kw``."""
    kb01, kb23, e, bias = ko
    k0, k1, k2, k3 = kw
    d0, d1, d2, d3 = _key_d(k0, k1, k2, k3, kb01, kb23, KBITS)
    # columns 2t, 2t + 1 of rows g (d0, d1) and g + 8 (d2, d3) as floats, limbs weighted
    x0 = _i2f(d0) * wk0 + _i2f(d1) * wk1
    x1 = _i2f(d2) * wk0 + _i2f(d3) * wk1
    x = tl.join(ptx.bfly(x0, 1), ptx.bfly(x1, 1))  # [32, 2 (m-tile), 2 (row half)]
    tok = n0 + tok_at
    s = tl.reshape(x, [32, 4]) * e + bias
    return tl.where((t == 0) & (tok < end) & (tok <= qpos), s, float("-inf"))


@triton.jit
def _value_product(vw, op, c, VBITS: tl.constexpr):
    """The int32 accumulators ``c`` (4 x [32, 8]) plus one tile's value product: its value words
    (``_value_loads``) times its B registers (``_value_operands``)."""
    v00, v01, v02, v03, v10, v11, v12, v13, _, _ = vw
    a0, a1 = _value_regs(v00, v01, v02, v03, VBITS)
    a2, a3 = _value_regs(v10, v11, v12, v13, VBITS)
    c0, c1, c2, c3 = c
    return ptx.mma_values(a0, a1, a2, a3, op[0][:, None], op[1][:, None], c0, c1, c2, c3)


@triton.jit
def _step_scores(n0, ko, kw, end, qpos, tok_at, t, wk0, wk1, KBITS: tl.constexpr, STEP: tl.constexpr):
    """The scores of the ``STEP`` tiles from token ``n0`` (``_scores``, a tuple) and their maximum,
    last, from the key words of ``_step_key_words`` (``kw``) and the key operands ``ko`` of their
    key group."""
    s0 = _scores(n0, ko, kw[0], end, qpos, tok_at, t, wk0, wk1, KBITS)
    s_hi = tl.max(tl.max(s0, axis=1), axis=0)
    if STEP == 1:
        r = (s0, s_hi)
    else:
        s1 = _scores(n0 + 32, ko, kw[1], end, qpos, tok_at, t, wk0, wk1, KBITS)
        r = (s0, s1, tl.maximum(s_hi, tl.max(tl.max(s1, axis=1), axis=0)))
    return r


@triton.jit
def _step_value_operands(s, m_ref, vw, f_lane, sel, STEP: tl.constexpr):
    """``_value_operands`` of each tile of a step (a tuple), from its scores (``_step_scores``) and
    value loads (``_step_value_loads``) against the reference ``m_ref``."""
    op0 = _value_operands(s[0], m_ref, vw[0][8], vw[0][9], f_lane, sel)
    if STEP == 1:
        r = (op0,)
    else:
        r = (op0, _value_operands(s[1], m_ref, vw[1][8], vw[1][9], f_lane, sel))
    return r


@triton.jit
def _step_values(s, vw, m_ref, l_p, c, acc_lo, since, live, t, wv0, wv1, f, cols, sel, o_row,
                 VBITS: tl.constexpr, STEP: tl.constexpr):
    """A loop step's softmax step (one for its tiles: the reference's move, a fold if it moves) and
    value products, from its scores (``_step_scores``) and value loads (``_step_value_loads``);
    returns the new state.

    The float32 outputs live in the split's partial-output row ``o_row`` (halves 0 and 1 at
    ``o_row`` and ``o_row + 1``, written by lanes t = 0), not in registers: they change only at a fold.
    ``live``: 1 once a fold has written them; before, they are zero and not read (the fold of a
    program's first step, with nothing summed yet, writes nothing).

    ``f``: the values' fixed point ``F`` (``p * scale * F < 2**23`` for ``p <= _P_MAX``; 0 before
    any nonzero value scale); a step with a larger scale than ``F`` takes folds the integer sums and
    takes ``F`` for twice its largest scale. ``cols``: 1.0 in the lanes of value B columns 0-5
    (3 limbs x 2 groups), 0.0 in 6 and 7."""
    s_hi = s[STEP]
    f_lane = cols * f
    # ---- the value operands on the current reference, before knowing whether it moves (it rarely
    # does): the score maximum's lane reduction then overlaps this work instead of preceding it
    ops = _step_value_operands(s, m_ref, vw, f_lane, sel, STEP)
    sv_hi = tl.max(tl.max(tl.max(vw[0][8], axis=2), axis=1), axis=0)
    if STEP == 2:
        sv_hi = tl.maximum(sv_hi, tl.max(tl.max(tl.max(vw[1][8], axis=2), axis=1), axis=0))
    # ---- the softmax reference moves (and the integer sums fold) only past _TAU, before overflow,
    # or when a value scale passes the fixed point's range
    grow = s_hi > m_ref + _TAU
    sv_hi = sv_hi.to(tl.float32)
    wide = (sv_hi * f > _X_RANGE / _P_MAX) | ((f == 0.0) & (sv_hi > 0.0))
    if grow | wide | (since >= _FLUSH_TILES):
        m_new = tl.where(grow, s_hi, m_ref)
        alpha = tl.math.exp2(m_ref - m_new)
        c0, c1, c2, c3 = c
        f0, f1 = _fold(c0, c1, c2, c3, wv0, wv1, f, VBITS)
        add = tl.where(since > 0, 1, 0)
        _fold_out(o_row, f0, f1, alpha, live, add, t)
        live = live | add
        zero = tl.zeros([32, 8], tl.int32)
        c = (zero, zero, zero, zero)
        acc_lo = acc_lo * alpha
        l_p = l_p * alpha
        m_ref = m_new
        since = 0
        f = tl.where(wide, 1.0 / (2.0 * sv_hi * _P_MAX) * _X_RANGE, f)
        ops = _step_value_operands(s, m_ref, vw, cols * f, sel, STEP)
    for i in tl.static_range(STEP):
        l_p += ops[i][2]
        acc_lo += ops[i][3]
        c = _value_product(vw[i], ops[i], c, VBITS)
    return m_ref, l_p, c, acc_lo, since + STEP, live, f


@triton.jit
def _fold_out(o_row, f0, f1, alpha, live, add, t):
    """The partial-output row's halves (``o_row``, ``o_row + 1``; lanes t = 0) plus ``f0``/``f1``,
    times ``alpha``: read only where ``live`` (earlier folds wrote them, else they are zero: no load
    to wait for at a program's start and end), written where ``live`` or ``add`` (int32 0 / 1)."""
    keep = (t == 0) & (t * 0 + live != 0)  # as [32, 1]: the interpreter's masks take no 0-d flag
    write = (t == 0) & (t * 0 + (live | add) != 0)
    tl.store(o_row, (tl.load(o_row, mask=keep, other=0.0) + f0) * alpha, mask=write)
    tl.store(o_row + 1, (tl.load(o_row + 1, mask=keep, other=0.0) + f1) * alpha, mask=write)


@triton.jit
def _value_operands(s, m_ref, sv, lv, f_lane, sel):
    """The value product's B registers for scores ``s`` [32, 4] (lanes t = 0) against reference
    ``m_ref``: ``p * scale`` in fixed point, limb g % 3 of group g // 3, for the lane's tokens
    ``4t + i`` (``bv0``) and ``4t + 16 + i`` (``bv1``), [32] each; and the lane's sums of p and
    of p times the value offset of group ``gl`` ([32, 1] each)."""
    p = tl.math.exp2(tl.minimum(s - m_ref, _TAU))  # a no-op when it is used (else recomputed): no overflow
    p0, p1, p2, p3 = _split4(p.to(tl.int32, bitcast=True))
    pa0, pa1, pa2, pa3, pb0, pb1, pb2, pb3 = ptx.spread_p(p0, p1, p2, p3)  # tokens 4t + i, 4t + 16 + i
    p8 = tl.join(tl.join(tl.join(pa0, pb0), tl.join(pa1, pb1)), tl.join(tl.join(pa2, pb2), tl.join(pa3, pb3)))
    p8 = tl.reshape(tl.permute(p8, (0, 3, 2, 1)), [32, 4, 2]).to(tl.float32, bitcast=True)  # [32, i, Q]
    lo_sum = tl.sum(tl.sum(p8 * lv.to(tl.float32), axis=2), axis=1)[:, None]
    xb = (p8 * (f_lane[:, :, None] * sv.to(tl.float32)) + 8388608.0).to(tl.int32, bitcast=True)  # limbs: bytes 0-2
    xq = tl.permute(xb, (0, 2, 1))  # [32, Q, i]
    x02, x13 = tl.split(tl.reshape(xq, [32, 2, 2, 2]))  # i = 2a + c: c = 0 -> i = 0, 2
    xb0, xb2 = tl.split(x02)
    xb1, xb3 = tl.split(x13)
    bv0, bv1 = tl.split(ptx.gather_byte(xb0, xb1, xb2, xb3, sel))
    return bv0, bv1, tl.sum(p, axis=1)[:, None], lo_sum


@triton.jit
def _decode_kernel(q_ptr, ks_ptr, kl_ptr, kc_ptr, vc_ptr, vs_ptr, vl_ptr, o_ptr, m_ptr, l_ptr, tbl_ptr,
                   len_ptr, skc_b, skc_h, skc_t, sks_b, sks_h, sks_t, svc_b, svc_h, svc_t, svs_b, svs_h, svs_t, stbl_b,
                   T, QOFF, tiles_per_split, tail_at, small, split_base, Hkv, M, L, qscale,
                   KBITS: tl.constexpr, VBITS: tl.constexpr, GK: tl.constexpr, PAGED: tl.constexpr,
                   PAGE: tl.constexpr, SCONTIG: tl.constexpr, STEP: tl.constexpr, L2AHEAD: tl.constexpr,
                   STAGES: tl.constexpr, SPLITS_FAST: tl.constexpr):
    if SPLITS_FAST:  # grid (splits, rows): a row's splits are launched one after another
        at = tl.program_id(1)
        split = tl.program_id(0)
        n_rows = tl.num_programs(1)
    else:
        at = tl.program_id(0)
        split = tl.program_id(1)
        n_rows = tl.num_programs(0)
    pid, split, bh, rq, b, h, qpos, T, t_lo, t_hi = _row_program_at(at, split, T, QOFF, tiles_per_split, Hkv, M, L,
                                                                    len_ptr, 32, PAGED)
    # splits from ``tail_at`` on take ``small`` tiles each: launched last, they fill the warp slots that
    # the long ones leave free at the end
    t_lo = tl.where(split < tail_at, t_lo, tail_at * tiles_per_split + (split - tail_at) * small)
    t_hi = tl.minimum(t_lo + tl.where(split < tail_at, tiles_per_split, small), tl.cdiv(T, 32))
    end = tl.minimum(T, t_hi * 32)
    lane = tl.arange(0, 32)
    g = (lane // 4)[:, None]  # [32, 1]
    t = (lane % 4)[:, None]
    u4 = tl.arange(0, 4)[None, :]
    if STAGES:  # the tile's tokens of the lane's scores (``_scores``): pairs swapped in odd groups
        tok_at = 4 * g + (u4 ^ (g % 2))
    else:
        tok_at = 4 * g + u4

    # ---- the values' fixed point (p * scale * F < 2**23) starts empty: the first step with a
    # nonzero value scale sets it (to twice the step's largest), a step above it folds and resets it
    cols = tl.where(g < 6, 1.0, 0.0)  # value B columns: 3 limbs x 2 groups, 6 and 7 unused
    f = tl.full((), 0.0, tl.float32)
    sel = (g % 3) * 17 + 64  # prmt selector of byte g % 3
    gs = tl.minimum(g // 3, 1)  # the value group of the lane's B column
    gl = g // 4  # the value group of the lane's output dimensions 16g .. 16g + 15
    # key columns of lane t: 2t, 2t + 1 are limbs 0-2 (weights 1, 256, 65536)
    wk0 = tl.where(t == 0, 1.0, tl.where(t == 1, 65536.0, 0.0))
    wk1 = tl.where(t == 0, 256.0, 0.0)
    # value columns 2t and 2t + 1 of the lane's D fragment
    wv0 = _value_column_weight(2 * t, gl)
    wv1 = _value_column_weight(2 * t + 1, gl)

    ps_idx = (split_base + split) * (n_rows // M) + bh
    mt = tl.arange(0, 8)[None, :]
    if VBITS == 4:  # m-tile (J, i, jj), half nu: dimension 8J + 2i + 4jj + nu
        dim = 8 * (mt // 4) + 2 * ((mt // 2) % 2) + 4 * (mt % 2)
    else:  # m-tile (J, jj), half i: dimension 4J + i + 2jj
        dim = 4 * (mt // 2) + 2 * (mt % 2)
    o_row = o_ptr + (ps_idx * M + rq) * 128 + 16 * g + dim  # [32, 8]: half 0; half 1 at + 1

    m_ref = tl.max(tl.full([32], -1.0e30, tl.float32), axis=0)
    l_p = tl.zeros([32, 1], tl.float32)
    zero = tl.zeros([32, 8], tl.int32)
    c = (zero, zero, zero, zero)
    acc_lo = tl.zeros([32, 1], tl.float32)
    since = tl.full((), 0, tl.int32)
    live = tl.full((), 0, tl.int32)  # o_row written (see _fold_out)
    # The next step's key operands, from scales loaded a step before, are made an iteration ahead,
    # and so are its key words without STAGES: the key product waits for no load. STEP 2: two tiles per step
    # under one softmax step (twice the bytes in flight per warp; key groups of 64 or more, splits
    # of an even number of tiles)
    tl.static_assert(STEP == 1 or GK >= 64, "two tiles per step take key groups of 64 or more")
    # The first tiles' loads (the stages, or the first step's key words) are issued before the query
    # and the first key scales are loaded: a program's first tile and its first key operands then
    # take one DRAM round trip, not one after the other (4-bit 0.781 -> 0.773 ms, same process).
    if STAGES:
        # the tiles of the next STAGES - 1 steps are on their way into shared memory (``_stage_tiles``):
        # loop step k reads stage k % STAGES once its barrier's phase k // STAGES has completed, and
        # refills the stage that step k - 1 read
        tl.static_assert(SCONTIG, "shared-memory stages take [.., T, 2] value scales")
        SB: tl.constexpr = STEP * _tile_stage_bytes(KBITS, VBITS)
        # a scalar at once: Triton would otherwise remake the asm, and with it the array, in each
        # layout its uses want
        smem = tl.max(ptx.smem_stages(lane, STAGES * SB + 8 * STAGES), axis=0)
        bars = smem + STAGES * SB
        never = tiles_per_split + tl.zeros([32, 1], tl.int32) < 0  # false, unknown to the compiler: _pin's
        for st in tl.static_range(STAGES):
            ptx.mbar_init((lane == 0).to(tl.int32), bars + 8 * st)
        for st in tl.static_range(STAGES - 1):
            _stage_tiles(t_lo + st * STEP, end, b, h, smem + st * SB, bars + 8 * st, kc_ptr, vc_ptr, vs_ptr, vl_ptr,
                         tbl_ptr, stbl_b, skc_b, skc_h, skc_t, svc_b, svc_h, svc_t, svs_b, svs_h, KBITS, VBITS, STEP,
                         PAGED, PAGE)
    else:
        kw = _step_key_words(t_lo, t_hi, end, b, h, g, t, u4, kc_ptr, tbl_ptr, stbl_b, skc_b, skc_h, skc_t, KBITS,
                             PAGED, PAGE, STEP)
    if KBITS == 4:  # the dimensions of B register g = 2s + hh of column t: 32t + 8s + 2i + hh
        kd = 32 * t + 8 * (g // 2) + (g % 2) + 2 * u4
    else:  # 32t + 8s + 4hh + i
        kd = 32 * t + 4 * g + u4
    q4 = tl.load(q_ptr + pid * 128 + kd).to(tl.float32) * qscale
    if KBITS == 4:  # high nibbles arrive as 16 * code
        qx4 = tl.where(g % 2 == 1, q4 * 0.0625, q4)
    else:
        qx4 = q4
    ko = _key_operands(q4, qx4, _scale_loads(t_lo, t_hi, b, h, kd, tbl_ptr, stbl_b, ks_ptr, kl_ptr, sks_b, sks_h,
                                             sks_t, GK, PAGED, PAGE))
    sc = _scale_loads(t_lo + STEP, t_hi, b, h, kd, tbl_ptr, stbl_b, ks_ptr, kl_ptr, sks_b, sks_h, sks_t, GK, PAGED,
                      PAGE)
    # L2AHEAD: the tiles of the step that many steps ahead are brought into L2 by the TMA unit
    # while this one is loaded into registers: more bytes on their way than registers hold
    # (with STAGES, that many steps further than the stages are filled)
    AHEAD: tl.constexpr = STAGES - 1 if STAGES else 0
    for a in tl.static_range(AHEAD + 1, AHEAD + L2AHEAD):
        _l2_tiles(t_lo + a * STEP, end, b, h, kc_ptr, vc_ptr, vs_ptr, tbl_ptr, stbl_b, skc_b, skc_h, skc_t, svc_b,
                  svc_h, svc_t, svs_b, svs_h, STEP, PAGED, PAGE, SCONTIG)
    for tile in range(t_lo, t_hi, STEP):
        if L2AHEAD:
            _l2_tiles(tile + (AHEAD + L2AHEAD) * STEP, end, b, h, kc_ptr, vc_ptr, vs_ptr, tbl_ptr, stbl_b, skc_b,
                      skc_h, skc_t, svc_b, svc_h, svc_t, svs_b, svs_h, STEP, PAGED, PAGE, SCONTIG)
        if STAGES:
            k = (tile - t_lo) // STEP
            nxt = (k + STAGES - 1) % STAGES
            _stage_tiles(tile + (STAGES - 1) * STEP, end, b, h, smem + nxt * SB, bars + 8 * nxt, kc_ptr, vc_ptr,
                         vs_ptr, vl_ptr, tbl_ptr, stbl_b, skc_b, skc_h, skc_t, svc_b, svc_h, svc_t, svs_b, svs_h, KBITS,
                         VBITS, STEP, PAGED, PAGE)
            cur = k % STAGES
            tok = ptx.wait(bars + 8 * cur + 0 * lane, (k // STAGES) % 2 + 0 * lane)
            kw, vw = _staged_step(smem + cur * SB, tok, tile, end, gs, gl, kc_ptr, vc_ptr, vs_ptr, o_ptr, never,
                                  KBITS, VBITS, STEP)
        else:
            vw = _step_value_loads(tile, t_hi, end, b, h, g, t, gs, gl, vc_ptr, vs_ptr, vl_ptr, tbl_ptr, stbl_b,
                                   svc_b, svc_h, svc_t, svs_b, svs_h, svs_t, VBITS, PAGED, PAGE, SCONTIG, STEP)
            nkw = _step_key_words(tile + STEP, t_hi, end, b, h, g, t, u4, kc_ptr, tbl_ptr, stbl_b, skc_b, skc_h,
                                  skc_t, KBITS, PAGED, PAGE, STEP)
        nko = _key_operands(q4, qx4, sc)
        sc = _scale_loads(tile + 2 * STEP, t_hi, b, h, kd, tbl_ptr, stbl_b, ks_ptr, kl_ptr, sks_b, sks_h, sks_t, GK,
                          PAGED, PAGE)
        s = _step_scores(tile * 32, ko, kw, end, qpos, tok_at, t, wk0, wk1, KBITS, STEP)
        m_ref, l_p, c, acc_lo, since, live, f = _step_values(s, vw, m_ref, l_p, c, acc_lo, since, live, t, wv0, wv1,
                                                             f, cols, sel, o_row, VBITS, STEP)
        ko = nko
        if not STAGES:
            kw = nkw

    # ---- this split's partial result
    c0, c1, c2, c3 = c
    f0, f1 = _fold(c0, c1, c2, c3, wv0, wv1, f, VBITS)
    lo = ptx.bfly(ptx.bfly(acc_lo, 1), 2)  # [32, 1]: group gl's offsets, over the 4 lanes' tokens
    tl.store(m_ptr + ps_idx * M + rq, m_ref)
    tl.store(l_ptr + ps_idx * M + rq, tl.sum(tl.sum(l_p, axis=1), axis=0))
    keep = (t == 0) & (t * 0 + live != 0)
    tl.store(o_row, tl.load(o_row, mask=keep, other=0.0) + f0 + lo, mask=t == 0)
    tl.store(o_row + 1, tl.load(o_row + 1, mask=keep, other=0.0) + f1 + lo, mask=t == 0)


@triton.jit
def _value_column_weight(col, gl):
    """Weight of value B column ``col`` (limb ``col % 3`` of group ``col // 3``) in the output of
    value group ``gl``: ``256**limb``, or 0 for another group's column and the unused 6 and 7."""
    limb = col % 3
    return tl.where((col < 6) & (col // 3 == gl), tl.where(limb == 0, 1.0, tl.where(limb == 1, 256.0, 65536.0)), 0.0)


@triton.jit
def _i2f(c):
    """int32 below 2**22 in magnitude as float32, exactly (no I2F: an add into 1.5 * 2**23's mantissa)."""
    return (c + _I2F).to(tl.float32, bitcast=True) - 12582912.0


def launch(q2, kside: tuple, vside: tuple, kbits: int, vbits: int, gk: int, part, split_base: int, n_splits: int,
           tiles_per_split: int, qoff: int, T: int, hkv: int, m_rows: int, L: int, table: tuple,
           step: int = 1, l2_ahead: int = 0, stages: int = 0, maxnreg: int = 0, qscale: float = 1.0,
           splits_fast: bool = False, tail: tuple | None = None) -> None:
    """Run the decode kernel for one segment into ``part`` (from ``decode_attention._launch``).

    ``q2``: [B * Hkv, M, 128] contiguous, float32, float16 or bfloat16: the query rows, which the
    kernel multiplies by ``qscale`` (scale * log2 e, or 1.0 where ``q2`` has it folded in): no
    kernel before this one scales them; ``kside``/``vside``: a
    ``QuantBlock`` that ``supported`` accepts as ``decode_attention._side_arrays`` gives it
    (int32 code words, scale, offset, their strides); ``kbits``/``vbits``: 4 or 8; ``gk``: the key
    group size; ``table``: ``(table, lengths, table stride, page size, paged)``; ``step``: 32-token
    tiles per loop step, 1 or 2 (2 with key groups of 64 or more, else 1; splits of an odd number
    of tiles grow by one, so the last splits may be empty); ``l2_ahead``: bring the tiles of the
    loop step that many steps ahead into L2 (0: no; only on sm_90 with the code rows contiguous
    along the tokens and 16-byte aligned); ``stages``: 0, or read the tiles from a ring of that many
    loop steps' stages in shared memory that the TMA unit fills ``stages - 1`` steps ahead (then
    ``l2_ahead`` counts from there; where the L2 prefetch can run and the value scales are
    ``[.., T, 2]``; fewer stages where that many pass the 48 KB of static shared memory, none where
    not two);
    ``maxnreg``: 0, or the registers per thread the build may use (more programs per SM);
    ``splits_fast``: the grid (splits, rows), so a row's splits are launched one after another;
    ``tail``: ``(tail_at, small)``: splits ``tail_at ..`` take ``small`` tiles each, after
    ``tail_at`` of ``tiles_per_split`` (``decode_attention._tail_splits``).
    """
    kc, ks, kl, skc, sks = kside
    vc, vs, vl, svc, svs = vside
    tbl, lens, stbl, page, paged = table
    rows = q2.shape[0] * m_rows
    if step not in (1, 2):
        raise ValueError(f"step must be 1 or 2 tiles per loop step, got {step!r}")
    if not isinstance(stages, int) or stages < 0:
        raise ValueError(f"stages must be an int >= 0, got {stages!r}")
    if not isinstance(maxnreg, int) or not (maxnreg == 0 or 24 <= maxnreg <= 255):
        raise ValueError(f"maxnreg must be 0 (no cap) or 24..255 registers, got {maxnreg!r}")
    step = step if gk >= 64 else 1
    tiles_per_split += -tiles_per_split % step
    tail_at, small = tail or (n_splits, 1)
    small += -small % step
    ready = _tma_ready(kside, vside)
    stages = min(stages, _MAX_STAGE_BYTES // (step * _tile_stage_bytes(kbits, vbits) + 8))
    l2_ahead = l2_ahead if ready else 0
    if stages < 2 or not ready or svs[2] != 2:
        stages = 0
    _decode_kernel[(n_splits, rows) if splits_fast else (rows, n_splits)](
        q2, ks, kl, kc, vc, vs, vl, part.o, part.m, part.l, tbl, lens, *skc, *sks, *svc, *svs, stbl,
        T, qoff, tiles_per_split, tail_at, small, split_base, hkv, m_rows, L, qscale, KBITS=kbits, VBITS=vbits, GK=gk,
        PAGED=paged, PAGE=page, SCONTIG=svs[2] == 2, STEP=step, L2AHEAD=l2_ahead, STAGES=stages,
        SPLITS_FAST=splits_fast, num_warps=1, num_stages=1, **({"maxnreg": maxnreg} if maxnreg else {}))


_MAX_STAGE_BYTES = 48 * 1024  # static shared memory of one program


def _tma_ready(kside: tuple, vside: tuple) -> bool:
    """Whether ``_l2_tiles`` and ``_stage_tiles`` can take these sides: an sm_90 device (the TMA
    unit's bulk operations), each token's code row right after the previous one, rows and value
    scales and offsets 16-byte aligned."""
    kc, vc, vs, vl = kside[0], vside[0], vside[1], vside[2]
    if os.environ.get("TRITON_INTERPRET") != "1" and capability(kc.device)[0] < 9:
        return False
    ok = all(x.data_ptr() % 16 == 0 for x in (kc, vc, vs, vl))
    for codes, (sb, sh, st) in ((kc, kside[3]), (vc, vside[3])):
        ok &= st == codes.shape[-1] and codes.stride(-1) == 1 and (sb * 4) % 16 == 0 and (sh * 4) % 16 == 0
    sb, sh, st = vside[4]
    return ok and (st != 2 or ((sb * vs.element_size()) % 16 == 0 and (sh * vs.element_size()) % 16 == 0))
