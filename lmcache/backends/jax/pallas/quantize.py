"""Quantize + pack as one Pallas kernel, with its validating wrapper and jnp reference.

One program quantizes one tile: for keys (``axis=-2``) one group of ``group`` tokens of one
(batch, head) row, every channel; for values (``axis=-1``) up to 64 tokens, every channel
group. The codes of a byte are read as ``8 // bits`` strided column sets ("phases": phase
``j`` holds elements ``per*i + j``), so packing is shifts and ORs with no interleaving.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from .. import ops
from .common import compiler_params, is_pow2, largest_pow2_divisor, round_half_even, true_div

#: Tokens per program for values. 64 rows x 128 channels keeps a tile in registers with 4 warps.
VALUE_TILE = 64


def _stats(lo, hi, qmax, sdt, interpret):
    scale = true_div(hi - lo, jnp.full(hi.shape, qmax, jnp.float32), interpret).astype(sdt)
    scale = jnp.where(scale == 0, jnp.ones(scale.shape, sdt), scale)
    return scale, lo.astype(sdt)


def _codes(x, scale, lo, qmax, interpret):
    t = true_div(x - lo.astype(jnp.float32), scale.astype(jnp.float32), interpret)
    return jnp.clip(round_half_even(t, interpret), 0, qmax).astype(jnp.int32)


def _key_kernel(x_ref, c_ref, s_ref, l_ref, *, bits, interpret):
    # x_ref: [g, D]; c_ref: [g, D // per]; s_ref, l_ref: [D]
    per, qmax = 8 // bits, (1 << bits) - 1
    dp = x_ref.shape[1] // per
    sdt = s_ref.dtype
    packed = None
    for j in range(per):
        cols = pl.ds(j, dp, stride=per)
        x = x_ref[:, cols].astype(jnp.float32)
        scale, lo = _stats(x.min(axis=0), x.max(axis=0), qmax, sdt, interpret)
        s_ref[cols] = scale
        l_ref[cols] = lo
        c = _codes(x, scale[None, :], lo[None, :], qmax, interpret) << (bits * j)
        packed = c if packed is None else packed | c
    c_ref[...] = packed.astype(jnp.uint8)


def _value_kernel(x_ref, c_ref, s_ref, l_ref, *, bits, group, interpret):
    # x_ref: [tile, D]; c_ref: [tile, D // per]; s_ref, l_ref: [tile, D // group]
    per, qmax = 8 // bits, (1 << bits) - 1
    bg = group // per  # bytes per value group
    sdt = s_ref.dtype
    for gg in range(x_ref.shape[1] // group):
        xs = [x_ref[:, pl.ds(gg * group + j, bg, stride=per)].astype(jnp.float32) for j in range(per)]
        lo = functools.reduce(jnp.minimum, [x.min(axis=1) for x in xs])
        hi = functools.reduce(jnp.maximum, [x.max(axis=1) for x in xs])
        scale, lo_s = _stats(lo, hi, qmax, sdt, interpret)
        s_ref[:, gg] = scale
        l_ref[:, gg] = lo_s
        packed = None
        for j, x in enumerate(xs):
            c = _codes(x, scale[:, None], lo_s[:, None], qmax, interpret) << (bits * j)
            packed = c if packed is None else packed | c
        c_ref[:, pl.ds(gg * bg, bg)] = packed.astype(jnp.uint8)


def gpu_supported(shape, bits: int, group: int, axis: int) -> bool:
    """Whether the compiled kernel handles this shape (Triton needs power-of-two tiles)."""
    d = shape[-1]
    per = 8 // bits
    if axis == -2:
        return is_pow2(group) and is_pow2(d // per)
    return is_pow2(group // per) and group % per == 0 and is_pow2(d) and shape[-2] >= 1


def _validate(x, bits, group, axis):
    if not isinstance(x, jax.Array):
        raise TypeError(f"x must be a jax array, got {type(x).__name__}")
    if x.dtype not in (jnp.float16, jnp.bfloat16, jnp.float32):
        raise TypeError(f"x must be float16, bfloat16 or float32, got {x.dtype}")
    if x.ndim < 2:
        raise ValueError(f"x must have at least 2 dimensions [..., n, D], got shape {x.shape}")
    if bits not in (2, 4, 8):
        raise ValueError(f"bits must be 2, 4 or 8, got {bits!r}")
    if axis not in (-1, -2):
        raise ValueError(f"axis must be -1 or -2, got {axis!r}")
    per = 8 // bits
    if not isinstance(group, int) or group < 1 or x.shape[axis] % group:
        raise ValueError(f"group={group!r} must be a positive integer dividing axis {axis} of shape {x.shape}")
    if x.shape[-1] % per or (axis == -1 and group % per):
        raise ValueError(f"{bits}-bit codes pack {per} to a byte: head_dim {x.shape[-1]} (and, along -1, "
                         f"group {group}) must be multiples of {per}")


def quantize(x: jax.Array, bits: int, group: int, axis: int, *, interpret: bool = False):
    """Quantize ``x`` (float ``[..., n, D]``) in groups of ``group`` along ``axis`` with the kernel.

    Returns ``(codes, scale, lo)`` exactly as ``quantize_reference`` (and the numpy
    reference) does: uint8 ``[..., n, D * bits // 8]``; ``scale``/``lo`` float16 (float32 for
    float32 input) of ``x``'s shape with ``axis`` divided by ``group``. ``interpret=True``
    runs the kernel's logic through XLA on any backend; compiled, the shape must satisfy
    ``gpu_supported``. Raises ``TypeError``/``ValueError`` for bad input.
    """
    _validate(x, bits, group, axis)
    if not interpret and not gpu_supported(x.shape, bits, group, axis):
        raise ValueError(f"the compiled quantize kernel needs power-of-two tiles; shape {x.shape} with "
                         f"bits={bits}, group={group}, axis={axis} has none: use quantize_reference")
    return _quantize(x, bits, group, axis, interpret)


@functools.partial(jax.jit, static_argnames=("bits", "group", "axis", "interpret"))
def _quantize(x, bits, group, axis, interpret):
    lead, (n, d) = x.shape[:-2], x.shape[-2:]
    rows = x.reshape((-1, n, d))
    r = rows.shape[0]
    per = 8 // bits
    sdt = ops.storage_dtype(x.dtype)
    params = compiler_params(interpret, num_warps=4, num_stages=1)
    if axis == -2:
        kernel = functools.partial(_key_kernel, bits=bits, interpret=interpret)
        grid = (r, n // group)
        in_specs = [pl.BlockSpec((None, group, d), lambda i, t: (i, t, 0))]
        out_specs = [pl.BlockSpec((None, group, d // per), lambda i, t: (i, t, 0)),
                     pl.BlockSpec((None, None, d), lambda i, t: (i, t, 0)),
                     pl.BlockSpec((None, None, d), lambda i, t: (i, t, 0))]
        sshape = (r, n // group, d)
    else:
        tile = largest_pow2_divisor(n, VALUE_TILE)
        kernel = functools.partial(_value_kernel, bits=bits, group=group, interpret=interpret)
        grid = (r, n // tile)
        in_specs = [pl.BlockSpec((None, tile, d), lambda i, t: (i, t, 0))]
        out_specs = [pl.BlockSpec((None, tile, d // per), lambda i, t: (i, t, 0)),
                     pl.BlockSpec((None, tile, d // group), lambda i, t: (i, t, 0)),
                     pl.BlockSpec((None, tile, d // group), lambda i, t: (i, t, 0))]
        sshape = (r, n, d // group)
    codes, scale, lo = pl.pallas_call(
        kernel, grid=grid, in_specs=in_specs, out_specs=out_specs,
        out_shape=[jax.ShapeDtypeStruct((r, n, d // per), jnp.uint8),
                   jax.ShapeDtypeStruct(sshape, sdt), jax.ShapeDtypeStruct(sshape, sdt)],
        interpret=interpret, compiler_params=params, name="lmcache_quantize",
    )(rows)
    return (codes.reshape(lead + codes.shape[1:]), scale.reshape(lead + sshape[1:]),
            lo.reshape(lead + sshape[1:]))


def quantize_reference(x: jax.Array, bits: int, group: int, axis: int):
    """The jnp path with ``quantize``'s signature and results (``ops.quantize``)."""
    _validate(x, bits, group, axis)
    return ops.quantize(x, bits, group, axis)
