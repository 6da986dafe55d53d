"""The jnp path: quantize, dequantize and attention as plain ``jax.numpy``, jitted per shape.

This is what the JAX backend runs on CPU (and on GPUs where a shape does not suit the
Pallas kernels), and the reference the kernels in ``pallas/`` are tested against. It
reproduces the numpy reference bit for bit: the same float32 arithmetic in the same order
(``(x - lo) / scale`` as a true division, round half to even), the same storage rounding.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

#: Masked scores are set to this instead of -inf, so that a row with nothing to attend to
#: gives zeros rather than NaN (exp(-1e30 - m) underflows to 0 for any real m).
NEG = -1e30


def storage_dtype(dtype) -> jnp.dtype:
    """The dtype of the stored scale and offset for input ``dtype`` (float16; float32 for float32)."""
    return jnp.dtype(jnp.float32) if jnp.dtype(dtype) in (jnp.float32, jnp.float64) else jnp.dtype(jnp.float16)


def pack(codes: jax.Array, bits: int) -> jax.Array:
    """Pack uint8 ``codes`` ``[..., D]`` (values below ``2**bits``) into uint8 ``[..., D * bits // 8]``.

    Element ``per * i + j`` of the last axis goes to bits ``bits*j .. bits*j + bits - 1`` of
    byte ``i`` (``per = 8 // bits``), as in ``lmcache.backends.numpy.pack``.
    """
    if bits == 8:
        return codes
    per = 8 // bits
    c = codes.reshape(codes.shape[:-1] + (codes.shape[-1] // per, per)).astype(jnp.uint8)
    out = c[..., 0]
    for j in range(1, per):
        out = out | (c[..., j] << jnp.uint8(bits * j))
    return out


def unpack(packed: jax.Array, bits: int) -> jax.Array:
    """Inverse of ``pack``: uint8 ``[..., P]`` to uint8 codes ``[..., P * 8 // bits]``."""
    if bits == 8:
        return packed
    per = 8 // bits
    shifts = jnp.arange(per, dtype=jnp.uint8) * jnp.uint8(bits)
    c = (packed[..., None] >> shifts) & jnp.uint8((1 << bits) - 1)
    return c.reshape(packed.shape[:-1] + (packed.shape[-1] * per,))


def _grouped(x: jax.Array, group: int, axis: int) -> tuple[jax.Array, int]:
    if axis == -1:
        return x.reshape(x.shape[:-1] + (x.shape[-1] // group, group)), -1
    return x.reshape(x.shape[:-2] + (x.shape[-2] // group, group, x.shape[-1])), -2


def _true_div(a: jax.Array, b: jax.Array) -> jax.Array:
    """``a / b`` correctly rounded, as numpy divides.

    XLA's simplifier rewrites a division by a constant or a broadcast into a multiplication
    by the reciprocal, which rounds differently (measured: about 60% of float32 quotients by
    15 differ in the last bit, enough to flip codes at an exact .5). A divisor of ``a``'s
    full shape behind an optimization barrier is neither, so the true division stays.
    """
    a, b = jax.lax.optimization_barrier((a, jnp.broadcast_to(b, a.shape)))
    return a / b


@functools.partial(jax.jit, static_argnames=("bits", "group", "axis"))
def quantize(x: jax.Array, bits: int, group: int, axis: int):
    """Quantize ``x`` (float ``[..., n, D]``) in groups of ``group`` along ``axis`` (-1 or -2).

    Returns ``(codes, scale, lo)``: uint8 ``[..., n, D * bits // 8]``; ``scale``/``lo`` of
    ``x``'s shape with ``axis`` divided by ``group``, float16 (float32 for float32 input).
    """
    sdt = storage_dtype(x.dtype)
    qmax = (1 << bits) - 1
    xg, ax = _grouped(x.astype(jnp.float32), group, axis)
    lo = xg.min(axis=ax)
    hi = xg.max(axis=ax)
    scale_s = _true_div(hi - lo, jnp.full(hi.shape, qmax, jnp.float32)).astype(sdt)
    lo_s = lo.astype(sdt)
    scale_s = jnp.where(scale_s == 0, jnp.ones((), sdt), scale_s)
    s = jnp.broadcast_to(jnp.expand_dims(scale_s.astype(jnp.float32), ax), xg.shape)
    lf = jnp.expand_dims(lo_s.astype(jnp.float32), ax)
    t = jnp.round(_true_div(xg - lf, s))  # jnp.round rounds half to even, like np.rint
    codes = jnp.clip(t, 0, qmax).astype(jnp.uint8).reshape(x.shape)
    return pack(codes, bits), scale_s, lo_s


@functools.partial(jax.jit, static_argnames=("bits", "axis", "dtype"))
def dequantize(codes: jax.Array, scale: jax.Array, lo: jax.Array, bits: int, axis: int, dtype) -> jax.Array:
    """``code * scale + lo`` in float32, cast to ``dtype``: the inverse of ``quantize``.

    ``codes``: uint8 ``[..., n, P]``; ``scale``/``lo`` as ``quantize`` returns them; the group
    size is read off the shapes. Returns ``[..., n, P * 8 // bits]`` of ``dtype``.
    """
    c = unpack(codes, bits).astype(jnp.float32)
    group = c.shape[-1] // scale.shape[-1] if axis == -1 else c.shape[-2] // scale.shape[-2]
    cg, ax = _grouped(c, group, axis)
    out = cg * jnp.expand_dims(scale.astype(jnp.float32), ax) + jnp.expand_dims(lo.astype(jnp.float32), ax)
    return out.reshape(c.shape).astype(dtype)


def _scores(q, k, scale):
    b, hq, L, d = q.shape
    hkv = k.shape[1]
    qg = q.astype(jnp.float32).reshape(b, hkv, hq // hkv, L, d)
    return jnp.einsum("bhrld,bhtd->bhrlt", qg, k.astype(jnp.float32),
                      precision=jax.lax.Precision.HIGHEST) * jnp.float32(scale)


@functools.partial(jax.jit, static_argnames=("scale",))
def attention(q: jax.Array, k: jax.Array, v: jax.Array, scale: float) -> jax.Array:
    """Causal attention of the newest ``L`` tokens, float32 accumulation (the Backend contract).

    ``q``: ``[B, Hq, L, D]``; ``k``/``v``: ``[B, Hkv, T, D]``, ``Hq % Hkv == 0``; query ``i``
    sits at position ``T - L + i``. Returns ``[B, Hq, L, D]`` in ``q``'s dtype.
    """
    return attention_scores(q, k, v, scale)[0]  # under jit the unused scores are never computed


@functools.partial(jax.jit, static_argnames=("scale", "last"))
def attention_scores(q: jax.Array, k: jax.Array, v: jax.Array, scale: float, last: int | None = None):
    """``attention`` plus the attention mass per key (the Backend contract's ``attention_scores``).

    Returns ``(out, scores)``: ``out`` as ``attention``; ``scores`` float32 ``[B, Hkv, T]``,
    the probabilities summed over each KV head's query heads and the last ``last`` queries
    (all when ``None``).
    """
    b, hq, L, d = q.shape
    t = k.shape[2]
    s = _scores(q, k, scale)
    visible = jnp.arange(t)[None, :] <= jnp.arange(t - L, t)[:, None]
    p = jax.nn.softmax(jnp.where(visible, s, -jnp.inf), axis=-1)
    out = jnp.einsum("bhrlt,bhtd->bhrld", p, v.astype(jnp.float32), precision=jax.lax.Precision.HIGHEST)
    n = L if last is None else min(last, L)
    return out.reshape(b, hq, L, d).astype(q.dtype), p[:, :, :, L - n:].sum(axis=(2, 3))


@functools.partial(jax.jit, static_argnames=("scale",))
def masked_attention_lse(q: jax.Array, k: jax.Array, v: jax.Array, scale: float, length, offset=0):
    """Attention of ``q`` over tokens ``[0, length)`` of ``k``/``v``, with its log-sum-exp.

    ``q``: ``[B, Hq, L, D]``; ``k``/``v``: ``[B, Hkv, T, D]``; ``length``: a (traced) scalar.
    Query ``i`` sits at position ``offset + i`` (a traced scalar; ``None`` means no causal
    mask: every valid token is visible) and sees tokens up to it. Returns ``(out, lse)``:
    float32 ``[B, Hq, L, D]`` normalized over the visible tokens, and float32
    ``[B, Hq, L]``, ``-inf`` where nothing is visible (``out`` is 0 there).
    """
    b, hq, L, d = q.shape
    t = k.shape[2]
    s = _scores(q, k, scale)  # [B, Hkv, rep, L, T]
    tok = jnp.arange(t)
    visible = (tok < length)[None, :]
    if offset is not None:
        visible = visible & (tok[None, :] <= (offset + jnp.arange(L))[:, None])
    s = jnp.where(visible, s, NEG)
    m = s.max(axis=-1, keepdims=True)
    p = jnp.where(visible, jnp.exp(s - m), 0.0)
    den = p.sum(axis=-1)
    o = jnp.einsum("bhrlt,bhtd->bhrld", p, v.astype(jnp.float32), precision=jax.lax.Precision.HIGHEST)
    safe = jnp.where(den > 0, den, 1.0)
    o = o / safe[..., None]
    lse = jnp.where(den > 0, m[..., 0] + jnp.log(safe), -jnp.inf)
    return o.reshape(b, hq, L, d), lse.reshape(b, hq, L)


@jax.jit
def combine(parts):
    """Merge attention results over disjoint token sets: ``[(out, lse), ...]`` -> ``out``.

    Each ``out`` is float32 ``[..., D]`` normalized over its own tokens and ``lse`` its
    log-sum-exp ``[...]`` (``-inf`` for an empty set). Returns float32 ``[..., D]``.
    """
    lses = jnp.stack([lse for _, lse in parts])
    m = lses.max(axis=0)
    m = jnp.where(jnp.isfinite(m), m, 0.0)
    w = jnp.exp(lses - m)  # 0 for empty parts
    tot = w.sum(axis=0)
    out = sum(o * wi[..., None] for (o, _), wi in zip(parts, w))
    return out / jnp.where(tot > 0, tot, 1.0)[..., None]


def hadamard(d: int) -> jax.Array:
    """The normalized Sylvester-Hadamard matrix ``[d, d]`` float32 (see ``lmcache.quant.hadamard``)."""
    from ...quant import hadamard as _h

    return jnp.asarray(np.asarray(_h(d)))


def rotate(x: jax.Array) -> jax.Array:
    """``x @ H`` over the last axis, in float32, cast back to ``x``'s dtype (self-inverse)."""
    h = hadamard(x.shape[-1])
    return jnp.matmul(x.astype(jnp.float32), h, precision=jax.lax.Precision.HIGHEST).astype(x.dtype)
