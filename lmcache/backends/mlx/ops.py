"""The pure-MLX path: quantize+pack, unpack+dequantize and decode attention as MLX ops.

It runs wherever MLX does (Linux CPU included) and mirrors the Metal kernels in ``metal/``
step for step, so the kernels are tested against it and against the numpy reference.
Every function computes in float32 and produces the DESIGN.md format bit for bit: the
stored ``scale``/``lo`` are rounded to their storage dtype before the codes are computed,
``mx.round`` rounds half to even, and a stored scale of 0 becomes 1.
"""

from __future__ import annotations

import mlx.core as mx

from ...quant import QuantSpec

_DTYPES = {"float16": mx.float16, "bfloat16": mx.bfloat16, "float32": mx.float32, "uint8": mx.uint8,
           "int32": mx.int32, "int64": mx.int64, "uint32": mx.uint32, "bool": mx.bool_}


def mx_dtype(name: str):
    """The MLX dtype for the dtype name ``name``; ``TypeError`` for one MLX lacks."""
    try:
        return _DTYPES[name]
    except KeyError:
        raise TypeError(f"dtype {name!r} is not available on the mlx backend; it accepts "
                        f"{', '.join(_DTYPES)}") from None


def dtype_name(dtype) -> str:
    """``mx.float16`` -> ``"float16"`` (``mx.bool_`` -> ``"bool"``)."""
    return str(dtype).rsplit(".", 1)[-1].rstrip("_")


def storage_dtype(input_dtype) -> mx.Dtype:
    """Dtype of the stored scale/lo: float32 for float32 input, float16 otherwise."""
    return mx.float32 if input_dtype == mx.float32 else mx.float16


