"""Work in progress: decode attention over 4-bit K/V with the lanes made explicit (decode_imma's design).

A port of ``lmcache.backends.torch.triton.decode_imma`` (its register-loaded path: one warp per
program, 32-token tiles, one per loop step, the next tile's key words and key operands made an
iteration ahead) to Pallas: every array is ``[32, ...]`` with row ``l`` held by lane ``l``, the
words are read by indexing the block refs with per-lane int32 arrays (one 16-byte load per lane),
and the matrix products, byte transposes and shuffles are inline PTX (``ptx``). The codes enter
as int32 words (a uint32 view made outside the kernel). Not measured on a GPU yet; see
``bench/NOTES-decode-kernels.md``.

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
            qscale, interpret):
    lane = jax.lax.broadcasted_iota(_I32, (32, 1), 0)
    g, t = lane // 4, lane % 4
    u4 = jax.lax.broadcasted_iota(_I32, (1, 4), 1)
    n_valid = jnp.clip(len_ref[()] - pl.program_id(2) * split_len, 0, split_len)
    t_hi = (n_valid + TILE - 1) // TILE
    tok_at = 4 * g + u4
    cols = jnp.where(g < 6, 1.0, 0.0)
    sel = (g % 3) * 17 + 64
    gs = jnp.minimum(g // 3, 1)
    gl = g // 4

    def column_weight(col):
        limb = col % 3
        return jnp.where((col < 6) & (col // 3 == gl),
                         jnp.where(limb == 0, 1.0, jnp.where(limb == 1, 256.0, 65536.0)), 0.0)

    wk0 = jnp.where(t == 0, 1.0, jnp.where(t == 1, 65536.0, 0.0))
    wk1 = jnp.where(t == 0, 256.0, 0.0)
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
        b00, b01, b10, b11 = _split4(kb01)
        b20, b21, b30, b31 = _split4(kb23)
        w = [_split4(k) for k in kw]  # w[token e][word s]
        a = []
        for s in range(4):
            r0, r1 = _join2(w[0][s], w[2][s]), _join2(w[1][s], w[3][s])
            a += [r0 & _LO4, r1 & _LO4, r0 & _HI4, r1 & _HI4]
        bs = [x[:, None] for x in (b00, b01, b10, b11, b20, b21, b30, b31)]
        return ptx.mma_keys(a, bs, interpret=interpret)

    def scores(n0, ko, kw):
        kb01, kb23, e, bias = ko
        d0, d1, d2, d3 = key_d(kw, kb01, kb23)
        x0 = _i2f(d0) * wk0 + _i2f(d1) * wk1
        x1 = _i2f(d2) * wk0 + _i2f(d3) * wk1
        x = _join2(ptx.bfly(x0, 1, interpret=interpret), ptx.bfly(x1, 1, interpret=interpret))
        s = x.reshape(32, 4) * e + bias
        return jnp.where((t == 0) & (n0 + tok_at < n_valid), s, -jnp.inf)

    def value_loads(tile):
        ok = tile * TILE < n_valid
        at = at_of(tile)
        cw = jnp.broadcast_to(2 * g + jax.lax.broadcasted_iota(_I32, (1, 2), 1), (32, 2))
        okw = jnp.broadcast_to(ok, (32, 2))
        words = [_load(vc_ref, (jnp.broadcast_to(at + 4 * t + i + 16 * q, (32, 2)), cw), mask=okw, other=0)
                 for q in range(2) for i in range(4)]
        j8 = jax.lax.broadcasted_iota(_I32, (1, 8), 1)
        ok8 = jnp.broadcast_to(ok, (32, 8))

        def pick(ref, grp):
            # the four tokens' (group 0, group 1) pairs, 16 contiguous bytes of the flat [split * 2] ref
            x = [_load(ref, (jnp.broadcast_to(2 * (at + 4 * t + 16 * q) + j8, (32, 8)),), mask=ok8,
                       other=0).astype(_F32) for q in range(2)]
            halves = [_split2(xq.reshape(32, 4, 2)) for xq in x]
            return _join2(*(jnp.where(grp == 0, a, b) for a, b in halves))  # [32, 4 (i), 2 (Q)]

        # the scales of the lane's B column's group, the offsets of its output dimensions' group
        return words, pick(vs_ref, gs), pick(vl_ref, gl)

    def value_regs(w):
        r = ptx.transpose4(*w, interpret=interpret)
        v = _join2(_join2(r[0], r[1]), _join2(r[2], r[3])).reshape(32, 8)
        return v & _LO4, v & _HI4

    def value_operands(s, m_ref, sv, lv, f_lane):
        p = jnp.exp2(jnp.minimum(s - m_ref, _TAU))
        pa0, pa1, pa2, pa3, pb0, pb1, pb2, pb3 = ptx.spread_p(_split4(_bits(p)), interpret=interpret)
        p8 = _join2(_join2(_join2(pa0, pb0), _join2(pa1, pb1)), _join2(_join2(pa2, pb2), _join2(pa3, pb3)))
        p8 = _float(jnp.transpose(p8, (0, 3, 2, 1)).reshape(32, 4, 2))  # [32, i, Q]
        lo_sum = jnp.sum(p8 * lv, axis=(1, 2))[:, None]
        xb = _bits(p8 * (f_lane[:, :, None] * sv) + 8388608.0)
        x02, x13 = _split2(jnp.transpose(xb, (0, 2, 1)).reshape(32, 2, 2, 2))
        xb0, xb2 = _split2(x02)
        xb1, xb3 = _split2(x13)
        bv0, bv1 = _split2(ptx.gather_byte(xb0, xb1, xb2, xb3, sel, interpret=interpret))
        return bv0, bv1, jnp.sum(p, axis=1)[:, None], lo_sum

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
        m_ref, l_p, c, acc_lo, since, live, f, ko, kw, sc = state
        words, sv, lv = value_loads(tile)
        nkw = key_words(tile + 1)
        nko = key_operands(sc)
        nsc = scale_loads(tile + 2)
        s = scores(tile * TILE, ko, kw)
        s_hi = jnp.max(s)
        ops = value_operands(s, m_ref, sv, lv, cols * f)
        sv_hi = jnp.max(sv)
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
        return m_ref, l_p, c, acc_lo, since + 1, live, f, nko, nkw, nsc

    zero = jnp.zeros((32, 8), _I32)
    init = (jnp.full((), -1.0e30, _F32), jnp.zeros((32, 1), _F32), (zero,) * 4, jnp.zeros((32, 1), _F32),
            jnp.zeros((), _I32), jnp.zeros((), _I32), jnp.zeros((), _F32), key_operands(scale_loads(0)),
            key_words(0), scale_loads(1))
    m_ref, l_p, c, acc_lo, since, live, f, *_ = jax.lax.fori_loop(0, t_hi, body, init)
    f0, f1 = fold(c, f)
    b = functools.partial(ptx.bfly, interpret=interpret)
    lo = b(b(acc_lo, 1), 2)
    keep = jnp.broadcast_to(live != 0, (8, 8))
    for half, fh in ((0, f0), (1, f1)):
        idx = o_t0 + half
        _store(o_ref, (idx,), _load(o_ref, (idx,), mask=keep, other=0.0) + _lanes_t0(fh + lo), mask=None)
    two = jax.lax.broadcasted_iota(_I32, (2,), 0)
    # the reference in natural units (the kernel's is base 2, its sums of 2**(s - m) = e**((s - m) ln 2))
    ml_ref[...] = jnp.where(two == 0, m_ref * math.log(2.0), jnp.sum(l_p))


def supported(head_dim: int, k_bits: int, v_bits: int, k_group: int, v_group: int) -> bool:
    """Whether this kernel takes these sizes (see the module doc)."""
    return (head_dim == 128 and k_bits == 4 and v_bits == 4 and v_group == 64 and k_group >= TILE
            and not k_group & (k_group - 1))


def decode_attention(q, k_codes, k_scale, k_lo, v_codes, v_scale, v_lo, *, k_bits: int, v_bits: int,
                     scale: float | None = None, length=None, splits: int | None = None, interpret: bool = False):
    """Attention of one query token per head over 4-bit K/V (arguments and results as
    ``decode_int8.decode_attention``): ``(out float32 [B, Hq, 128], lse float32 [B, Hq])``.
    ``splits``: token slices per head (whole key groups each; default ``decode_int8.default_splits``)."""
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
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    length = jnp.asarray(t if length is None else length, _I32)
    return _decode(q, k_codes, k_scale, k_lo, v_codes, v_scale, v_lo, length, scale=float(scale), splits=splits,
                   interpret=interpret)


@functools.partial(jax.jit, static_argnames=("scale", "splits", "interpret"))
def _decode(q, k_codes, k_scale, k_lo, v_codes, v_scale, v_lo, length, *, scale, splits, interpret):
    b, hq, d = q.shape
    hkv, t = k_codes.shape[1], k_codes.shape[2]
    rep = hq // hkv
    gk = t // k_scale.shape[2]
    split = t // splits
    words = lambda c: jax.lax.bitcast_convert_type(c.reshape(*c.shape[:-1], c.shape[-1] // 4, 4), _I32)
    kv = lambda i, h, s: (i, h // rep, s, 0)
    kernel = functools.partial(_kernel, gk=gk, split_len=split, qscale=scale * math.log2(math.e), interpret=interpret)
    o, ml = pl.pallas_call(
        kernel,
        grid=(b, hq, splits),
        in_specs=[pl.BlockSpec((), lambda i, h, s: ()),
                  pl.BlockSpec((None, None, d), lambda i, h, s: (i, h, 0)),
                  pl.BlockSpec((None, None, split, 16), kv),
                  pl.BlockSpec((None, None, split // gk, d), kv), pl.BlockSpec((None, None, split // gk, d), kv),
                  pl.BlockSpec((None, None, split, 16), kv),
                  pl.BlockSpec((None, None, 2 * split), lambda i, h, s: (i, h // rep, s)),
                  pl.BlockSpec((None, None, 2 * split), lambda i, h, s: (i, h // rep, s))],
        out_specs=[pl.BlockSpec((None, None, None, d), lambda i, h, s: (i, h, s, 0)),
                   pl.BlockSpec((None, None, None, 2), lambda i, h, s: (i, h, s, 0))],
        out_shape=[jax.ShapeDtypeStruct((b, hq, splits, d), _F32), jax.ShapeDtypeStruct((b, hq, splits, 2), _F32)],
        interpret=interpret, compiler_params=compiler_params(interpret, 1, 1), name="lmcache_decode_lanes",
    )(length, q, words(k_codes), k_scale, k_lo, words(v_codes), v_scale.reshape(b, hkv, 2 * t),
      v_lo.reshape(b, hkv, 2 * t))
    return merge_splits(o[..., None, :], ml, d)  # one phase of all d channels
