"""A jit-friendly compressed KV cache for JAX models: a pytree state and pure functions.

``init_state`` makes a ``KVState`` of fixed capacity for one layer; ``update`` appends tokens
and ``attend`` runs attention over them. Both are pure: they take a state and return values
(and a new state), with the number of tokens held as a traced int32 scalar and masks where
the eager ``lmcache.Cache`` would use dynamic shapes. So ``jax.jit`` compiles a decode step
once per shape (once for the prompt length, once for single tokens), however many steps run.

The layout follows ``lmcache.Cache`` exactly (DESIGN.md's format): keys quantized per
channel over ``group_size`` tokens, values per token over ``min(group_size, head_dim)``
channels, the newest tokens (at least ``residual``) in full precision, flushed a key group
at a time, so the tokens this state quantizes and their codes are the Cache's.

Under ``jax.jit``, donate the state (``donate_argnums``) so updates happen in place.
Capacity is a promise: eagerly, ``update`` raises ``ValueError`` when it would be exceeded;
under ``jit`` (which cannot raise on a traced value) tokens beyond it are not stored.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp

from . import ops

__all__ = ["KVState", "attend", "init_state", "update"]


@dataclasses.dataclass(frozen=True)
class KVState:
    """One layer's compressed KV: a pytree of fixed-shape arrays plus static settings.

    ``k_codes``/``v_codes``: uint8 ``[B, H, C, D*bits/8]`` (``C``: the capacity rounded up
    to a whole key group); ``k_scale``/``k_lo``: ``[B, H, C/g, D]``; ``v_scale``/``v_lo``:
    ``[B, H, C, D/gv]`` (float16, or float32 for a float32 cache); ``k_res``/``v_res``:
    ``[B, H, residual + g - 1, D]`` in the cache dtype; ``n_quant``/``n_res``: int32 scalars,
    the tokens held quantized and in full precision. ``bits``, ``group_size``, ``residual``
    are static (part of the tree structure, so a change recompiles).
    """

    k_codes: jax.Array
    k_scale: jax.Array
    k_lo: jax.Array
    v_codes: jax.Array
    v_scale: jax.Array
    v_lo: jax.Array
    k_res: jax.Array
    v_res: jax.Array
    n_quant: jax.Array
    n_res: jax.Array
    bits: int = dataclasses.field(metadata=dict(static=True), default=4)
    group_size: int = dataclasses.field(metadata=dict(static=True), default=64)
    residual: int = dataclasses.field(metadata=dict(static=True), default=128)

    @property
    def length(self) -> jax.Array:
        """Tokens held (int32 scalar)."""
        return self.n_quant + self.n_res

    @property
    def capacity(self) -> int:
        """Most tokens the state can hold."""
        return self.k_codes.shape[2] + self.residual

    @property
    def dtype(self):
        """The cache's dtype (of the keys and values ``update`` takes and returns)."""
        return self.k_res.dtype

    @property
    def value_group(self) -> int:
        """Channels per value group: ``min(group_size, head_dim)``."""
        return min(self.group_size, self.k_res.shape[3])

    @property
    def nbytes(self) -> int:
        """Bytes of the fixed-size buffers (what the state occupies, whatever it holds)."""
        return sum(int(x.size) * x.dtype.itemsize for x in jax.tree_util.tree_leaves(self))


jax.tree_util.register_dataclass(
    KVState,
    data_fields=["k_codes", "k_scale", "k_lo", "v_codes", "v_scale", "v_lo", "k_res", "v_res", "n_quant", "n_res"],
    meta_fields=["bits", "group_size", "residual"])


def _positive(name, value, minimum=1):
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")


