"""Fused decode attention over packed codes, with its validating wrapper and jnp reference.

One query token per head attends to ``length`` quantized tokens without dequantizing them
to memory. The kernel folds each key group's scale into the query and its offset into a
per-group bias (``q . (c * s + lo) = (q * s) . c + q . lo``), and each value group's scale
into the probabilities (``sum_t p_t (c_t s_t + lo_t) = sum_t (p_t s_t) c_t + sum_t p_t lo_t``),
so the inner loop is a mask, a subtraction and a multiply-add per code (see ``_phases``:
no integer-to-float conversion). Codes are never interleaved: the query is split into
"phases" (phase ``j`` holds channels ``per*i + j``, the ones in bits ``bits*j..`` of byte
``i``) and the output is written the same way.

Work is split flash-decoding style: program ``(b, h, s)`` runs an online softmax over the
``s``-th slice of the tokens for query head ``h`` (which reads KV head ``h // rep``) and
writes an unnormalized output with its running max and sum; the slices are merged by
log-sum-exp in plain jnp afterwards.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from .. import ops
from .common import check_codes, compiler_params, is_pow2

NEG = ops.NEG
#: Programs to aim for when choosing the number of token slices: some 15 waves of an H100/H200's
#: 132 multiprocessors at 2 programs each, so that the last wave's idle tail stays small and
#: short contexts at batch 1 still fill the chip.
TARGET_PROGRAMS = 4096
# Launch defaults, from bench/decode_attention_jax.py on an H200 (jax 0.11.2, 2026-11-28; batch
# 16, 32K tokens, 4-bit, head_dim 128): 4 warps reading 32-bit words with the key scales folded
# into the query outside (prescale) took 1.89 ms; 8 warps 2.49 (words) / 2.53 (bytes); 4 warps
# on bytes 2.72; 16 warps 2.93; unfolded 2.95-5.50. The sm_90 builds (Triton 3.9, no GPU) count
# 648 instructions per thread per 64-token step at 4 warps on words, 727 on bytes.


_EXP = 0x4B000000  # the bits of float32 2**23
_TWO23 = 8388608.0


def _phases(bits: int, container: int = 8) -> list[tuple[int, int, bool]]:
    """For each code position ``j`` of a container (a byte, or a 32-bit word of 4 bytes):
    (mask, pos, high).

    Element ``per*i + j`` of container ``i`` (``per = container // bits``) sits at bits
    ``bits*j..``. A code at bits ``pos..pos+bits`` below bit 23 becomes an exact float by
    OR-ing in the exponent of 2**23 and subtracting 2**23: ``code * 2**pos``, with no shift
    and no integer-to-float conversion (a quarter-rate instruction). The query (keys) or the
    output (values) carries the ``2**-pos``. In words, codes above bit 23 (``high``) are read
    from the word shifted right by 16.
    """
    out = []
    for j in range(container // bits):
        high = (j + 1) * bits > 23
        pos = j * bits - (16 if high else 0)
        out.append((((1 << bits) - 1) << pos, pos, high))
    return out


def _codes_f32(c, c_high, mask, exp, high: bool):
    """``code * 2**pos`` as float32 from containers ``c`` as uint32 (see ``_phases``).

    ``c_high``: ``c >> 16`` (words only); ``mask``/``exp``: the phase's mask and the exponent
    bits as uint32 scalars.
    """
    return jax.lax.bitcast_convert_type(((c_high if high else c) & mask) | exp, jnp.float32) - _TWO23


def _opaque_zero(length):
    """0 for any valid ``length`` (non-negative), computed so the compiler cannot know it.

    OR-ed into the mask constants, it keeps them in registers for the whole loop: as known
    constants ptxas rematerializes one with a MOV before every mask-and-OR (one instruction
    in five of the inner loop, seen in the sm_90 SASS). A negative length runs no loop step.
    """
    return length.astype(jnp.uint32) >> 31


#: The running max is only moved (and the accumulators rescaled) when a tile's max exceeds it
#: by this much: probabilities up to e**8 (about 3000) are safe in float32, and the rescale,
#: a multiply of every accumulator, then happens a few times per slice instead of per tile.
RESCALE_MARGIN = 8.0


def _kernel(len_ref, *refs, k_bits, v_bits, gk, gv, split_len, gps, prefetch, prescale, container):
    # Unscaled: q_ref [pk, wk] f32, the query times the softmax scale, phase j holding channels
    #   pk*i + j (pk = 8 // k_bits, wk = D // pk bytes); ks_ref/kl_ref [split // gk, D] key
    #   scales and offsets.
    # Prescaled: qk_ref [split // gk, pk, wk] f32, that query times each group's key scales and
    #   2**-pos (see _phases); qb_ref [split // gk] f32, its dot product with the group's offsets.
    # kc_ref [split, wk] packed keys; vc_ref [split, wv] packed values (u8 bytes, or u32 words
    # when container is 32); vs_ref/vl_ref
    # [split, nvg]; o_ref [pv, wv] f32 unnormalized output by phase; ml_ref [2] f32: the
    # running max and the sum of exp(s - max).
    if prescale:
        qk_ref, qb_ref, kc_ref, vc_ref, vs_ref, vl_ref, o_ref, ml_ref = refs
    else:
        q_ref, ks_ref, kl_ref, kc_ref, vc_ref, vs_ref, vl_ref, o_ref, ml_ref = refs
    pk = container // k_bits
    wk = kc_ref.shape[1]
    nvg = vs_ref.shape[1]
    wpg = gv // (container // v_bits)  # value containers per value group
    zero = _opaque_zero(len_ref[()])
    kph = [(zero | jnp.uint32(mask), pos, high) for mask, pos, high in _phases(k_bits, container)]
    vph = [(zero | jnp.uint32(mask), pos, high) for mask, pos, high in _phases(v_bits, container)]
    exp = zero | jnp.uint32(_EXP)
    n_valid = jnp.clip(len_ref[()] - pl.program_id(2) * split_len, 0, split_len)
    step = gk * gps
    n_steps = (n_valid + step - 1) // step
    if not prescale:  # each query phase carries 2**-pos, undoing the position of its codes in the byte
        qs = [q_ref[k, :] * (2.0 ** -pos) for k, (_, pos, _) in enumerate(kph)]
    tok = jnp.arange(gk, dtype=jnp.int32)

    def load(it):
        # Clamped, so that the prefetch after the last tile re-reads it instead of running off the end.
        it = jnp.minimum(it, jnp.maximum(n_steps - 1, 0))
        rows = [pl.ds((it * gps + sub) * gk, gk) for sub in range(gps)]
        return ([kc_ref[r, :] for r in rows],
                [[vc_ref[r, pl.ds(gg * wpg, wpg)] for gg in range(nvg)] for r in rows])

    def body(it, carry):
        m, den, acc, bias, tiles = carry
        kts, vts = tiles if prefetch else load(it)
        nxt = load(it + 1) if prefetch else tiles
        scores, masks = [], []
        for sub in range(gps):
            grp = it * gps + sub
            codes = kts[sub].astype(jnp.uint32)
            high = codes >> jnp.uint32(16) if container == 32 else None
            if prescale:
                s2 = jnp.zeros((gk, wk), jnp.float32)
                for k, (mask, _, hi) in enumerate(kph):
                    s2 = s2 + _codes_f32(codes, high, mask, exp, hi) * qk_ref[grp, k, :][None, :]
                s = jnp.sum(s2, axis=1) + qb_ref[grp]
            else:
                # The offset term q . lo enters as the starting value of the per-byte partial
                # sums, so the one row reduction below adds it (no reduction of its own).
                b = jnp.zeros((wk,), jnp.float32)
                for k, (_, pos, _) in enumerate(kph):
                    b = b + qs[k] * (kl_ref[grp, pl.ds(k, wk, stride=pk)].astype(jnp.float32) * (2.0 ** pos))
                s2 = jnp.broadcast_to(b[None, :], (gk, wk))
                for k, (mask, _, hi) in enumerate(kph):
                    qk = qs[k] * ks_ref[grp, pl.ds(k, wk, stride=pk)].astype(jnp.float32)
                    s2 = s2 + _codes_f32(codes, high, mask, exp, hi) * qk[None, :]
                s = jnp.sum(s2, axis=1)
            valid = (grp * gk + tok) < n_valid
            scores.append(jnp.where(valid, s, NEG))
            masks.append(valid)
        m_tile = functools.reduce(jnp.maximum, [jnp.max(x) for x in scores])
        m_new = jnp.where(m_tile > m + RESCALE_MARGIN, m_tile, m)

        def rescale(state):
            alpha = jnp.exp(m - m_new)
            return jax.tree_util.tree_map(lambda a: a * alpha, state)

        den, acc, bias = jax.lax.cond(m_new > m, rescale, lambda st: st, (den, acc, bias))
        bias = list(bias)
        acc = list(acc)
        for sub in range(gps):
            rows = pl.ds((it * gps + sub) * gk, gk)
            p = jnp.where(masks[sub], jnp.exp(scores[sub] - m_new), 0.0)
            den = den + p
            for gg in range(nvg):
                # Each value group is its own column block, so its scale multiplies the
                # probabilities once per token rather than once per code.
                pw = (p * vs_ref[rows, gg].astype(jnp.float32))[:, None]
                bias[gg] = bias[gg] + p * vl_ref[rows, gg].astype(jnp.float32)
                codes = vts[sub][gg].astype(jnp.uint32)
                high = codes >> jnp.uint32(16) if container == 32 else None
                for k, (mask, _, hi) in enumerate(vph):
                    acc[k * nvg + gg] = acc[k * nvg + gg] + _codes_f32(codes, high, mask, exp, hi) * pw
        return m_new, den, acc, bias, nxt

    init = (jnp.full((), NEG, jnp.float32), jnp.zeros((gk,), jnp.float32),
            [jnp.zeros((gk, wpg), jnp.float32) for _ in range(len(vph) * nvg)],
            [jnp.zeros((gk,), jnp.float32) for _ in range(nvg)],
            load(0) if prefetch else ())
    m, den, acc, bias, _ = jax.lax.fori_loop(0, n_steps, body, init)
    for k, (_, pos, _) in enumerate(vph):
        for gg in range(nvg):
            o_ref[k, pl.ds(gg * wpg, wpg)] = jnp.sum(acc[k * nvg + gg], axis=0) * (2.0 ** -pos) + jnp.sum(bias[gg])
    ml_ref[...] = jnp.where(jnp.arange(2) == 0, m, jnp.sum(den))


def _validate(q, k_codes, k_scale, k_lo, v_codes, v_scale, v_lo, k_bits, v_bits):
    check_codes("k_codes", k_codes, k_bits)
    check_codes("v_codes", v_codes, v_bits)
    if q.ndim != 3:
        raise ValueError(f"q must be [batch, q_heads, head_dim] (one decode token), got shape {q.shape}")
    b, hq, d = q.shape
    if k_codes.ndim != 4 or v_codes.ndim != 4:
        raise ValueError(f"k_codes and v_codes must be [batch, kv_heads, tokens, packed], got {k_codes.shape} and "
                         f"{v_codes.shape}")
    kb, hkv, t, _ = k_codes.shape
    if (kb, hkv, t) != v_codes.shape[:3] or kb != b:
        raise ValueError(f"k_codes {k_codes.shape}, v_codes {v_codes.shape} and q {q.shape} disagree on "
                         f"batch, heads or tokens")
    if hkv < 1 or hq % hkv:
        raise ValueError(f"q_heads ({hq}) must be a multiple of kv_heads ({hkv})")
    if k_codes.shape[3] * (8 // k_bits) != d or v_codes.shape[3] * (8 // v_bits) != d:
        raise ValueError(f"k_codes / v_codes of last axis {k_codes.shape[3]} / {v_codes.shape[3]} do not unpack to "
                         f"head_dim {d} at {k_bits} / {v_bits} bits")
    if k_scale.shape != k_lo.shape or k_scale.ndim != 4 or k_scale.shape[:2] != (b, hkv) \
            or k_scale.shape[3] != d or k_scale.shape[2] < 1 or t % k_scale.shape[2]:
        raise ValueError(f"k_scale/k_lo must be [batch, kv_heads, tokens // group, head_dim], got "
                         f"{k_scale.shape} and {k_lo.shape} for {t} tokens")
    if v_scale.shape != v_lo.shape or v_scale.ndim != 4 or v_scale.shape[:3] != (b, hkv, t) \
            or v_scale.shape[3] < 1 or d % v_scale.shape[3]:
        raise ValueError(f"v_scale/v_lo must be [batch, kv_heads, tokens, head_dim // group], got "
                         f"{v_scale.shape} and {v_lo.shape}")
    gv = d // v_scale.shape[3]
    if gv % (8 // v_bits):
        raise ValueError(f"value group {gv} must be a multiple of {8 // v_bits} for {v_bits}-bit codes")


def kernel_supported(head_dim: int, k_bits: int, v_bits: int, k_group: int, v_group: int,
                     compiled: bool = True, words: bool = False) -> bool:
    """Whether the kernel handles these sizes.

    Always: each value group covers whole containers (bytes, or 32-bit words with
    ``words``), and with ``words`` each head's codes fill whole words. Compiled, also
    power-of-two tiles (Triton's rule) and key groups of at least 16 tokens.
    """
    c = 32 if words else 8
    if v_group % (c // v_bits) or (head_dim * k_bits) % c or (head_dim * v_bits) % c:
        return False
    if not compiled:
        return True
    return (is_pow2(k_group) and k_group >= 16 and is_pow2(head_dim * k_bits // c)
            and is_pow2(head_dim * v_bits // c) and is_pow2(v_group * v_bits // c))


def choose_splits(batch: int, q_heads: int, groups: int, gps: int = 1, target: int = TARGET_PROGRAMS,
                  min_steps: int = 1) -> int:
    """Token slices per (batch, head): about ``target`` programs in all, dividing ``groups // gps``,
    each of at least ``min_steps`` loop steps (where there are that many)."""
    steps = groups // gps
    want = max(1, min(math.ceil(target / max(1, batch * q_heads)), steps // max(1, min_steps)))
    best = 1
    for s in range(1, min(steps, want) + 1):
        if steps % s == 0:
            best = s
    return best


def decode_attention(q, k_codes, k_scale, k_lo, v_codes, v_scale, v_lo, *, k_bits: int, v_bits: int,
                     scale: float | None = None, length=None, splits: int | None = None, groups_per_step: int = 1,
                     num_warps: int = 4, num_stages: int = 2, prefetch: bool = True, prescale: bool = True,
                     words: bool | None = None, interpret: bool = False):
    """Attention of one query token per head over quantized K/V, reading the packed codes in place.

    ``q``: ``[B, Hq, D]`` (any float dtype); ``k_codes``: uint8 ``[B, Hkv, T, D*k_bits/8]``
    with ``k_scale``/``k_lo`` ``[B, Hkv, T/gk, D]`` (keys grouped over ``gk`` tokens);
    ``v_codes``: uint8 ``[B, Hkv, T, D*v_bits/8]`` with ``v_scale``/``v_lo``
    ``[B, Hkv, T, D/gv]`` (values grouped over ``gv`` channels). Query head ``h`` reads KV
    head ``h // (Hq // Hkv)``. ``length``: tokens ``[0, length)`` are attended (an int or a
    traced int32 scalar; default ``T``). ``scale`` defaults to ``1/sqrt(D)``.
    ``splits`` (token slices per head), ``groups_per_step`` (key groups per loop step),
    ``num_warps``, ``num_stages``, ``prefetch`` (load the next step's codes before
    computing on this one's) and ``prescale`` (fold the key scales into the query in a
    separate pass: fewer instructions in the kernel, a little more memory traffic) and
    ``words`` (read the codes as 32-bit words: fewer instructions; ``None``: where the
    sizes allow) tune it.

    Returns ``(out, lse)``: float32 ``[B, Hq, D]`` normalized over the attended tokens, and
    their log-sum-exp float32 ``[B, Hq]`` (``-inf`` when ``length`` is 0, with ``out`` 0),
    so callers can merge it with attention over other tokens (``ops.combine``).
    """
    _validate(q, k_codes, k_scale, k_lo, v_codes, v_scale, v_lo, k_bits, v_bits)
    b, hq, d = q.shape
    t = k_codes.shape[2]
    gk = t // k_scale.shape[2]
    gv = d // v_scale.shape[3]
    if not isinstance(groups_per_step, int) or groups_per_step < 1 or (t // gk) % groups_per_step:
        raise ValueError(f"groups_per_step must be a positive integer dividing the {t // gk} key groups, "
                         f"got {groups_per_step!r}")
    if splits is None:
        splits = choose_splits(b, hq, t // gk, groups_per_step)
    if not isinstance(splits, int) or splits < 1 or (t // gk // groups_per_step) % splits:
        raise ValueError(f"splits must be a positive integer dividing {t // gk // groups_per_step} "
                         f"(key groups / groups_per_step), got {splits!r}")
    if words is None:  # words where the sizes allow (faster), else bytes
        words = kernel_supported(d, k_bits, v_bits, gk, gv, compiled=not interpret, words=True)
    if not kernel_supported(d, k_bits, v_bits, gk, gv, compiled=not interpret, words=words):
        raise ValueError(f"the decode kernel needs value groups of whole bytes (words, with words=True) and, "
                         f"compiled, power-of-two tiles with key groups >= 16; head_dim {d}, "
                         f"key group {gk}, value group {gv} at {k_bits}/{v_bits} bits do not fit: use "
                         f"decode_attention_reference")
    if scale is None:
        scale = 1.0 / math.sqrt(d)
    length = jnp.asarray(t if length is None else length, jnp.int32)
    return _decode(q, k_codes, k_scale, k_lo, v_codes, v_scale, v_lo, length, k_bits=k_bits, v_bits=v_bits,
                   scale=float(scale), splits=splits, gps=groups_per_step, num_warps=num_warps,
                   num_stages=num_stages, prefetch=bool(prefetch), prescale=bool(prescale), words=bool(words),
                   interpret=interpret)


@functools.partial(jax.jit, static_argnames=("k_bits", "v_bits", "scale", "splits", "gps", "num_warps",
                                             "num_stages", "prefetch", "prescale", "words", "interpret"))
def _decode(q, k_codes, k_scale, k_lo, v_codes, v_scale, v_lo, length, *, k_bits, v_bits, scale, splits, gps,
            num_warps, num_stages, prefetch, prescale, words, interpret):
    b, hq, d = q.shape
    hkv, t = k_codes.shape[1], k_codes.shape[2]
    rep = hq // hkv
    container = 32 if words else 8
    pk, pv = container // k_bits, container // v_bits
    wk, wv = d // pk, d // pv
    if words:  # little-endian: byte 4w + b is bits 8b.. of word w, so code j of word w is element pk*w + j
        k_codes = jax.lax.bitcast_convert_type(k_codes.reshape(b, hkv, t, wk, 4), jnp.uint32)
        v_codes = jax.lax.bitcast_convert_type(v_codes.reshape(b, hkv, t, wv, 4), jnp.uint32)
    gk = t // k_scale.shape[2]
    gv = d // v_scale.shape[3]
    nvg = d // gv
    split = t // splits
    qf = q.astype(jnp.float32) * scale
    kernel = functools.partial(_kernel, k_bits=k_bits, v_bits=v_bits, gk=gk, gv=gv, split_len=split, gps=gps,
                               prefetch=prefetch, prescale=prescale, container=container)
    if prescale:
        # Fold each key group's scales (and the 2**-pos of each code position) into the query
        # once, outside: [B, Hq, G, pk, wk], phase-major so the kernel reads it contiguously.
        ks = jnp.repeat(k_scale, rep, axis=1).astype(jnp.float32)
        kl = jnp.repeat(k_lo, rep, axis=1).astype(jnp.float32)
        pos = jnp.asarray([2.0 ** -p for _, p, _ in _phases(k_bits, container)], jnp.float32)
        qk = (qf[:, :, None, :] * ks).reshape(b, hq, -1, wk, pk).swapaxes(-1, -2) * pos[:, None]
        qb = jnp.einsum("bhd,bhgd->bhg", qf, kl, precision=jax.lax.Precision.HIGHEST)
        gsplit = split // gk
        q_specs = [pl.BlockSpec((None, None, gsplit, pk, wk), lambda i, h, s: (i, h, s, 0, 0)),
                   pl.BlockSpec((None, None, gsplit), lambda i, h, s: (i, h, s))]
        q_args = (qk, qb)
    else:
        q_specs, q_args = query_specs(qf, k_scale, k_lo, pk, split // gk)
    o, ml = pl.pallas_call(
        kernel,
        grid=(b, hq, splits),
        in_specs=[pl.BlockSpec((), lambda i, h, s: ()), *q_specs, *cache_specs(rep, split, wk, wv, nvg)],
        out_specs=[pl.BlockSpec((None, None, None, pv, wv), lambda i, h, s: (i, h, s, 0, 0)),
                   pl.BlockSpec((None, None, None, 2), lambda i, h, s: (i, h, s, 0))],
        out_shape=[jax.ShapeDtypeStruct((b, hq, splits, pv, wv), jnp.float32),
                   jax.ShapeDtypeStruct((b, hq, splits, 2), jnp.float32)],
        interpret=interpret, compiler_params=compiler_params(interpret, num_warps, num_stages),
        name="lmcache_decode_attention",
    )(length, *q_args, k_codes, v_codes, v_scale, v_lo)
    return merge_splits(o, ml, d)


def query_specs(qf, k_scale, k_lo, pk: int, gsplit: int):
    """A decode kernel's query inputs when the key scales are applied in the kernel, over the grid
    (batch, query head, slice): ``qf`` float32 ``[B, Hq, D]`` by phase (``[pk, D/pk]``, phase ``j``
    holding channels ``pk*i + j``) and each slice's ``gsplit`` key groups of scales and offsets
    ``[B, Hkv, G, D]`` from query head ``h``'s KV head. Returns ``(BlockSpecs, arrays)``."""
    b, hq, d = qf.shape
    rep = hq // k_scale.shape[1]
    kv = lambda i, h, s: (i, h // rep, s, 0)
    qp = qf.reshape(b, hq, d // pk, pk).swapaxes(-1, -2)
    return ([pl.BlockSpec((None, None, pk, d // pk), lambda i, h, s: (i, h, 0, 0)),
             pl.BlockSpec((None, None, gsplit, d), kv), pl.BlockSpec((None, None, gsplit, d), kv)],
            (qp, k_scale, k_lo))


def cache_specs(rep: int, split: int, wk: int, wv: int, nvg: int) -> list:
    """BlockSpecs of a decode kernel's cache inputs over the grid (batch, query head, slice), from
    query head ``h``'s KV head ``h // rep``: one slice of ``split`` tokens of packed keys ``[split,
    wk]``, packed values ``[split, wv]``, value scales and offsets ``[split, nvg]``."""
    kv = lambda i, h, s: (i, h // rep, s, 0)
    return [pl.BlockSpec((None, None, split, wk), kv), pl.BlockSpec((None, None, split, wv), kv),
            pl.BlockSpec((None, None, split, nvg), kv), pl.BlockSpec((None, None, split, nvg), kv)]


def merge_splits(o, ml, d: int):
    """Log-sum-exp merge of a kernel's token slices: ``o`` float32 ``[B, Hq, S, pv, wv]``, slice
    ``s``'s unnormalized output by phase (channel ``pv * i + j`` at ``[j, i]``), ``ml`` float32
    ``[B, Hq, S, 2]`` its running max and sum of exponentials -> ``(out [B, Hq, d], lse [B, Hq])``
    as ``decode_attention`` returns them."""
    b, hq = o.shape[:2]
    m, den = ml[..., 0], ml[..., 1]
    # The barrier keeps XLA from fusing the max into the exponentials below (jax's own
    # decode kernel saw NaNs without it).
    m_all = jax.lax.optimization_barrier(m.max(axis=2))
    w = jnp.exp(m - m_all[..., None])
    tot = (w * den).sum(axis=2)
    o = (o * w[..., None, None]).sum(axis=2)  # [b, hq, pv, wv]
    o = o.swapaxes(-1, -2).reshape(b, hq, d)
    nonempty = tot > 0
    out = o / jnp.where(nonempty, tot, 1.0)[..., None]
    lse = jnp.where(nonempty, m_all + jnp.log(jnp.where(nonempty, tot, 1.0)), -jnp.inf)
    return out, lse


def decode_attention_reference(q, k_codes, k_scale, k_lo, v_codes, v_scale, v_lo, *, k_bits: int, v_bits: int,
                               scale: float | None = None, length=None, **_launch):
    """The jnp path with ``decode_attention``'s signature and results: dequantize, then attend.

    Launch options (``splits``, ``num_warps``...) are accepted and ignored.
    """
    _validate(q, k_codes, k_scale, k_lo, v_codes, v_scale, v_lo, k_bits, v_bits)
    d = q.shape[-1]
    t = k_codes.shape[2]
    scale = 1.0 / math.sqrt(d) if scale is None else float(scale)
    length = jnp.asarray(t if length is None else length, jnp.int32)
    return _reference(q, k_codes, k_scale, k_lo, v_codes, v_scale, v_lo, length, k_bits=k_bits, v_bits=v_bits,
                      scale=scale)


@functools.partial(jax.jit, static_argnames=("k_bits", "v_bits", "scale"))
def _reference(q, k_codes, k_scale, k_lo, v_codes, v_scale, v_lo, length, *, k_bits, v_bits, scale):
    k = ops.dequantize(k_codes, k_scale, k_lo, k_bits, -2, jnp.float32)
    v = ops.dequantize(v_codes, v_scale, v_lo, v_bits, -1, jnp.float32)
    out, lse = ops.masked_attention_lse(q[:, :, None, :], k, v, scale, length, offset=None)
    return out[:, :, 0], lse[:, :, 0]
