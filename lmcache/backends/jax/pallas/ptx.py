"""Inline-PTX pieces of the lane-explicit Pallas decode kernel (``decode_lanes``), with emulations.

The asm strings and numpy emulations of ``lmcache.backends.imma_ptx`` (shared with the torch
backend's ``decode_imma``). Compiled, each helper is ``elementwise_inline_asm`` with ``pack=1`` on per-lane
``[32, ...]`` int32 arrays (row ``l`` is what lane ``l`` holds); interpreted, the numpy emulation
runs through ``jax.pure_callback`` on the whole warp's arrays, with the PTX ISA's fragment layouts.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from ... import imma_ptx as _p

_I32 = jnp.int32


def _as_i32(x):
    x = jnp.asarray(x)
    if x.dtype == jnp.float32:
        return jax.lax.bitcast_convert_type(x, _I32)
    return x.astype(_I32)


_LOWERING_FIXED = False


def _fix_multi_result_lowering() -> None:
    """Let ``elementwise_inline_asm`` return several arrays when compiled.

    Pallas' Triton lowering of it (jax 0.10.2; 0.11 the same in substance) returns the op's
    results as one value, so an asm with several outputs fails to lower ("4 outvars do not match
    1 outvals"). This rule returns each result. Idempotent.
    """
    global _LOWERING_FIXED
    if _LOWERING_FIXED:
        return
    from jax._src.interpreters import mlir
    from jax._src.lib.triton import dialect as tt_dialect
    from jax._src.pallas.triton import lowering
    from jax._src.pallas.triton import primitives as triton_primitives

    def ir_type(ctx, aval):
        try:
            return mlir.aval_to_ir_type(aval)
        except TypeError:  # older jax: (mlir context, aval)
            return mlir.aval_to_ir_type(ctx.context.mlir_ctx, aval)

    def rule(ctx, *args, asm, constraints, pack, result_shape_dtypes):
        del result_shape_dtypes
        op = tt_dialect.ElementwiseInlineAsmOp([ir_type(ctx, a) for a in ctx.avals_out], asm, constraints=constraints,
                                               pure=not _reads_lanes(asm), packed_element=pack, args=args)
        return list(op.results)

    lowering.triton_lowering_rules[triton_primitives.elementwise_inline_asm_p] = rule
    _LOWERING_FIXED = True


def _reads_lanes(asm: str) -> bool:
    """Whether ``asm`` depends on which lane runs it (shuffles, warp-wide mma, ``%laneid``).

    Such an asm is lowered as not pure: Triton may clone a pure elementwise op into another
    layout to save a conversion (XLA's Triton did, into a ``[32, 2]`` layout with 16 lanes on
    dimension 0), which is harmless for per-lane arithmetic and wrong for these.
    """
    return any(s in asm for s in ("shfl.", "mma.", "%laneid"))


def _run(asm, constraints: str, args, n_out: int, interpret: bool):
    """``n_out`` int32 arrays of the broadcast shape of ``args`` from one asm per element
    (interpreted: its numpy emulation, ``imma_ptx.EMULATIONS[asm]``)."""
    shape = jnp.broadcast_shapes(*(jnp.shape(a) for a in args))
    args = [jnp.broadcast_to(_as_i32(a), shape) for a in args]
    out_shapes = [jax.ShapeDtypeStruct(shape, _I32) for _ in range(n_out)]
    if interpret:
        emu = _p.EMULATIONS[asm]

        def host(*xs):
            outs = emu(*(np.asarray(x, np.int32) for x in xs))
            return tuple(np.asarray(o, np.int32).reshape(shape) for o in outs)

        return list(jax.pure_callback(host, tuple(out_shapes), *args))
    from jax.experimental.pallas import triton as plgpu

    _fix_multi_result_lowering()
    return list(plgpu.elementwise_inline_asm(asm, args=args, constraints=constraints, pack=1,
                                             result_shape_dtypes=out_shapes))


def mma_keys(a, b, interpret: bool):
    """Four chained ``m16n8k32`` (u8 codes x s8): ``a`` 16 A registers (k-step major), ``b`` 8 B
    registers; int32 arrays of one shape. Returns the D fragment (4 arrays)."""
    return _run(_p.MMA_KEYS, _p.C_KEYS, [*a, *b], 4, interpret)


def mma_values(a, b, c, interpret: bool):
    """``C + A @ B`` (``m16n8k32``, u8 x u8 -> int32): 4 A, 2 B, 4 C arrays -> 4 D arrays."""
    return _run(_p.MMA_VALUES, _p.C_VALUES, [*a, *b, *c], 4, interpret)


def bfly(x, mask: int, interpret: bool):
    """float32 ``x`` plus ``x`` of lane ``l ^ mask``."""
    [y] = _run(_p.BFLY, _p.C_BFLY, [x, jnp.full(jnp.shape(x), mask, _I32)], 1, interpret)
    return x + jax.lax.bitcast_convert_type(y, jnp.float32)


def spread_p(p, interpret: bool):
    """Lane ``(g, t)`` gets ``p[0..3]`` of lane ``4t`` and of lane ``4t + 16``: 8 int32 arrays."""
    return _run(_p.SPREAD, _p.C_SPREAD, list(p), 8, interpret)


def transpose4(a, b, c, d, interpret: bool):
    """4 x 4 byte transpose: output ``j`` holds byte ``j`` of ``a``, ``b``, ``c``, ``d``."""
    return _run(_p.TRANSPOSE, _p.C_TRANSPOSE, [a, b, c, d], 4, interpret)


def gather_byte(x0, x1, x2, x3, sel, interpret: bool):
    """One word of byte ``L`` of ``x0 .. x3``; ``sel`` = ``L | (L + 4) << 4``."""
    [y] = _run(_p.GATHER, _p.C_GATHER, [x0, x1, x2, x3, sel], 1, interpret)
    return y


def key_b(w0, w1, w2, interpret: bool):
    """The key product's 8 B registers from limb words (``torch.triton.ptx.key_b``'s)."""
    return _run(_p.KEY_B, _p.C_KEY_B, [w0, w1, w2], 8, interpret)