def init_state(batch: int, kv_heads: int, head_dim: int, capacity: int, bits: int = 4, group_size: int = 64,
               residual: int = 128, dtype=jnp.bfloat16) -> KVState:
    """An empty ``KVState`` for up to ``capacity`` tokens of one layer.

    ``dtype``: float16, bfloat16 or float32, the dtype of the keys and values to come.
    ``bits``: 2, 4 or 8. ``group_size``: tokens per key group (values group over
    ``min(group_size, head_dim)`` channels, which must divide ``head_dim``).
    """
    for name, value in (("batch", batch), ("kv_heads", kv_heads), ("head_dim", head_dim), ("capacity", capacity),
                        ("group_size", group_size)):
        _positive(name, value)
    _positive("residual", residual, 0)
    if bits not in (2, 4, 8) or isinstance(bits, bool):
        raise ValueError(f"bits must be 2, 4 or 8, got {bits!r}")
    dtype = jnp.dtype(dtype)
    if dtype not in (jnp.float16, jnp.bfloat16, jnp.float32):
        raise TypeError(f"dtype must be float16, bfloat16 or float32, got {dtype}")
    per = 8 // bits
    gv = min(group_size, head_dim)
    if head_dim % per or head_dim % gv or gv % per:
        raise ValueError(f"head_dim {head_dim} must be a multiple of {per} ({bits}-bit codes) and of the value "
                         f"group min(group_size, head_dim) = {gv}")
    c = math.ceil(max(capacity - residual, 0) / group_size) * group_size
    sdt = ops.storage_dtype(dtype)
    b, h, d = batch, kv_heads, head_dim
    z = jnp.zeros
    return KVState(
        z((b, h, c, d // per), jnp.uint8), z((b, h, c // group_size, d), sdt), z((b, h, c // group_size, d), sdt),
        z((b, h, c, d // per), jnp.uint8), z((b, h, c, d // gv), sdt), z((b, h, c, d // gv), sdt),
        z((b, h, residual + group_size - 1, d), dtype), z((b, h, residual + group_size - 1, d), dtype),
        jnp.zeros((), jnp.int32), jnp.zeros((), jnp.int32), bits, group_size, residual)


def _check_state(state):
    if not isinstance(state, KVState):
        raise TypeError(f"state must be a KVState from init_state, got {type(state).__name__}")


def _scatter_tokens(buf, values, start, count, axis=2):
    """``buf`` with ``values``' first ``count`` entries (along ``axis``) written at ``start``.

    Indices past ``count`` point outside ``buf`` and are dropped, so the shapes stay static.
    """
    n = values.shape[axis]
    i = jnp.arange(n, dtype=jnp.int32)
    idx = jnp.where(i < count, start + i, buf.shape[axis])
    index = (slice(None),) * axis + (idx,)
    return buf.at[index].set(values, mode="drop")


def update(state: KVState, keys: jax.Array, values: jax.Array):
    """Append ``keys``/``values`` (``[B, H, n, D]``, the state's dtype) to ``state``.

    Returns ``(new_state, k, v)``: ``k``/``v`` are ``[B, H, capacity, D]`` in the state's
    dtype, the whole layer dequantized, valid for the first ``new_state.length`` tokens
    and zero after (under ``jit``, unused results cost nothing). Pure and shape-stable: one
    compilation per ``n``.
    """
    _check_state(state)
    b, h, r_buf, d = state.k_res.shape
    for name, x in (("keys", keys), ("values", values)):
        if getattr(x, "ndim", None) != 4 or x.shape[:2] != (b, h) or x.shape[3] != d:
            raise ValueError(f"{name} must be [{b}, {h}, new_tokens, {d}] like the state, got "
                             f"{getattr(x, 'shape', type(x).__name__)}")
        if x.dtype != state.dtype:
            raise TypeError(f"{name} must be {state.dtype} like the state, got {x.dtype}")
    if keys.shape != values.shape:
        raise ValueError(f"keys and values must have the same shape, got {keys.shape} and {values.shape}")
    n = keys.shape[2]
    g, res = state.group_size, state.residual
    try:
        held = int(state.n_quant) + int(state.n_res)
    except (jax.errors.ConcretizationTypeError, jax.errors.TracerIntegerConversionError):
        # traced under jit: nothing to check eagerly
        held = None
    if held is not None:
        if held + n > state.capacity:
            raise ValueError(f"update of {n} tokens overflows the state: it holds {held} of its capacity "
                             f"{state.capacity}")
    groups = (g - 1 + n) // g  # the most key groups one update can flush
    pad = jnp.zeros((b, h, n + g, d), state.dtype)

    def joined(res, new):
        return jax.lax.dynamic_update_slice_in_dim(jnp.concatenate([res, pad], axis=2), new, state.n_res, axis=2)

    kc, vc = joined(state.k_res, keys), joined(state.v_res, values)
    total = state.n_res + n
    n_flush = jnp.where(total >= res + g, (total - res) // g * g, 0).astype(jnp.int32)
    kq = ops.quantize(kc[:, :, :groups * g], state.bits, g, -2)
    vq = ops.quantize(vc[:, :, :groups * g], state.bits, state.value_group, -1)
    nq = state.n_quant
    new = dataclasses.replace(
        state,
        k_codes=_scatter_tokens(state.k_codes, kq[0], nq, n_flush),
        k_scale=_scatter_tokens(state.k_scale, kq[1], nq // g, n_flush // g),
        k_lo=_scatter_tokens(state.k_lo, kq[2], nq // g, n_flush // g),
        v_codes=_scatter_tokens(state.v_codes, vq[0], nq, n_flush),
        v_scale=_scatter_tokens(state.v_scale, vq[1], nq, n_flush),
        v_lo=_scatter_tokens(state.v_lo, vq[2], nq, n_flush),
        k_res=jax.lax.dynamic_slice_in_dim(kc, n_flush, r_buf, axis=2),
        v_res=jax.lax.dynamic_slice_in_dim(vc, n_flush, r_buf, axis=2),
        n_quant=jnp.minimum(nq + n_flush, state.k_codes.shape[2]).astype(jnp.int32),
        n_res=(total - n_flush).astype(jnp.int32),
    )
    k, v = _whole(new)
    return new, k, v


def _whole(state: KVState):
    """Dequantized K and V ``[B, H, capacity, D]``: tokens ``[0, length)`` valid, zeros after."""
    dt = state.dtype
    k = ops.dequantize(state.k_codes, state.k_scale, state.k_lo, state.bits, -2, dt)
    v = ops.dequantize(state.v_codes, state.v_scale, state.v_lo, state.bits, -1, dt)
    zeros = jnp.zeros(state.k_res.shape[:2] + (state.residual, state.k_res.shape[3]), dt)
    k = jnp.concatenate([k, zeros], axis=2)
    v = jnp.concatenate([v, zeros], axis=2)
    # The residual buffer is longer than `residual`; its live part always fits after n_quant.
    kr, vr = state.k_res[:, :, :state.residual], state.v_res[:, :, :state.residual]
    extra = state.k_res.shape[2] - state.residual
    if extra:
        k = jnp.concatenate([k, jnp.zeros(k.shape[:2] + (extra, k.shape[3]), dt)], axis=2)
        v = jnp.concatenate([v, jnp.zeros(v.shape[:2] + (extra, v.shape[3]), dt)], axis=2)
        kr, vr = state.k_res, state.v_res
    k = jax.lax.dynamic_update_slice_in_dim(k, kr, state.n_quant, axis=2)
    v = jax.lax.dynamic_update_slice_in_dim(v, vr, state.n_quant, axis=2)
    keep = (jnp.arange(k.shape[2]) < state.length)[:, None]
    k = jnp.where(keep, k, jnp.zeros((), dt))[:, :, :state.capacity]
    v = jnp.where(keep, v, jnp.zeros((), dt))[:, :, :state.capacity]
    return k, v


def _kernel(state: KVState, use_kernel):
    """The decode function for ``state``'s quantized part: a compiled Pallas kernel's
    (``decode_int8.fused_kernel``) when ``use_kernel`` says so (``None``: on a GPU, where one
    applies), else the jnp reference."""
    from .pallas import decode_attention as kda
    from .pallas import decode_int8

    d, t = state.k_res.shape[3], state.k_codes.shape[2]
    kern = decode_int8.fused_kernel(d, state.bits, state.bits, state.group_size, state.value_group, t) if t else None
    if use_kernel is None:
        use_kernel = jax.default_backend() == "gpu" and kern is not None
    if not use_kernel:
        return kda.decode_attention_reference
    return (kern or kda).decode_attention


def attend(state: KVState, q: jax.Array, scale: float | None = None, *, use_kernel: bool | None = None) -> jax.Array:
    """Attention of the newest ``L`` tokens' queries ``q`` (``[B, Hq, L, D]``) over ``state``.

    ``Hq`` must be a multiple of the state's KV heads (query head ``i`` reads KV head
    ``i // (Hq // H)``); query ``i`` sits at position ``length - L + i`` and sees every
    token up to it. ``scale`` defaults to ``1/sqrt(D)``. For ``L == 1`` the quantized part
    is read in place (the Pallas kernel on a GPU: ``use_kernel=None`` decides by platform),
    and merged with the residual by log-sum-exp. Returns ``[B, Hq, L, D]`` in ``q``'s dtype.
    """
    _check_state(state)
    b, h, _, d = state.k_res.shape
    if getattr(q, "ndim", None) != 4 or q.shape[0] != b or q.shape[3] != d or q.shape[1] % h:
        raise ValueError(f"q must be [{b}, a multiple of {h}, q_len, {d}], got {getattr(q, 'shape', q)}")
    if scale is None:
        scale = 1.0 / math.sqrt(d)
    scale = float(scale)
    if q.shape[2] == 1:
        fn = _kernel(state, use_kernel)
        parts = []
        if state.k_codes.shape[2]:
            parts.append(fn(q[:, :, 0], state.k_codes, state.k_scale, state.k_lo, state.v_codes, state.v_scale,
                            state.v_lo, k_bits=state.bits, v_bits=state.bits, scale=scale, length=state.n_quant))
        o, lse = ops.masked_attention_lse(q, state.k_res, state.v_res, scale, state.n_res, offset=None)
        parts.append((o[:, :, 0], lse[:, :, 0]))
        return ops.combine(parts)[:, :, None].astype(q.dtype)
    k, v = _whole(state)
    length = state.length
    out, _ = ops.masked_attention_lse(q, k, v, scale, length, offset=length - q.shape[2])
    return out.astype(q.dtype)
