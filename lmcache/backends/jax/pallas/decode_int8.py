"""Fused decode attention over 4- or 8-bit codes on the integer matrix units (int8 x int8 -> int32 dots).

The same computation as ``decode_attention`` (one query token per head over quantized K/V,
flash-decoding splits merged by log-sum-exp), but the codes never become floats: they enter
``jnp.dot`` as int8 and the other operand is made integer instead, in fixed point with three
balanced 8-bit limbs in separate columns. Triton lowers an int8 x int8 -> int32 dot to
``mma``/``wgmma`` ``s8.s8.s32``: the products are exact and the float work per code is gone.

Codes become int8 operands by one bitwise op with a constant, which LLVM does on whole 32-bit
words (a shift, or a constant it cannot see, it does per byte): 8-bit codes ``c ^ 0x80`` = ``c -
128``; 4-bit bytes ``b = lo + 16 hi`` (even channel low) give ``b & 0x0F`` = ``lo`` and ``b ^ 0x80``
= ``lo + 16 hi - 128``, from which the odd channels are recovered linearly (below).

* Keys (scores): for key group ``g`` with scales ``s`` and offsets ``lo`` (per channel),
  ``q . (s c + lo) = x . c + q . lo`` with ``x = q s`` (``q`` already times the softmax scale).
  ``x`` becomes ``X = round(x 2**(21 - e))`` with ``max |x| < 2**(e + 1)``, so ``|X| < 2**22``,
  split as ``X = L0 + 256 L1 + 65536 L2`` with each limb in ``[-128, 127]`` (the bytes of
  ``X + 0x808080``, minus 128). ``B [D, 8]`` holds the limbs in columns 0-2 (the matrix unit's
  n is 8), ``S = codes [T, D] @ B`` is int32 ``[T, 8]`` and the score is
  ``(S0 + 256 S1 + 65536 S2) 2**(e - 21) + bias`` in float32, the bias holding ``q . lo`` and
  the -128 of the shifted codes (``128 sum X``). 4-bit: with ``X_e``/``X_o`` the even/odd
  channels of byte ``i``, ``X_e lo + X_o hi = ((16 X_e - X_o) lo + X_o (b - 128) + 128 X_o) / 16``:
  two dots into one accumulator, ``16 X_e - X_o`` (below ``2**27``) in four limbs.
* Values: ``sum_t p_t (sv_t v_t + lv_t) = sum_t y_t v_t + sum_t p_t lv_t``, ``y = p sv`` per
  (token, value group). ``Y = round(y F)`` with a power of two ``F`` in three limbs, column
  ``3 G + limb`` of ``P [T, 8]`` for value group ``G``, and
  ``O = codes[T, D]^T @ P`` is int32 ``[D, 8]``, accumulated in the dot's int32 accumulator from
  tile to tile. ``F`` puts a tile's largest ``y`` in ``[2**19, 2**20)``; it is kept while later
  tiles stay below ``2**22`` (the rounding's range), so tiles add exactly. When a tile would
  not fit, or the softmax reference moves, or ``2**16`` tokens have been added (int32 range),
  the integer sums are flushed into the float32 output (in the output block, not registers:
  this is rare) and ``F`` is chosen again.
  4-bit: the dots give ``sum Y lo`` (even channels) and ``sum Y (b - 128)``; the odd channels
  are ``(sum Y (b - 128) + 128 sum Y - sum Y lo) / 16``.
* After the loop, column ``d`` of the flushed sums takes the columns of its own value group,
  weighted by ``256**limb``; that and the offset terms are done in jnp with the split merge.
  Operand columns past the used ones hold whatever the limb formula gives (no select to clear
  them): their results are never read (weight 0), and int32 sums saturate rather than trap.
* Both small operands are built transposed (``B^T [8, D]``, ``P^T [8, T]``: the dot's k
  contiguous, as the matrix unit takes it); built the other way, Triton moved them through
  shared memory a byte at a time.

The fixed point rounds once per operand element (``2**-22`` of the key group's largest
``|x|``, ``2**-20`` of the largest ``y`` since the last flush); the int32 sums are exact, so the
results agree with ``decode_attention_reference`` to float32 accuracy.

The key operand (the biased limb sources, ``2**(e - 21)`` and the bias) comes either from the
kernel itself, once per key group (``key_operands="kernel"``: no extra pass, two reductions per
group) or from jnp before it (``"prepass"``, ``key_operands()``: 512 or 1024 bytes per (query
head, key group) written and read back).

What the GPU runs (Nsight Compute on an H200, jax 0.11.2, 4-bit, batch 16 / 32K tokens, 17
slices; warp instructions executed per 64-token step, all of the kernel): with the codes' bit
operations written as jnp ops, 1771 per step, 460 of them PRMT and 500 LOP3, issue slots 49%
busy, 12 warps per SM (168 registers). Triton moves elementwise ops past a layout conversion,
so ``b & 0x0F`` and ``b ^ 0x80`` of the value codes ran after their transposition (the dot
contracts tokens; the codes lie by token), byte by byte: extract, mask, flip, mask, repack. As
inline PTX on whole registers before it (``_word_op``, ``asm_codes``) the step takes 1209
instructions, but 202 registers (8 warps per SM) and nearly the same time (1.317 -> 1.294 ms):
the loop waits on its loads (long-scoreboard stalls 2.5 per instruction). Dots of 32 tokens (``dot_tokens``, 4-bit) then
halve what each dot holds: 1.309 -> 1.203 ms; 1257 instructions per step, 146 registers (12
warps per SM), kernel 1.16 ms, DRAM 56% of its peak, issue slots 38% busy, long-scoreboard
stalls 3.8 per instruction. What remains: every step's loads issued at its top with nothing in
flight between steps (the wait above), the transposition itself (stmatrix, shared memory and
PRMTs, chosen by Triton) and the small operands built a byte at a time through shared memory.

"""

