"""Decode attention over 4-bit K/V with the lanes made explicit (decode_imma's design).

A port of ``lmcache.backends.torch.triton.decode_imma`` (its register-loaded path: one warp per
program, 32-token tiles, one per loop step) to Pallas: every array is ``[32, ...]`` or ``[32]``
with row ``l`` held by lane ``l``, the words are read by indexing the block refs with per-lane
int32 arrays (one 16-byte load per lane), and the matrix products, byte transposes and shuffles
are inline PTX (``ptx``). The codes enter as int32 words and the value scales and offsets as
int32 pairs (views made outside the kernel, free in XLA). The next tile's key words and key
operands, and its value codes, scales and offsets, are made an iteration ahead.

Triton still chooses the layouts: asm that reads other lanes is lowered as not pure (so it is not
cloned into another layout), the arrays around it are [32] where they can be (Triton's default
layouts for [32, n] put lanes on both dimensions), and ``layout_check`` verifies XLA's TTGIR on a
GPU. On an H200 at batch 16 / 32K: 0.92 ms (``decode_int8`` 1.21, cuDNN over float16 2.5-2.6).

Only 4-bit keys and values, head_dim 128, value groups of 64, key groups of a power of two of at
least 32 tokens, one query token per head.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from . import decode_int8, ptx
from .common import compiler_params
from .decode_attention import merge_splits

TILE = 32
_TAU = 3.0  # the softmax reference moves when a score passes it by more than this (log2)
_P_MAX = 8.0
_FLUSH_TILES = 1024
_X_RANGE = 8388608.0 - 65536.0
_I2F = 0x4B400000
_LO4 = 0x0F0F0F0F
_HI4 = -0x0F0F0F10
_I32 = jnp.int32
_F32 = jnp.float32


def _load(ref, idx, mask, other):
    """``ref[idx]`` (per-lane int32 index arrays) where ``mask``, else ``other``."""
    from jax.experimental.pallas import triton as plgpu

    return plgpu.load(ref.at[idx], mask=mask, other=other)


def _store(ref, idx, val, mask):
    """``ref[idx] = val`` where ``mask``."""
    from jax.experimental.pallas import triton as plgpu

    plgpu.store(ref.at[idx], val, mask=mask)


def _lanes_t0(x):
    """The rows of lanes ``t = 0`` (``l = 4 g``) of ``x`` [32, n]: [8, n].

    The output is stored from these rows alone: the other lanes of a group hold the same
    elements, and a masked store with repeated indices is not one in interpret mode (the last
    duplicate wins, masked or not).
    """
    parts = jax.lax.split(x.reshape(8, 4, x.shape[1]), (1, 1, 1, 1), axis=1)
    return parts[0].reshape(8, x.shape[1])


def _split2(x):
    """The two halves of ``x``'s last axis (of size 2), each without it."""
    a, b = jax.lax.split(x, (1, 1), axis=x.ndim - 1)
    return a.reshape(a.shape[:-1]), b.reshape(b.shape[:-1])


def _join2(a, b):
    """``a``, ``b`` side by side along a new last axis."""
    return jnp.stack([a, b], axis=-1)


def _split4(x):
    """The 4 columns of ``x`` [32, 4] ([32] each)."""
    a, b = _split2(x.reshape(32, 2, 2))
    x0, x2 = _split2(a)
    x1, x3 = _split2(b)
    return x0, x1, x2, x3


def _join4(x0, x1, x2, x3):
    """[32, 4] of four [32] (``_split4``'s inverse)."""
    return _join2(_join2(x0, x2), _join2(x1, x3)).reshape(32, 4)


def _bits(x):
    return jax.lax.bitcast_convert_type(x, _I32)


def _float(x):
    return jax.lax.bitcast_convert_type(x, _F32)


def _i2f(c):
    """int32 below 2**22 in magnitude as float32, exactly."""
    return _float(c + _I2F) - 12582912.0