def pack(codes: mx.array, bits: int) -> mx.array:
    """Pack uint8 ``codes`` ``[..., D]`` (values below ``2**bits``) into uint8 ``[..., D * bits // 8]``.

    Element ``per * i + j`` of a byte's run sits at bits ``bits * j`` (little end first).
    """
    if bits == 8:
        return codes
    per = 8 // bits
    c = codes.reshape(*codes.shape[:-1], codes.shape[-1] // per, per)
    out = c[..., 0]
    for j in range(1, per):
        out = out | (c[..., j] << mx.array(bits * j, dtype=mx.uint8))
    return out


def unpack(packed: mx.array, bits: int) -> mx.array:
    """Inverse of ``pack``: uint8 ``[..., P]`` to uint8 codes ``[..., P * 8 // bits]``."""
    if bits == 8:
        return packed
    per = 8 // bits
    shifts = mx.arange(0, 8, bits, dtype=mx.uint8)
    c = (packed[..., None] >> shifts) & mx.array((1 << bits) - 1, dtype=mx.uint8)
    return c.reshape(*packed.shape[:-1], packed.shape[-1] * per)


def _grouped_shape(shape: tuple, spec: QuantSpec) -> tuple[tuple, int]:
    """The shape that puts each group along one axis, and that axis."""
    g = spec.group_size
    if spec.axis == -1:
        return (*shape[:-1], shape[-1] // g, g), -1
    return (*shape[:-2], shape[-2] // g, g, shape[-1]), -2


def quantize(x: mx.array, spec: QuantSpec) -> tuple[mx.array, mx.array, mx.array]:
    """Quantize float ``x`` ``[..., n, D]`` group-wise along ``spec.axis`` and pack the codes.

    Returns ``(codes, scale, lo)``: uint8 ``[..., n, D * bits // 8]``; scale/lo of the storage
    dtype (float16, float32 for float32 input) shaped ``[..., n // g, D]`` (``axis=-2``) or
    ``[..., n, D // g]`` (``axis=-1``).
    """
    sdt = storage_dtype(x.dtype)
    gshape, ax = _grouped_shape(tuple(x.shape), spec)
    xg = x.astype(mx.float32).reshape(gshape)
    lo = xg.min(axis=ax)
    hi = xg.max(axis=ax)
    scale_s = ((hi - lo) / spec.qmax).astype(sdt)
    lo_s = lo.astype(sdt)
    scale_s = mx.where(scale_s == 0, mx.array(1, dtype=sdt), scale_s)
    s = mx.expand_dims(scale_s.astype(mx.float32), ax)
    lo_f = mx.expand_dims(lo_s.astype(mx.float32), ax)
    t = mx.clip(mx.round((xg - lo_f) / s), 0, spec.qmax)
    codes = t.astype(mx.uint8).reshape(x.shape)
    return pack(codes, spec.bits), scale_s, lo_s


def dequantize(codes: mx.array, scale: mx.array, lo: mx.array, spec: QuantSpec, dtype) -> mx.array:
    """Unpack and dequantize: ``code * scale + lo`` in float32, cast to MLX dtype ``dtype``.

    ``codes``: uint8 ``[..., n, P]``; ``scale``/``lo`` as ``quantize`` returns them. Returns
    ``[..., n, P * 8 // bits]``.
    """
    c = unpack(codes, spec.bits).astype(mx.float32)
    gshape, ax = _grouped_shape(tuple(c.shape), spec)
    s = mx.expand_dims(scale.astype(mx.float32), ax)
    lo_f = mx.expand_dims(lo.astype(mx.float32), ax)
    # Two roundings (multiply, then add), as the numpy reference does: no fused multiply-add.
    out = c.reshape(gshape) * s + lo_f
    return out.reshape(c.shape).astype(dtype)


def attention(q: mx.array, k: mx.array, v: mx.array, scale: float) -> mx.array:
    """Causal attention of the newest ``L`` queries in float32 (see ``Backend.attention``).

    ``q``: ``[B, Hq, L, D]``; ``k``/``v``: ``[B, Hkv, T, D]``, ``Hq % Hkv == 0``. Returns
    ``[B, Hq, L, D]`` in ``q``'s dtype.
    """
    b, hq, L, d = q.shape
    hkv, t = k.shape[1], k.shape[2]
    qg = q.astype(mx.float32).reshape(b, hkv, hq // hkv, L, d)
    kf = mx.expand_dims(k.astype(mx.float32), 2)
    vf = mx.expand_dims(v.astype(mx.float32), 2)
    s = (qg @ kf.swapaxes(-1, -2)) * scale  # [B, Hkv, rep, L, T]
    if L > 1:
        visible = mx.arange(t)[None, :] <= mx.arange(t - L, t)[:, None]
        s = mx.where(visible, s, -mx.inf)
    p = mx.softmax(s, axis=-1, precise=True)
    return (p @ vf).reshape(b, hq, L, d).astype(q.dtype)


def decode_partial(q: mx.array, k: mx.array, v: mx.array, scale: float) -> tuple[mx.array, mx.array, mx.array]:
    """Unnormalized single-query attention over one span of tokens (flash-decoding partial).

    ``q``: float32 ``[B, Hq, D]``; ``k``/``v``: ``[B, Hkv, T, D]`` (any float dtype).
    Returns float32 ``(o [B, Hq, D], m [B, Hq], l [B, Hq])`` with ``m`` the largest scaled
    score, ``l = sum(exp(s - m))`` and ``o = sum(exp(s - m) * v)``; ``combine`` merges spans.
    """
    b, hq, d = q.shape
    hkv = k.shape[1]
    qg = q.reshape(b, hkv, hq // hkv, 1, d)
    kf = mx.expand_dims(k.astype(mx.float32), 2)
    vf = mx.expand_dims(v.astype(mx.float32), 2)
    s = (qg @ kf.swapaxes(-1, -2)) * scale  # [B, Hkv, rep, 1, T]
    m = s.max(axis=-1, keepdims=True)
    p = mx.exp(s - m)
    o = (p @ vf).reshape(b, hq, d)
    return o, m.reshape(b, hq), p.sum(axis=-1).reshape(b, hq)


def decode_partial_quantized(q: mx.array, kq: tuple, k_spec: QuantSpec, vq: tuple, v_spec: QuantSpec,
                             scale: float, dtype=mx.float32) -> tuple[mx.array, mx.array, mx.array]:
    """The mirror of the Metal decode kernel: ``decode_partial`` over packed K and V.

    ``kq``/``vq``: ``(codes, scale, lo)`` of keys (grouped along tokens) and values (grouped
    along head_dim). Each value is dequantized in float32 and rounded to the cache's MLX
    dtype ``dtype``, as the unfused path (and ``update``) would return it, then
    ``decode_partial`` accumulates in float32.
    """
    k = dequantize(*kq, k_spec, dtype)
    v = dequantize(*vq, v_spec, dtype)
    return decode_partial(q, k, v, scale)


def combine(parts: list) -> mx.array:
    """Merge ``decode_partial`` results of disjoint spans into normalized float32 ``[B, Hq, D]``."""
    if len(parts) == 1:
        o, _, l_ = parts[0]
        return o / l_[..., None]
    m_all = parts[0][1]
    for _, m, _ in parts[1:]:
        m_all = mx.maximum(m_all, m)
    o_sum = l_sum = None
    for o, m, l_ in parts:
        w = mx.exp(m - m_all)
        o_sum = o * w[..., None] if o_sum is None else o_sum + o * w[..., None]
        l_sum = l_ * w if l_sum is None else l_sum + l_ * w
    return o_sum / l_sum[..., None]