from __future__ import annotations

import functools
import math
import sys

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from .. import ops
from . import decode_attention as float_kernel
from .common import compiler_params, is_pow2
from .decode_attention import (
    RESCALE_MARGIN,
    _validate,
    cache_specs,
    choose_splits,
    decode_attention_reference,
    merge_splits,
    query_specs,
)

__all__ = ["decode_attention", "decode_attention_reference", "kernel_supported", "choose_splits", "default_tile",
           "default_splits", "wave_splits", "key_operands", "fused_kernel", "BITS", "TARGET_PROGRAMS"]

NEG = ops.NEG
#: Code widths the kernel takes on each side (2-bit codes would need their own unpacking: they
#: go to ``decode_attention``).
BITS = (4, 8)
#: Columns of the key operand B: the matrix unit's n (3 limbs used, 4 for 4-bit even channels).
N_COLS = 8
#: Fixed point of the key operand: ``|X| < 2**(KEY_FRAC + 1) = 2**22``, within the range of the
#: rounding below and of three balanced limbs.
KEY_FRAC = 21
#: Fixed point of the value operand: a tile's largest ``y F`` in ``[2**VAL_FRAC, 2**(VAL_FRAC + 1))``
#: when ``F`` is chosen; later tiles add under the same ``F`` while below ``2**VAL_LIMIT``.
VAL_FRAC = 19
VAL_LIMIT = 22
#: Tokens between forced flushes of the int32 value sums: a token adds at most 128 * 128 = 2**14
#: to an element, so 2**16 tokens stay below 2**30.
FLUSH_TOKENS = 1 << 16
_MAGIC = 12582912.0  # 1.5 * 2**23: float32 v + _MAGIC has round(v) in its low bits, |v| < 2**22
_MAGIC_BITS = 0x4B400000  # the bits of float32 1.5 * 2**23
_BIAS3 = 0x808080  # 128 in each of three bytes: X + _BIAS3 has the balanced limbs + 128 as bytes
_BIAS4 = -0x7F7F7F80  # 0x80808080 as int32 (sums wrap): 128 in each of four bytes
#: The codes entered the key dot shifted by -128 (4-bit: ``b - 128`` against ``X_o``, in a score 16
#: times too large): the bias adds back ``128 sum X`` (``8 sum X_o``) times ``2**(e - 21)``.
_SHIFT_BACK = {8: 128.0, 4: 8.0}
#: Programs to aim for when choosing the token slices where ``wave_splits`` does not apply (few
#: heads: ``choose_splits``), each slice at least ``MIN_STEPS`` loop steps. On an H200 (jax 0.11.2),
#: 4-bit: batch 1 / 4K: 62 slices of one 64-token step 0.093 ms, 31 of two 0.062 (2026-11-28);
#: batch 1 / 32K: 102 slices 0.125 ms, 51 0.130; batch 1 / 128K: 93 slices 0.366, 66 0.353
#: (2026-11-29, the kernel of that day; this picks 102 and 93).
TARGET_PROGRAMS = 6144
MIN_STEPS = 2
#: ``wave_splits``' model: one-warp programs an SM holds at once (Nsight Compute on the H200: 12 at
#: the default's 146 registers; 8 at the 202 of ``dot_tokens=64``, where 12 in the model still
#: picked the fastest slice count measured) and the loop steps a program's start and end cost.
PROGRAMS_PER_SM = 12
PROGRAM_OVERHEAD_STEPS = 2
_EXP_CLAMP = 100  # exponents are clamped to +-this: 2**(21 -+ 100) and inverses stay normal floats


