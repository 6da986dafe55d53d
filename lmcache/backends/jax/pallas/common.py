"""Helpers shared by the Pallas kernels: exact arithmetic on both paths, shape rules, launch options."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from ..ops import _true_div

# 1.5 * 2**23: adding and subtracting it rounds a float32 of magnitude below 2**22 to the
# nearest integer, ties to even (the hardware's default rounding), with no round primitive
# (Pallas' Triton lowering has none). Larger magnitudes end up clipped to 0 or qmax anyway.
_MAGIC = 12582912.0


def true_div(a: jax.Array, b: jax.Array, interpret: bool) -> jax.Array:
    """``a / b`` correctly rounded, inside a kernel; ``b`` broadcasts to ``a``'s shape.

    Compiled, Triton turns a float32 ``/`` into ``div.full.f32`` (approximate, 2 ulp), so
    the quotient is computed by ``div.rn.f32`` through inline PTX. Interpreted, the body runs
    through XLA, whose simplifier would turn a division by a broadcast into a multiplication
    by the reciprocal: ``ops._true_div`` prevents that.
    """
    b = jnp.broadcast_to(b, a.shape)
    if interpret:
        return _true_div(a, b)
    from jax.experimental.pallas import triton as plgpu

    [q] = plgpu.elementwise_inline_asm("div.rn.f32 $0, $1, $2;", args=[a, b], constraints="=f,f,f", pack=1,
                                       result_shape_dtypes=[jax.ShapeDtypeStruct(a.shape, jnp.float32)])
    return q


def round_half_even(t: jax.Array, interpret: bool) -> jax.Array:
    """Round float32 ``t`` to the nearest integer, ties to even (``np.rint``)."""
    if interpret:
        return jnp.round(t)
    return (t + _MAGIC) - _MAGIC


def is_pow2(n: int) -> bool:
    """Whether the int ``n`` is a positive power of two (Triton's tile sizes must be)."""
    return n >= 1 and not n & (n - 1)


def largest_pow2_divisor(n: int, cap: int) -> int:
    """The largest power of two that divides ``n`` and is at most ``cap``."""
    p = 1
    while p * 2 <= cap and n % (p * 2) == 0:
        p *= 2
    return p


def compiler_params(interpret: bool, num_warps: int = 4, num_stages: int = 2):
    """Triton launch options for a compiled kernel (``None`` when interpreted)."""
    if interpret:
        return None
    from jax.experimental.pallas import triton as plgpu

    return plgpu.CompilerParams(num_warps=num_warps, num_stages=num_stages)


def check_codes(name: str, codes, bits: int) -> None:
    """Check packed ``codes`` (the argument called ``name``) and their ``bits``.

    Raises ``TypeError`` unless ``codes`` is uint8, ``ValueError`` unless ``bits`` is 2, 4 or 8.
    """
    if codes.dtype != jnp.uint8:
        raise TypeError(f"{name} must be uint8 packed codes, got dtype {codes.dtype}")
    if bits not in (2, 4, 8):
        raise ValueError(f"bits must be 2, 4 or 8, got {bits!r}")
