"""Unpack + dequantize as one Pallas kernel, with its validating wrapper and jnp reference.

The tiles mirror ``quantize``: keys one group of tokens per program, values up to 64 tokens.
Each phase ``j`` of a byte (elements ``per*i + j``) is written through a strided store, so
unpacking needs shifts and masks only.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from .. import ops
from .common import check_codes, compiler_params, is_pow2, largest_pow2_divisor

VALUE_TILE = 64


def _key_kernel(c_ref, s_ref, l_ref, o_ref, *, bits):
    # c_ref: [g, Dp]; s_ref, l_ref: [D]; o_ref: [g, D]
    per, mask = 8 // bits, (1 << bits) - 1
    dp = c_ref.shape[1]
    c = c_ref[...].astype(jnp.int32)
    for j in range(per):
        cols = pl.ds(j, dp, stride=per)
        cj = ((c >> (bits * j)) & mask).astype(jnp.float32)
        s = s_ref[cols].astype(jnp.float32)
        lo = l_ref[cols].astype(jnp.float32)
        o_ref[:, cols] = (cj * s[None, :] + lo[None, :]).astype(o_ref.dtype)


def _value_kernel(c_ref, s_ref, l_ref, o_ref, *, bits, group):
    # c_ref: [tile, Dp]; s_ref, l_ref: [tile, D // group]; o_ref: [tile, D]
    per, mask = 8 // bits, (1 << bits) - 1
    bg = group // per
    for gg in range(o_ref.shape[1] // group):
        c = c_ref[:, pl.ds(gg * bg, bg)].astype(jnp.int32)
        s = s_ref[:, gg].astype(jnp.float32)[:, None]
        lo = l_ref[:, gg].astype(jnp.float32)[:, None]
        for j in range(per):
            cj = ((c >> (bits * j)) & mask).astype(jnp.float32)
            o_ref[:, pl.ds(gg * group + j, bg, stride=per)] = (cj * s + lo).astype(o_ref.dtype)


def _validate(codes, scale, lo, bits, axis, dtype):
    check_codes("codes", codes, bits)
    if axis not in (-1, -2):
        raise ValueError(f"axis must be -1 or -2, got {axis!r}")
    if codes.ndim < 2 or scale.shape != lo.shape or scale.ndim != codes.ndim:
        raise ValueError(f"codes [..., n, P] and scale/lo of equal shape and rank are needed, got {codes.shape}, "
                         f"{scale.shape}, {lo.shape}")
    d = codes.shape[-1] * (8 // bits)
    n = codes.shape[-2]
    if axis == -2 and (scale.shape[-1] != d or scale.shape[-2] < 1 or n % scale.shape[-2]):
        raise ValueError(f"key scales must be [..., n // group, {d}] for codes {codes.shape}, got {scale.shape}")
    if axis == -1 and (scale.shape[-2] != n or scale.shape[-1] < 1 or d % scale.shape[-1]):
        raise ValueError(f"value scales must be [..., {n}, D // group] for codes {codes.shape}, got {scale.shape}")
    if jnp.dtype(dtype) not in (jnp.float16, jnp.bfloat16, jnp.float32):
        raise TypeError(f"dtype must be float16, bfloat16 or float32, got {dtype}")


def gpu_supported(codes_shape, scale_shape, bits: int, axis: int) -> bool:
    """Whether the compiled kernel handles these shapes (Triton needs power-of-two tiles)."""
    per = 8 // bits
    d = codes_shape[-1] * per
    if axis == -2:
        return is_pow2(codes_shape[-2] // scale_shape[-2]) and is_pow2(codes_shape[-1])
    group = d // scale_shape[-1]
    return group % per == 0 and is_pow2(group // per)


def dequantize(codes, scale, lo, bits: int, axis: int, dtype, *, interpret: bool = False) -> jax.Array:
    """``code * scale + lo`` in float32, cast to ``dtype``, with the kernel.

    ``codes``: uint8 ``[..., n, P]``; ``scale``/``lo``: ``[..., n // group, D]`` for keys
    (``axis=-2``), ``[..., n, D // group]`` for values (``axis=-1``). Returns
    ``[..., n, P * 8 // bits]`` of ``dtype``, equal to ``dequantize_reference`` up to the
    last bit of a fused multiply-add.
    """
    _validate(codes, scale, lo, bits, axis, dtype)
    if not interpret and not gpu_supported(codes.shape, scale.shape, bits, axis):
        raise ValueError(f"the compiled dequantize kernel needs power-of-two tiles; codes {codes.shape} with scales "
                         f"{scale.shape} have none: use dequantize_reference")
    return _dequantize(codes, scale, lo, bits, axis, jnp.dtype(dtype), interpret)


@functools.partial(jax.jit, static_argnames=("bits", "axis", "dtype", "interpret"))
def _dequantize(codes, scale, lo, bits, axis, dtype, interpret):
    lead, (n, p) = codes.shape[:-2], codes.shape[-2:]
    per = 8 // bits
    d = p * per
    c = codes.reshape((-1, n, p))
    s = scale.reshape((-1,) + scale.shape[-2:])
    lo_ = lo.reshape((-1,) + lo.shape[-2:])
    r = c.shape[0]
    params = compiler_params(interpret, num_warps=4, num_stages=1)
    if axis == -2:
        g = n // s.shape[1]
        kernel = functools.partial(_key_kernel, bits=bits)
        grid = (r, n // g)
        in_specs = [pl.BlockSpec((None, g, p), lambda i, t: (i, t, 0)),
                    pl.BlockSpec((None, None, d), lambda i, t: (i, t, 0)),
                    pl.BlockSpec((None, None, d), lambda i, t: (i, t, 0))]
        out_spec = pl.BlockSpec((None, g, d), lambda i, t: (i, t, 0))
    else:
        group = d // s.shape[2]
        tile = largest_pow2_divisor(n, VALUE_TILE)
        kernel = functools.partial(_value_kernel, bits=bits, group=group)
        grid = (r, n // tile)
        in_specs = [pl.BlockSpec((None, tile, p), lambda i, t: (i, t, 0)),
                    pl.BlockSpec((None, tile, s.shape[2]), lambda i, t: (i, t, 0)),
                    pl.BlockSpec((None, tile, s.shape[2]), lambda i, t: (i, t, 0))]
        out_spec = pl.BlockSpec((None, tile, d), lambda i, t: (i, t, 0))
    out = pl.pallas_call(kernel, grid=grid, in_specs=in_specs, out_specs=out_spec,
                         out_shape=jax.ShapeDtypeStruct((r, n, d), dtype), interpret=interpret,
                         compiler_params=params, name="lmcache_dequantize")(c, s, lo_)
    return out.reshape(lead + (n, d))


def dequantize_reference(codes, scale, lo, bits: int, axis: int, dtype) -> jax.Array:
    """The jnp path with ``dequantize``'s signature and results (``ops.dequantize``)."""
    _validate(codes, scale, lo, bits, axis, dtype)
    return ops.dequantize(codes, scale, lo, bits, axis, jnp.dtype(dtype))