def wave_splits(batch: int, q_heads: int, steps: int, sms: int, programs_per_sm: int = PROGRAMS_PER_SM,
                min_steps: int = MIN_STEPS) -> int | None:
    """Token slices per (batch, head) for a grid that fills the GPU several times over, or ``None``
    where it does not (fewer heads than a quarter of one wave: ``choose_splits`` then).

    Minimises ``ceil(waves) * (steps per slice + PROGRAM_OVERHEAD_STEPS)`` over the divisors of
    ``steps`` that leave ``min_steps`` steps per slice: a last wave that is nearly empty costs as
    much as a full one. On an H200 (132 SMs), 4-bit, batch 16 / 32K tokens (510 steps), slices
    10 / 15 / 17 / 30 / 34 took 1.308 / 1.256 / 1.203 / 1.267 / 1.281 ms: this picks 17; batch
    16 / 4K (62 steps): 2 / 1 slices 0.186 / 0.295 ms: this picks 2.
    """
    wave = sms * programs_per_sm
    if batch * q_heads * 4 < wave:
        return None
    best = None
    for s in range(1, steps + 1):
        if steps % s or (s > 1 and steps // s < min_steps):
            continue
        cost = math.ceil(batch * q_heads * s / wave) * (steps / s + PROGRAM_OVERHEAD_STEPS)
        if best is None or cost < best[0]:
            best = (cost, s)
    return best[1]


def default_splits(batch: int, q_heads: int, tokens: int, k_group: int, tile: int, interpret: bool = False) -> int:
    """The slices ``decode_attention`` takes when none are given: ``wave_splits`` on a GPU whose
    waves the heads fill, else ``choose_splits`` for ``TARGET_PROGRAMS`` (``tile`` as given or
    ``default_tile``; a slice holds whole tiles and key groups)."""
    unit = max(tile, k_group)
    sms = None if interpret else _gpu_sms()
    return ((sms and wave_splits(batch, q_heads, tokens // unit, sms))
            or choose_splits(batch, q_heads, tokens // k_group, unit // k_group, TARGET_PROGRAMS, MIN_STEPS))


@functools.cache
def _gpu_sms() -> int | None:
    """Streaming multiprocessors of the first GPU (``None`` without one)."""
    try:
        dev = jax.devices("gpu")[0]
    except RuntimeError:
        return None
    return getattr(dev, "core_count", None)


def _pow2(e):
    """float32 ``2**e`` for int32 ``e`` in [-126, 127], from the exponent bits (no exp2 in the loop)."""
    return jax.lax.bitcast_convert_type((e + 127) << 23, jnp.float32)


def _floor_log2(a):
    """int32 ``floor(log2(a))`` for float32 ``a > 0``, clamped to +-_EXP_CLAMP (``a = 0`` gives the
    lower clamp); from the exponent bits, so ``a < 2**(result + 1)``."""
    e = ((jax.lax.bitcast_convert_type(a, jnp.int32) >> 23) & 255) - 127
    return jnp.clip(e, -_EXP_CLAMP, _EXP_CLAMP)


def _biased_fixed(v, bias: int = _BIAS3):
    """``round(v) + bias`` as int32 for float32 ``|v| < 2**22`` (round half to even).

    One float add puts ``round(v)`` in the low mantissa bits of ``v + 1.5 * 2**23`` (exactly, as
    the hardware rounds, with no round instruction); reading the bits back costs one integer
    subtraction, which also adds the limb bias (``0x808080``: byte ``k`` of the result minus 128
    is limb ``k`` of ``round(v)``; 0: ``round(v)`` itself).
    """
    return jax.lax.bitcast_convert_type(v + _MAGIC, jnp.int32) - (_MAGIC_BITS - bias)


def _limb_shifts(n: int, limbs: int):
    """int32 shifts of length ``n`` for ``_limbs``: entry ``i`` reads limb ``i % limbs``."""
    return (jax.lax.broadcasted_iota(jnp.int32, (n,), 0) % limbs) * 8


def _limbs(u, shift):
    """int8 limbs of biased values ``u`` (broadcasting with ``shift`` from ``_limb_shifts``).

    The low byte of ``(u >> shift) ^ 128`` read as signed is that byte minus 128: the balanced
    limb, with no mask or subtraction (the int8 truncation drops the rest).
    """
    return ((u >> shift) ^ 128).astype(jnp.int8)


def _codes_i8(codes, bits: int, asm: bool = False):
    """uint8 packed codes ``[T, W]`` -> int8 dot operands (see the module doc).

    4-bit: ``[b & 0x0F, b ^ 0x80]`` (the even channels as 0..15, and ``lo + 16 hi - 128``);
    8-bit: ``[c ^ 0x80]`` (``c - 128``). The constants stay literal: LLVM then works on whole
    words (with them opaque it went byte by byte). ``asm``: the same ops as inline PTX on four
    bytes at a time, where they are (Triton otherwise moves them past the operand's layout
    conversion, and after the value codes' transposition they ran byte by byte).
    """
    if asm:
        return [_word_op(codes, "and", 0x0F0F0F0F), _word_op(codes, "xor", 0x80808080)] if bits == 4 else \
            [_word_op(codes, "xor", 0x80808080)]
    as_i8 = functools.partial(jax.lax.bitcast_convert_type, new_dtype=jnp.int8)
    flipped = as_i8(codes ^ jnp.uint8(0x80))
    return [as_i8(codes & jnp.uint8(0x0F)), flipped] if bits == 4 else [flipped]


def _word_op(codes, op: str, mask: int):
    """int8 ``codes op byte`` for uint8 ``codes`` (``op`` "and" / "xor", ``mask`` the byte four
    times) as one PTX instruction per 32-bit register of four codes."""
    from jax.experimental.pallas import triton as plgpu

    [out] = plgpu.elementwise_inline_asm(f"{op}.b32 $0, $1, {mask:#010x};", args=[codes], constraints="=r,r",
                                         pack=4, result_shape_dtypes=[jax.ShapeDtypeStruct(codes.shape, jnp.int8)])
    return out


def _key_limb_sources(xf, k_bits: int, reduce: bool = True):
    """Fixed-point key operand from ``x 2**(21 - e)`` by phase (float32 ``[..., wk]`` each).

    Returns the biased int32 values whose bytes are the B limbs, one per dot, and the float32
    ``sum X`` of the channels whose codes enter shifted by -128. 8-bit: ``X + 0x808080`` and
    ``sum X``. 4-bit: ``16 X_e - X_o + 0x80808080`` (the low nibbles' operand) and
    ``X_o + 0x80808080`` (against ``b - 128``), both in four limbs since the two dots share one
    accumulator (the fourth of ``X_o`` is 0), and ``sum X_o``. ``reduce=False``: that ``X`` as
    float32 (exact), not summed.
    """
    total = (lambda x: jnp.sum(x, axis=-1).astype(jnp.float32)) if reduce else (lambda x: x.astype(jnp.float32))
    if k_bits == 8:
        u = _biased_fixed(xf[0])
        return u, total(u - _BIAS3)
    x_e, x_o = (_biased_fixed(x, 0) for x in xf)
    return x_e * 16 - x_o + _BIAS4, x_o + _BIAS4, total(x_o)


def _kernel(len_ref, *refs, k_bits, v_bits, gk, split_len, tile, prepass, asm_codes, dot_tokens):
    # Prepass: ku_ref [split // gk, pk, wk] int32, the biased limb sources of each key dot (one row
    #   per dot, see _key_limb_sources); kw_ref / kb_ref [split // gk] f32, 2**(e - 21) and the bias.
    # Kernel: q_ref [pk, wk] f32, the query times the softmax scale by phase; ks_ref / kl_ref
    #   [split // gk, D] key scales and offsets.
    # kc_ref [split, wk] / vc_ref [split, wv] uint8 packed codes; vs_ref / vl_ref [split, nvg] value
    # scales / offsets. Out: o_ref [pv, wv, nv] f32, the flushed value sums by phase (channel pv*i + j
    # in row j of phase j) and operand column, unweighted; vb_ref [2, nvg] f32 per value group
    # sum_t p_t lv_t and sum_t Y_t / F; ml_ref [2] f32 the running max and the sum of exp(s - max).
    if prepass:
        ku_ref, kw_ref, kb_ref, kc_ref, vc_ref, vs_ref, vl_ref, o_ref, vb_ref, ml_ref = refs
    else:
        q_ref, ks_ref, kl_ref, kc_ref, vc_ref, vs_ref, vl_ref, o_ref, vb_ref, ml_ref = refs
    pk, pv = 8 // k_bits, 8 // v_bits
    wk, wv = kc_ref.shape[1], vc_ref.shape[1]
    nvg = vs_ref.shape[1]
    nv = o_ref.shape[2]
    sub = min(tile, gk, dot_tokens)  # tokens per dot: within one key group (its B)
    nsub = tile // sub
    length = len_ref[()]
    n_valid = jnp.clip(length - pl.program_id(2) * split_len, 0, split_len)
    n_steps = (n_valid + tile - 1) // tile
    tok = jax.lax.broadcasted_iota(jnp.int32, (sub,), 0)
    # Key operand column c holds limb c (4-bit: 4 limbs, 16 X_e - X_o needs them; the other columns
    # are read with weight 0), value operand column 3G + limb value group G's.
    k_limbs = 4 if k_bits == 4 else 3
    k_shift = _limb_shifts(N_COLS, k_limbs)[:, None]
    col = jax.lax.broadcasted_iota(jnp.int32, (N_COLS,), 0)
    # Column weights 256**c; 4-bit scores come out 16 times too large (see key_operand).
    k_weight = jnp.where(col < k_limbs, _pow2(jnp.minimum(col, 3) * 8 - (4 if k_bits == 4 else 0)), 0.0)[None, :]
    v_shift = _limb_shifts(nv, 3)[:, None]
    v_grp = jax.lax.broadcasted_iota(jnp.int32, (nv, 1), 0) // 3
    if not prepass:
        qs = [q_ref[j, :] for j in range(pk)]

    def key_operand(grp):
        """Key group ``grp``: (biased int32 limb sources, [wk] each, one per dot; 2**(e - 21); bias)."""
        if prepass:
            return [ku_ref[grp, j, :] for j in range(pk)], kw_ref[grp], kb_ref[grp]
        xs = [qs[j] * ks_ref[grp, pl.ds(j, wk, stride=pk)].astype(jnp.float32) for j in range(pk)]
        # One reduction each for the largest |x| and for the bias (the phases added elementwise first).
        e = _floor_log2(jnp.max(functools.reduce(jnp.maximum, [jnp.abs(x) for x in xs])))
        w = _pow2(e - KEY_FRAC)
        *us, shifted = _key_limb_sources([x * _pow2(KEY_FRAC - e) for x in xs], k_bits, reduce=False)
        terms = [qs[j] * kl_ref[grp, pl.ds(j, wk, stride=pk)].astype(jnp.float32) for j in range(pk)]
        return us, w, jnp.sum(sum(terms) + (_SHIFT_BACK[k_bits] * w) * shifted)

    def scores_of(start, operand):
        us, w, bias = operand
        kcodes = _codes_i8(kc_ref[pl.ds(start, sub), :], k_bits)
        s_int = None
        for codes, u in zip(kcodes, us):
            # B^T [8, wk]: built with the channels (the dot's k) contiguous, as the matrix unit
            # takes them (built [wk, 8], it went through shared memory byte by byte).
            d = jax.lax.dot_general(codes, _limbs(u[None, :], k_shift), (((1,), (1,)), ((), ())),
                                    preferred_element_type=jnp.int32)  # [sub, 8]
            s_int = d if s_int is None else s_int + d
        s = jnp.sum(s_int.astype(jnp.float32) * (k_weight * w), axis=1) + bias
        return jnp.where(start + tok < n_valid, s, NEG)

    def flush(o_int, inv_f, alpha):
        # The output block is this program's own: a read-modify-write, a few times per split.
        for ph in range(pv):
            o_ref[ph] = (o_ref[ph] + o_int[ph].astype(jnp.float32) * inv_f) * alpha

    def body(it, carry):
        m, fe, den, vb_lv, vb_y, o_int = carry
        t0 = it * tile
        # Each key group's operand once per step, for all its dots (t0 is a multiple of gk or of tile).
        operands = [key_operand(t0 // gk + k) for k in range(max(1, tile // gk))]
        scores = [scores_of(t0 + j * sub, operands[j * sub // gk]) for j in range(nsub)]
        m_tile = functools.reduce(jnp.maximum, [jnp.max(x) for x in scores])
        # Move the reference only when a score passes it by RESCALE_MARGIN: p stays below e**8.
        m_new = jnp.where(m_tile > m + RESCALE_MARGIN, m_tile, m)
        ps = [jnp.exp(s - m_new) for s in scores]  # masked scores are NEG: p = 0
        ys = [[p * vs_ref[pl.ds(t0 + j * sub, sub), g].astype(jnp.float32) for g in range(nvg)]
              for j, p in enumerate(ps)]
        ymax = functools.reduce(jnp.maximum, [jnp.max(y) for yj in ys for y in yj])
        need = (m_new > m) | (ymax * _pow2(fe) >= 2.0 ** VAL_LIMIT)
        if split_len > FLUSH_TOKENS:
            need = need | ((it % (FLUSH_TOKENS // tile) == 0) & (it > 0))

        def refresh(state):
            fe, den, vb_lv, vb_y, o_int = state
            alpha = jnp.exp(m - m_new)
            flush(o_int, _pow2(-fe), alpha)
            scale = lambda a: a * alpha
            return (VAL_FRAC - _floor_log2(ymax), scale(den), jax.tree_util.tree_map(scale, vb_lv),
                    jax.tree_util.tree_map(scale, vb_y), [jnp.zeros_like(o) for o in o_int])

        fe, den, vb_lv, vb_y, o_int = jax.lax.cond(need, refresh, lambda st: st, (fe, den, vb_lv, vb_y, o_int))
        f, inv_f = _pow2(fe), _pow2(-fe)
        vb_lv, vb_y, o_int = list(vb_lv), list(vb_y), list(o_int)
        for j in range(nsub):
            r = pl.ds(t0 + j * sub, sub)
            den = den + ps[j]
            us = []
            for g in range(nvg):
                vb_lv[g] = vb_lv[g] + ps[j] * vl_ref[r, g].astype(jnp.float32)
                u = _biased_fixed(ys[j][g] * f)
                # sum Y / F (not sum y): with the rounded Y, sum Y (c - 128) + 128 sum Y is sum Y c exactly.
                vb_y[g] = vb_y[g] + (u - _BIAS3).astype(jnp.float32) * inv_f
                us.append(u[None, :])
            # Row 3G + limb of P^T holds value group G's limbs (rows past 3 nvg are never read).
            u_cols = us[nvg - 1]
            for g in range(nvg - 2, -1, -1):
                u_cols = jnp.where(v_grp == g, us[g], u_cols)
            p_op = _limbs(u_cols, v_shift)  # P^T [nv, sub] int8, the tokens (the dot's k) contiguous
            vcodes = _codes_i8(vc_ref[r, :], v_bits, asm_codes)
            for ph in range(pv):
                # codes^T @ P: contracting the tokens, [wv, nv]; added to the loop's accumulator.
                o_int[ph] = o_int[ph] + jax.lax.dot_general(vcodes[ph], p_op, (((0,), (1,)), ((), ())),
                                                            preferred_element_type=jnp.int32)
        return m_new, fe, den, vb_lv, vb_y, o_int

    for ph in range(pv):
        o_ref[ph] = jnp.zeros((wv, nv), jnp.float32)
    zeros = lambda: jnp.zeros((sub,), jnp.float32)
    init = (jnp.full((), NEG, jnp.float32), jnp.full((), -_EXP_CLAMP, jnp.int32), zeros(),
            [zeros() for _ in range(nvg)], [zeros() for _ in range(nvg)],
            [jnp.zeros((wv, nv), jnp.int32) for _ in range(pv)])
    m, fe, den, vb_lv, vb_y, o_int = jax.lax.fori_loop(0, n_steps, body, init)
    flush(o_int, _pow2(-fe), 1.0)
    grp = jax.lax.broadcasted_iota(jnp.int32, (2, nvg), 1)
    first = jax.lax.broadcasted_iota(jnp.int32, (2, nvg), 0) == 0
    vb = jnp.zeros((2, nvg), jnp.float32)
    for g in range(nvg):
        vb = jnp.where(grp == g, jnp.where(first, jnp.sum(vb_lv[g]), jnp.sum(vb_y[g])), vb)
    vb_ref[...] = vb
    ml_ref[...] = jnp.where(jax.lax.broadcasted_iota(jnp.int32, (2,), 0) == 0, m, jnp.sum(den))


def value_columns(value_groups: int) -> int:
    """Columns of the value operand P for ``value_groups`` groups: 3 limbs each, at least 8 (the
    matrix unit's n), a power of two (Triton's tiles)."""
    return max(8, 1 << max(0, (3 * value_groups - 1).bit_length()))


def default_tile(k_group: int, tokens: int | None = None) -> int:
    """Tokens per loop step when none is given: 64 (a key group of 64, the Cache's default, per
    step) where it fits ``k_group`` (a multiple or divisor) and ``tokens``, else ``k_group``."""
    if (64 % k_group == 0 or k_group % 64 == 0) and (tokens is None or tokens % max(64, k_group) == 0):
        return 64
    return k_group


def kernel_supported(head_dim: int, k_bits: int, v_bits: int, k_group: int, v_group: int, compiled: bool = True,
                     tile: int | None = None) -> bool:
    """Whether this kernel handles these sizes (``tile``: tokens per loop step, ``default_tile``).

    Always: 4- or 8-bit codes on both sides, an even ``head_dim`` split into whole value
    groups, a tile that is a multiple or a divisor of the key group. Compiled, also power-of-two
    sizes (Triton's rule), at least 32 tokens and 32 channels per dot (the int8 matrix step
    k = 32) and at most 32 value groups.
    """
    tile = default_tile(k_group) if tile is None else tile
    if k_bits not in BITS or v_bits not in BITS or head_dim < 2 or head_dim % 2:
        return False
    if v_group < 1 or head_dim % v_group or v_group % (8 // v_bits) or tile < 1:
        return False
    if not (tile % k_group == 0 or k_group % tile == 0):
        return False
    if not compiled:
        return True
    return (is_pow2(head_dim) and is_pow2(k_group) and is_pow2(tile) and is_pow2(head_dim // v_group)
            and min(tile, k_group) >= 32 and head_dim // 2 >= 32 and head_dim // v_group <= 32)


def fused_kernel(head_dim: int, k_bits: int, v_bits: int, k_group: int, v_group: int, tokens: int):
    """The compiled decode kernel module for these sizes (``tokens``: the codes' token axis):
    ``decode_lanes`` where it applies (4-bit K and V, head_dim 128), else this one where it
    applies, else ``decode_attention``'s float kernel where that applies, else ``None``.

    In that order because on an H200 at batch 16 / 32K tokens, 4-bit K/V, ``decode_lanes`` took
    0.92 ms against this one's 1.21 (same process), and this one 1.25 against the float kernel's
    1.88 (8-bit 1.83 against 2.61); each was faster at every benchmarked shape it takes.
    """
    from . import decode_lanes  # it imports this module

    if (decode_lanes.supported(head_dim, k_bits, v_bits, k_group, v_group)
            and tokens % max(k_group, decode_lanes.TILE) == 0):
        return decode_lanes
    if kernel_supported(head_dim, k_bits, v_bits, k_group, v_group, tile=default_tile(k_group, tokens)):
        return sys.modules[__name__]
    if float_kernel.kernel_supported(head_dim, k_bits, v_bits, k_group, v_group):
        return float_kernel
    return None


def decode_attention(q, k_codes, k_scale, k_lo, v_codes, v_scale, v_lo, *, k_bits: int, v_bits: int,
                     scale: float | None = None, length=None, splits: int | None = None, tile: int | None = None,
                     key_operands: str = "kernel", asm_codes: bool = True, dot_tokens: int | None = None,
                     num_warps: int = 1, num_stages: int = 1, interpret: bool = False,
                     groups_per_step=None, prefetch=None, prescale=None, words=None):
    """Attention of one query token per head over 4-/8-bit K/V, on the integer matrix units.

    Arguments and results as ``decode_attention.decode_attention``: ``q``: ``[B, Hq, D]`` (any
    float dtype); ``k_codes``: uint8 ``[B, Hkv, T, D*k_bits/8]`` with ``k_scale``/``k_lo``
    ``[B, Hkv, T/gk, D]`` (keys grouped over ``gk`` tokens); ``v_codes``: uint8
    ``[B, Hkv, T, D*v_bits/8]`` with ``v_scale``/``v_lo`` ``[B, Hkv, T, D/gv]`` (values grouped
    over ``gv`` channels). Query head ``h`` reads KV head ``h // (Hq // Hkv)``. ``length``:
    tokens ``[0, length)`` are attended (an int or a traced int32 scalar; default ``T``).
    ``scale`` defaults to ``1/sqrt(D)``.

    Launch: ``splits`` (token slices per head; default ``default_splits``), ``tile`` (tokens
    per loop step, a multiple or divisor of ``gk``; default ``default_tile``),
    ``key_operands`` (``"kernel"``: each key group's fixed-point query computed in the kernel;
    ``"prepass"``: by jnp before it, ``key_operands()``), ``asm_codes`` (the value codes' bit
    operations as inline PTX on whole registers; compiled only), ``dot_tokens`` (tokens per
    matrix-unit dot, dividing ``min(tile, gk)``, at least 32 compiled; default 32 for 4-bit K and
    V, else ``min(tile, gk)``), ``num_warps``, ``num_stages``. The
    other kernel's options (``groups_per_step``, ``prefetch``, ``prescale``, ``words``) are
    accepted and ignored, so callers can switch kernels.

    Returns ``(out, lse)``: float32 ``[B, Hq, D]`` normalized over the attended tokens, and
    their log-sum-exp float32 ``[B, Hq]`` (``-inf`` when ``length`` is 0, with ``out`` 0).
    Raises ``ValueError`` for 2-bit codes and for sizes ``kernel_supported`` refuses.
    """
    _validate(q, k_codes, k_scale, k_lo, v_codes, v_scale, v_lo, k_bits, v_bits)
    if k_bits not in BITS or v_bits not in BITS:
        raise ValueError(f"the int8 decode kernel takes 4- or 8-bit codes, got k_bits={k_bits}, v_bits={v_bits}: "
                         f"use decode_attention.decode_attention for 2-bit codes")
    b, hq, d = q.shape
    t = k_codes.shape[2]
    gk = t // k_scale.shape[2]
    gv = d // v_scale.shape[3]
    if tile is None:
        tile = default_tile(gk, t)
    if not isinstance(tile, int) or tile < 1 or not (tile % gk == 0 or gk % tile == 0):
        raise ValueError(f"tile must be a positive integer that is a multiple or a divisor of the key group {gk}, "
                         f"got {tile!r}")
    if not kernel_supported(d, k_bits, v_bits, gk, gv, compiled=not interpret, tile=tile):
        raise ValueError(f"the int8 decode kernel needs an even head_dim of whole value groups and, compiled, "
                         f"power-of-two sizes with dots of >= 32 tokens and channels; head_dim {d}, key group "
                         f"{gk}, value group {gv}, tile {tile} at {k_bits}/{v_bits} bits do not fit: use "
                         f"decode_attention_reference")
    if key_operands not in ("kernel", "prepass"):
        raise ValueError(f"key_operands must be 'kernel' or 'prepass', got {key_operands!r}")
    per_group = min(tile, gk)
    if dot_tokens is None:  # 4-bit: 32 (H200, batch 16 / 32K: 1.203 against 1.309 ms); 8-bit: 64 (1.825, 1.925)
        dot_tokens = min(32, per_group) if k_bits == v_bits == 4 and (interpret or per_group >= 32) else per_group
    if not isinstance(dot_tokens, int) or dot_tokens < 1 or per_group % dot_tokens or \
            (not interpret and dot_tokens < 32):
        raise ValueError(f"dot_tokens must be a positive integer dividing {per_group} (min(tile, key group)), at "
                         f"least 32 when compiled, got {dot_tokens!r}")
    unit = max(tile, gk)  # a split holds whole key groups and whole tiles
    if t % unit:
        raise ValueError(f"tile {tile} must divide the {t} tokens")
    if splits is None:
        splits = default_splits(b, hq, t, gk, tile, interpret)
    if not isinstance(splits, int) or splits < 1 or (t // unit) % splits:
        raise ValueError(f"splits must be a positive integer dividing {t // unit} (tokens / max(tile, key group)), "
                         f"got {splits!r}")
    if scale is None:
        scale = 1.0 / math.sqrt(d)
    length = jnp.asarray(t if length is None else length, jnp.int32)
    return _decode(q, k_codes, k_scale, k_lo, v_codes, v_scale, v_lo, length, k_bits=k_bits, v_bits=v_bits,
                   scale=float(scale), splits=splits, tile=tile, prepass=key_operands == "prepass",
                   asm_codes=bool(asm_codes) and not interpret, dot_tokens=dot_tokens, num_warps=num_warps,
                   num_stages=num_stages, interpret=interpret)


def key_operands(q, k_scale, k_lo, *, k_bits: int):
    """The pre-pass: each (query head, key group)'s fixed-point key operand, as the kernel computes it.

    ``q``: float32 ``[B, Hq, D]`` already times the softmax scale; ``k_scale``/``k_lo``
    ``[B, Hkv, G, D]``. With ``x = q s`` and ``X = round(x 2**(21 - e))`` (``max |x| < 2**(e + 1)``)
    returns ``(u, w, bias)``: int32 ``[B, Hq, G, pk, D/pk]`` (``pk = 8 // k_bits``) the biased
    values whose bytes are the limbs (8-bit: ``X + 0x808080``; 4-bit: row 0
    ``16 X_e - X_o + 0x80808080``, row 1 ``X_o + 0x80808080``, with ``X_e``/``X_o`` the even/odd
    channels), float32 ``[B, Hq, G]`` ``2**(e - 21)`` and float32 ``[B, Hq, G]`` the score bias
    ``q . lo`` plus the shifted codes' correction.
    """
    b, hq, d = q.shape
    rep = hq // k_scale.shape[1]
    pk = 8 // k_bits
    ks = jnp.repeat(k_scale, rep, axis=1).astype(jnp.float32)
    kl = jnp.repeat(k_lo, rep, axis=1).astype(jnp.float32)
    x = q[:, :, None, :] * ks  # [B, Hq, G, D]
    e = _floor_log2(jnp.max(jnp.abs(x), axis=-1))
    xf = (x * _pow2(KEY_FRAC - e)[..., None]).reshape(b, hq, -1, d // pk, pk)
    *us, shifted = _key_limb_sources([xf[..., j] for j in range(pk)], k_bits)
    w = _pow2(e - KEY_FRAC)
    bias = jnp.einsum("bhd,bhgd->bhg", q, kl, precision=jax.lax.Precision.HIGHEST)
    return jnp.stack(us, axis=-2), w, bias + _SHIFT_BACK[k_bits] * w * shifted


@functools.partial(jax.jit, static_argnames=("k_bits", "v_bits", "scale", "splits", "tile", "prepass", "asm_codes",
                                             "dot_tokens", "num_warps", "num_stages", "interpret"))
def _decode(q, k_codes, k_scale, k_lo, v_codes, v_scale, v_lo, length, *, k_bits, v_bits, scale, splits, tile,
            prepass, asm_codes, dot_tokens, num_warps, num_stages, interpret):
    b, hq, d = q.shape
    hkv, t = k_codes.shape[1], k_codes.shape[2]
    rep = hq // hkv
    pk, pv = 8 // k_bits, 8 // v_bits
    wk, wv = d // pk, d // pv
    gk = t // k_scale.shape[2]
    gv = d // v_scale.shape[3]
    nvg = d // gv
    nv = value_columns(nvg)
    split = t // splits
    gsplit = split // gk
    qf = q.astype(jnp.float32) * scale
    kernel = functools.partial(_kernel, k_bits=k_bits, v_bits=v_bits, gk=gk, split_len=split, tile=tile,
                               prepass=prepass, asm_codes=asm_codes, dot_tokens=dot_tokens)
    if prepass:
        u, w, bias = key_operands(qf, k_scale, k_lo, k_bits=k_bits)
        q_specs = [pl.BlockSpec((None, None, gsplit, pk, wk), lambda i, h, s: (i, h, s, 0, 0)),
                   pl.BlockSpec((None, None, gsplit), lambda i, h, s: (i, h, s)),
                   pl.BlockSpec((None, None, gsplit), lambda i, h, s: (i, h, s))]
        q_args = (u, w, bias)
    else:
        q_specs, q_args = query_specs(qf, k_scale, k_lo, pk, gsplit)
    o, vb, ml = pl.pallas_call(
        kernel,
        grid=(b, hq, splits),
        in_specs=[pl.BlockSpec((), lambda i, h, s: ()), *q_specs, *cache_specs(rep, split, wk, wv, nvg)],
        out_specs=[pl.BlockSpec((None, None, None, pv, wv, nv), lambda i, h, s: (i, h, s, 0, 0, 0)),
                   pl.BlockSpec((None, None, None, 2, nvg), lambda i, h, s: (i, h, s, 0, 0)),
                   pl.BlockSpec((None, None, None, 2), lambda i, h, s: (i, h, s, 0))],
        out_shape=[jax.ShapeDtypeStruct((b, hq, splits, pv, wv, nv), jnp.float32),
                   jax.ShapeDtypeStruct((b, hq, splits, 2, nvg), jnp.float32),
                   jax.ShapeDtypeStruct((b, hq, splits, 2), jnp.float32)],
        interpret=interpret, compiler_params=compiler_params(interpret, num_warps, num_stages),
        name="lmcache_decode_int8",
    )(length, *q_args, k_codes, v_codes, v_scale, v_lo)
    # Per split: channel pv*i + ph takes the columns 3G + limb of its value group G, weighted by
    # 256**limb, plus the offset term sum p lv and the -128 of the shifted codes (128 sum Y / F; for
    # 4-bit the odd channels, 8 sum Y / F after their division by 16).
    c = jnp.arange(nv)
    ch = pv * jnp.arange(wv)[None, :] + jnp.arange(pv)[:, None]  # [pv, wv] channel of each output
    sel = (c[None, None, :] // 3 == (ch // gv)[..., None]) & (c < 3 * nvg)[None, None, :]
    weight = jnp.where(sel, 256.0 ** (c % 3), 0.0)  # [pv, wv, nv]
    comp = [0.0, 8.0] if v_bits == 4 else [128.0]
    offsets = vb[..., 0, :][..., None, :] + jnp.asarray(comp)[:, None] * vb[..., 1, :][..., None, :]  # [.., pv, nvg]
    onehot = (ch // gv)[..., None] == jnp.arange(nvg)  # [pv, wv, nvg]
    # Elementwise products and sums (not einsum: XLA may run float32 dots in TF32 on a GPU).
    o = jnp.sum(o * weight, axis=-1)
    if v_bits == 4:  # phase 1 holds sum Y (b - 128) = sum Y (lo + 16 hi) - 128 sum Y: odd = (that - even) / 16
        o = jnp.stack([o[..., 0, :], (o[..., 1, :] - o[..., 0, :]) * 0.0625], axis=-2)
    o = o + jnp.sum(jnp.where(onehot, offsets[..., None, :], 0.0), axis=-1)
    return merge_splits(o, ml, d)