def _kernel(len_ref, q_ref, kc_ref, ks_ref, kl_ref, vc_ref, vs_ref, vl_ref, o_ref, ml_ref, *, gk, split_len,
            qscale, v_dtype, value_ahead, interpret):
    lane = jax.lax.broadcasted_iota(_I32, (32, 1), 0)
    g, t = lane // 4, lane % 4
    u4 = jax.lax.broadcasted_iota(_I32, (1, 4), 1)
    n_valid = jnp.clip(len_ref[()] - pl.program_id(2) * split_len, 0, split_len)
    t_hi = (n_valid + TILE - 1) // TILE
    gl = g // 4
    # [32] per-lane vectors for the asm operands and what feeds them: Triton lays [32, n] arrays
    # out over lanes of both dimensions by default, and converting between layouts costs shuffles
    # or shared memory in the loop
    l1 = jax.lax.broadcasted_iota(_I32, (32,), 0)
    g1, t1 = l1 // 4, l1 % 4
    cols = jnp.where(g1 < 6, 1.0, 0.0)
    sel = (g1 % 3) * 17 + 64

    def column_weight(col):
        limb = col % 3
        return jnp.where((col < 6) & (col // 3 == gl),
                         jnp.where(limb == 0, 1.0, jnp.where(limb == 1, 256.0, 65536.0)), 0.0)

    wk0 = jnp.where(t1 == 0, 1.0, jnp.where(t1 == 1, 65536.0, 0.0))
    wk1 = jnp.where(t1 == 0, 256.0, 0.0)
    wv0, wv1 = column_weight(2 * t), column_weight(2 * t + 1)
    mt = jax.lax.broadcasted_iota(_I32, (1, 8), 1)
    # the output dimensions of lane (g, t = 0)'s fold results, [8, 8]: half 0; half 1 at + 1
    o_t0 = 16 * jax.lax.broadcasted_iota(_I32, (8, 1), 0) + 8 * (mt // 4) + 2 * ((mt // 2) % 2) + 4 * (mt % 2)

    def at_of(tile):
        return jnp.maximum(jnp.minimum(tile, t_hi - 1), 0) * TILE

    def key_words(tile):
        ok = jnp.broadcast_to(tile * TILE < n_valid, (32, 4))
        rows = at_of(tile) + 4 * g
        return tuple(_load(kc_ref, (jnp.broadcast_to(rows + e, (32, 4)), jnp.broadcast_to(4 * t + u4, (32, 4))),
                             mask=ok, other=0) for e in range(4))

    kd = 32 * t + 8 * (g // 2) + (g % 2) + 2 * u4  # [32, 4]: the lane's dimensions of B register g

    def scale_loads(tile):
        row = jnp.broadcast_to(at_of(tile) // gk, (32, 4))
        return ks_ref[row, kd], kl_ref[row, kd]

    q4 = q_ref[kd].astype(_F32) * qscale
    qx4 = jnp.where(g % 2 == 1, q4 * 0.0625, q4)

    def key_operands(sc):
        ks, kl = sc
        x = qx4 * ks.astype(_F32)
        amax = jnp.max(jnp.abs(x))
        ex = jnp.clip(((_bits(amax) >> 23) & 0xFF) - 127, -100, 100)
        up = _float((148 - ex) << 23)
        down = _float((106 + ex) << 23)
        u = _bits(x * up + 12582912.0) - (_I2F - 0x808080)
        w0, w1, w2, _ = ptx.transpose4(*_split4(u), interpret=interpret)
        flip = -0x7F7F7F80
        b = ptx.key_b(w0 ^ flip, w1 ^ flip, w2 ^ flip, interpret=interpret)
        bias = jnp.sum(q4 * kl.astype(_F32))
        return _join4(*b[:4]), _join4(*b[4:]), down, bias

    def key_d(kw, kb01, kb23):
        """The key product of tokens (4g + 2j, 4g + 2j + 1) for j = 0, 1: two D fragments.

        Every operand is a [32] array of its own: Triton lays a [32, 2] array out over 16 x 2
        lanes by default, which an asm reading other lanes must not see."""
        bs = [*_split4(kb01), *_split4(kb23)]
        w = [_split4(k) for k in kw]  # w[token e][word s]
        ds = []
        for j in range(2):
            a = []
            for s in range(4):
                r0, r1 = w[2 * j][s], w[2 * j + 1][s]
                a += [r0 & _LO4, r1 & _LO4, r0 & _HI4, r1 & _HI4]
            ds.append(ptx.mma_keys(a, bs, interpret=interpret))
        return ds

    def scores(n0, ko, kw):
        kb01, kb23, e, bias = ko
        b = functools.partial(ptx.bfly, mask=1, interpret=interpret)
        x = []
        for d0, d1, d2, d3 in key_d(kw, kb01, kb23):
            x += [b(_i2f(d0) * wk0 + _i2f(d1) * wk1), b(_i2f(d2) * wk0 + _i2f(d3) * wk1)]
        # token 4g + c of lane (g, t = 0); the other lanes hold none
        return [jnp.where((t1 == 0) & (n0 + 4 * g1 + c < n_valid), xc * e + bias, -jnp.inf) for c, xc in enumerate(x)]

    def value_loads(tile):
        ok = tile * TILE < n_valid
        at = at_of(tile)
        cw = jnp.broadcast_to(2 * g + jax.lax.broadcasted_iota(_I32, (1, 2), 1), (32, 2))
        okw = jnp.broadcast_to(ok, (32, 2))
        words = [_load(vc_ref, (jnp.broadcast_to(at + 4 * t + i + 16 * q, (32, 2)), cw), mask=okw, other=0)
                 for q in range(2) for i in range(4)]
        ok4 = jnp.broadcast_to(ok, (32, 4))
        # scales and offsets as int32 words of one token's (group 0, group 1) 16-bit pair; lane
        # (g, t) takes tokens at + 4t + 16Q + i (16 contiguous bytes per Q)
        pairs = [[_load(ref, (jnp.broadcast_to(at + 4 * t + 16 * q + u4, (32, 4)),), mask=ok4, other=0)
                  for q in range(2)] for ref in (vs_ref, vl_ref)]
        return tuple(words), pairs

    def pick(pairs, grp):
        """Group ``grp`` ([32]) of each pair, as float32: [Q][i] of [32]."""
        return [[jax.lax.bitcast_convert_type((((x >> (16 * grp)) & 0xFFFF)).astype(jnp.uint16), v_dtype).astype(_F32)
                 for x in _split4(w)] for w in pairs]

    def value_side(loads):
        """(value words, scales of the lane's B column's group, offsets of its output dimensions' group)."""
        words, (vs, vl) = loads
        return words, pick(vs, jnp.minimum(g1 // 3, 1)), pick(vl, g1 // 4)

    def value_regs(w):
        r = ptx.transpose4(*w, interpret=interpret)
        v = _join2(_join2(r[0], r[1]), _join2(r[2], r[3])).reshape(32, 8)
        return v & _LO4, v & _HI4

    def value_operands(s, m_ref, sv, lv, f_lane):
        p = [jnp.exp2(jnp.minimum(x - m_ref, _TAU)) for x in s]
        # lane (g, t) gets p of tokens 4t + i (Q = 0) and 16 + 4t + i (Q = 1), i = 0..3
        spread = ptx.spread_p([_bits(x) for x in p], interpret=interpret)
        lo_sum, bv = 0.0, []
        for q in range(2):
            pq = [_float(spread[4 * q + i]) for i in range(4)]
            lo_sum = lo_sum + sum(pq[i] * lv[q][i] for i in range(4))
            xb = [_bits(pq[i] * (f_lane * sv[q][i]) + 8388608.0) for i in range(4)]
            bv.append(ptx.gather_byte(*xb, sel, interpret=interpret))
        return bv[0], bv[1], p[0] + p[1] + p[2] + p[3], lo_sum

    def fold(c, f):
        h0 = jnp.where(f > 0, 1.0 / f, 0.0)
        h1 = 0.0625 * h0
        x0 = c[0].astype(_F32) * (wv0 * h0) + c[1].astype(_F32) * (wv1 * h0)
        x1 = c[2].astype(_F32) * (wv0 * h1) + c[3].astype(_F32) * (wv1 * h1)
        b = functools.partial(ptx.bfly, interpret=interpret)
        return b(b(x0, 1), 2), b(b(x1, 1), 2)

    def fold_out(f0, f1, alpha, live, add):
        keep = jnp.broadcast_to(live != 0, (8, 8))
        write = jnp.broadcast_to((live | add) != 0, (8, 8))
        for half, fh in ((0, f0), (1, f1)):
            idx = o_t0 + half
            _store(o_ref, (idx,), (_load(o_ref, (idx,), mask=keep, other=0.0) + _lanes_t0(fh)) * alpha, mask=write)

    def body(tile, state):
        m_ref, l_p, c, acc_lo, since, live, f, ko, kw, sc, vl_ahead = state
        if value_ahead:  # this tile's were loaded an iteration ago; the next tile's now
            words, sv, lv = value_side(vl_ahead)
            vl_ahead = value_loads(tile + 1)
        else:
            words, sv, lv = value_side(value_loads(tile))
        nkw = key_words(tile + 1)
        nko = key_operands(sc)
        nsc = scale_loads(tile + 2)
        s = scores(tile * TILE, ko, kw)
        s_hi = jnp.max(jnp.maximum(jnp.maximum(s[0], s[1]), jnp.maximum(s[2], s[3])))
        ops = value_operands(s, m_ref, sv, lv, cols * f)
        sv_hi = jnp.max(functools.reduce(jnp.maximum, sv[0] + sv[1]))
        grow = s_hi > m_ref + _TAU
        wide = (sv_hi * f > _X_RANGE / _P_MAX) | ((f == 0.0) & (sv_hi > 0.0))

        def refold(st):
            m_ref, l_p, c, acc_lo, since, live, f, ops = st
            m_new = jnp.where(grow, s_hi, m_ref)
            alpha = jnp.exp2(m_ref - m_new)
            f0, f1 = fold(c, f)
            add = (since > 0).astype(_I32)
            fold_out(f0, f1, alpha, live, add)
            f = jnp.where(wide, 1.0 / (2.0 * sv_hi * _P_MAX) * _X_RANGE, f)
            zero = jnp.zeros((32, 8), _I32)
            return (m_new, l_p * alpha, (zero,) * 4, acc_lo * alpha, since * 0, live | add, f,
                    value_operands(s, m_new, sv, lv, cols * f))

        st = (m_ref, l_p, c, acc_lo, since, live, f, ops)
        m_ref, l_p, c, acc_lo, since, live, f, ops = jax.lax.cond(grow | wide | (since >= _FLUSH_TILES), refold,
                                                                  lambda st: st, st)
        l_p = l_p + ops[2]
        acc_lo = acc_lo + ops[3]
        a0, a1 = value_regs(words[:4])
        a2, a3 = value_regs(words[4:])
        c = tuple(ptx.mma_values([a0, a1, a2, a3], [ops[0][:, None], ops[1][:, None]], list(c), interpret=interpret))
        return m_ref, l_p, c, acc_lo, since + 1, live, f, nko, nkw, nsc, vl_ahead

    zero = jnp.zeros((32, 8), _I32)
    init = (jnp.full((), -1.0e30, _F32), jnp.zeros((32,), _F32), (zero,) * 4, jnp.zeros((32,), _F32),
            jnp.zeros((), _I32), jnp.zeros((), _I32), jnp.zeros((), _F32), key_operands(scale_loads(0)),
            key_words(0), scale_loads(1), value_loads(0) if value_ahead else ())
    m_ref, l_p, c, acc_lo, since, live, f, *_ = jax.lax.fori_loop(0, t_hi, body, init)
    f0, f1 = fold(c, f)
    b = functools.partial(ptx.bfly, interpret=interpret)
    lo = b(b(acc_lo, 1), 2)
    keep = jnp.broadcast_to(live != 0, (8, 8))
    for half, fh in ((0, f0), (1, f1)):
        idx = o_t0 + half
        _store(o_ref, (idx,), _load(o_ref, (idx,), mask=keep, other=0.0) + _lanes_t0(fh + lo[:, None]), mask=None)
    two = jax.lax.broadcasted_iota(_I32, (2,), 0)
    # the reference in natural units (the kernel's is base 2, its sums of 2**(s - m) = e**((s - m) ln 2))
    ml_ref[...] = jnp.where(two == 0, m_ref * math.log(2.0), jnp.sum(l_p))


def supported(head_dim: int, k_bits: int, v_bits: int, k_group: int, v_group: int) -> bool:
    """Whether this kernel takes these sizes (see the module doc)."""
    return (head_dim == 128 and k_bits == 4 and v_bits == 4 and v_group == 64 and k_group >= TILE
            and not k_group & (k_group - 1))


def decode_attention(q, k_codes, k_scale, k_lo, v_codes, v_scale, v_lo, *, k_bits: int, v_bits: int,
                     scale: float | None = None, length=None, splits: int | None = None, value_ahead: bool = True,
                     interpret: bool = False):
    """Attention of one query token per head over 4-bit K/V (arguments and results as
    ``decode_int8.decode_attention``): ``(out float32 [B, Hq, 128], lse float32 [B, Hq])``.
    ``splits``: token slices per head (whole key groups each; default ``decode_int8.default_splits``).
    ``value_ahead``: load a tile's value codes, scales and offsets an iteration before their use.
    Value scales and offsets of another dtype than a 16-bit one (float32) go to
    ``decode_int8.decode_attention``."""
    d, t = q.shape[2], k_codes.shape[2]
    gk = t // k_scale.shape[2]
    gv = d // v_scale.shape[3]
    if not supported(d, k_bits, v_bits, gk, gv):
        raise ValueError(f"decode_lanes takes 4-bit K and V, head_dim 128, value groups of 64 and key groups of a "
                         f"power of two >= {TILE}; got head_dim {d}, {k_bits}/{v_bits} bits, groups {gk}/{gv}")
    if splits is None:
        splits = decode_int8.default_splits(q.shape[0], q.shape[1], t, gk, TILE, interpret)
    if not isinstance(splits, int) or splits < 1 or t % (splits * max(gk, TILE)):
        raise ValueError(f"splits must divide the {t} tokens into whole key groups, got {splits!r}")
    if jnp.dtype(v_scale.dtype).itemsize != 2 or v_lo.dtype != v_scale.dtype:
        # this kernel reads a token's two value scales (offsets) as one 32-bit word
        return decode_int8.decode_attention(q, k_codes, k_scale, k_lo, v_codes, v_scale, v_lo, k_bits=k_bits,
                                            v_bits=v_bits, scale=scale, length=length, splits=splits,
                                            interpret=interpret)
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    length = jnp.asarray(t if length is None else length, _I32)
    return _decode(q, k_codes, k_scale, k_lo, v_codes, v_scale, v_lo, length, scale=float(scale), splits=splits,
                   value_ahead=bool(value_ahead), interpret=interpret)


@functools.partial(jax.jit, static_argnames=("scale", "splits", "value_ahead", "interpret"))
def _decode(q, k_codes, k_scale, k_lo, v_codes, v_scale, v_lo, length, *, scale, splits, value_ahead, interpret):
    b, hq, d = q.shape
    hkv, t = k_codes.shape[1], k_codes.shape[2]
    rep = hq // hkv
    gk = t // k_scale.shape[2]
    split = t // splits
    words = lambda c: jax.lax.bitcast_convert_type(c.reshape(*c.shape[:-1], c.shape[-1] // 4, 4), _I32)
    pairs = lambda x: jax.lax.bitcast_convert_type(x, _I32)  # [b, hkv, t, 2] 16-bit -> [b, hkv, t]
    kv = lambda i, h, s: (i, h // rep, s, 0)
    kernel = functools.partial(_kernel, gk=gk, split_len=split, qscale=scale * math.log2(math.e),
                               v_dtype=v_scale.dtype, value_ahead=value_ahead, interpret=interpret)
    o, ml = pl.pallas_call(
        kernel,
        grid=(b, hq, splits),
        in_specs=[pl.BlockSpec((), lambda i, h, s: ()),
                  pl.BlockSpec((None, None, d), lambda i, h, s: (i, h, 0)),
                  pl.BlockSpec((None, None, split, 16), kv),
                  pl.BlockSpec((None, None, split // gk, d), kv), pl.BlockSpec((None, None, split // gk, d), kv),
                  pl.BlockSpec((None, None, split, 16), kv),
                  pl.BlockSpec((None, None, split), lambda i, h, s: (i, h // rep, s)),
                  pl.BlockSpec((None, None, split), lambda i, h, s: (i, h // rep, s))],
        out_specs=[pl.BlockSpec((None, None, None, d), lambda i, h, s: (i, h, s, 0)),
                   pl.BlockSpec((None, None, None, 2), lambda i, h, s: (i, h, s, 0))],
        out_shape=[jax.ShapeDtypeStruct((b, hq, splits, d), _F32), jax.ShapeDtypeStruct((b, hq, splits, 2), _F32)],
        interpret=interpret, compiler_params=compiler_params(interpret, 1, 1), name="lmcache_decode_lanes",
    )(length, q, words(k_codes), k_scale, k_lo, words(v_codes), pairs(v_scale), pairs(v_lo))
    return merge_splits(o[..., None, :], ml, d)  # one phase of all d channels
