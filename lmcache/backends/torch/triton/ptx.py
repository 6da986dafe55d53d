"""Inline-PTX pieces of the integer matrix-unit kernel (``decode_imma``), with numpy emulations.

Each helper works on per-lane tensors: a ``[32, ...]`` tensor of one warp whose row ``l`` is
what lane ``l`` holds (the kernels' tensors all keep dimension 0 on the lanes). Every operand of
a fragment is a tensor of its own and the asm runs once per element (``pack=1``), because the
order of a thread's registers within a tensor is Triton's choice (it follows permutes).

Under ``TRITON_INTERPRET=1`` there is no PTX: ``emulate_in_interpreter`` teaches the interpreter
each asm string through its numpy emulation (the matrix-unit ones, with the fragment layouts, in
``lmcache.backends.imma_ptx``, shared with the Pallas kernel), so the kernel runs (and is tested)
on CPU with the same lane arithmetic as on the GPU. The shared-memory stages (sm_90: a static
``.shared`` ring, mbarriers, TMA bulk copies, ``ld.shared``) are emulated by one host array that
each program makes anew, copies done at once.
"""

from __future__ import annotations

import ctypes

import numpy as np
import triton
import triton.language as tl

from ... import imma_ptx as _imma

_MMA_KEYS = tl.constexpr(_imma.MMA_KEYS)
_MMA_VALUES = tl.constexpr(_imma.MMA_VALUES)
_BFLY = tl.constexpr(_imma.BFLY)
_SPREAD = tl.constexpr(_imma.SPREAD)
_TRANSPOSE = tl.constexpr(_imma.TRANSPOSE)
_PRMT = tl.constexpr(_imma.PRMT)
_GATHER = tl.constexpr(_imma.GATHER)
_KEY_B = tl.constexpr(_imma.KEY_B)


def _on_lanes(*lines: str) -> tl.constexpr:
    """An asm string that runs ``lines`` (those marked ``@p`` only where operand ``$1`` is nonzero)
    and returns a dummy ``$0``."""
    return tl.constexpr("{ .reg .pred p;\n setp.ne.s32 p, $1, 0;\n" + "".join(f" {x}\n" for x in lines)
                        + " mov.b32 $0, 0; }")


# One lane asks the TMA unit to bring a whole tile into L2 ahead of its loads (sm_90): costs no
# registers and no load slots of the multiprocessor, unlike prefetch.global.L2 per lane
_L2_BULK = _on_lanes("@p cp.async.bulk.prefetch.L2.global [$2], $3;")
# Shared-memory stages (sm_90): one lane asks the TMA unit to copy whole tiles into a ring of
# stages in shared memory; each stage's mbarrier completes when its bytes have landed. Bytes on
# their way then wait in shared memory, not in registers (``decode_imma``'s ``STAGES``).
_SMEM_DECL_HEAD = "{ .shared .align 128 .b8 lmc_stages["
_MBAR_INIT = _on_lanes("@p mbarrier.init.shared::cta.b64 [$2], 1;", "fence.mbarrier_init.release.cluster;",
                       "fence.proxy.async.shared::cta;")
# The warp's earlier reads of the stage (generic proxy) are ordered before the copies into it
# (async proxy) by the warp barrier and the proxy fence
_ARRIVE_TX = _on_lanes("bar.warp.sync 0xffffffff;", "fence.proxy.async.shared::cta;",
                       "@p mbarrier.arrive.expect_tx.shared::cta.b64 _, [$2], $3;")
_BULK_COPY = _on_lanes("@p cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes [$2], [$3], $4, [$5];")
_WAIT = tl.constexpr("{ .reg .pred p;\n lmc_wait:\n mbarrier.try_wait.parity.shared::cta.b64 p, [$1], $2;\n"
                     " @!p bra lmc_wait;\n mov.b32 $0, 0; }")
_LDS128 = tl.constexpr("ld.shared.v4.b32 {$0, $1, $2, $3}, [$5];")
_LDS64 = tl.constexpr("ld.shared.v2.b32 {$0, $1}, [$3];")
_C_KEY_B = tl.constexpr(_imma.C_KEY_B)
_C_KEYS = tl.constexpr(_imma.C_KEYS)
_C_VALUES = tl.constexpr(_imma.C_VALUES)
_C_SPREAD = tl.constexpr(_imma.C_SPREAD)
_C_BFLY = tl.constexpr(_imma.C_BFLY)
_C_TRANSPOSE = tl.constexpr(_imma.C_TRANSPOSE)
_C_PRMT = tl.constexpr(_imma.C_PRMT)
_C_GATHER = tl.constexpr(_imma.C_GATHER)


@triton.jit
def mma_keys(a00, a01, a02, a03, a10, a11, a12, a13, a20, a21, a22, a23, a30, a31, a32, a33,
             b00, b01, b10, b11, b20, b21, b30, b31):
    """Scores of a 16-token m-tile over 128 dimensions: four chained ``m16n8k32`` (u8 codes x s8).

    ``a<s><r>``: A register ``r`` of k-step ``s``; ``b<s><r>``: B register ``r`` of k-step ``s``
    (int32 tensors of one shape, one element per m-tile). Returns the D fragment, 4 int32 tensors.
    Every operand is a separate tensor (``pack=1``): the asm never depends on register order.
    """
    return tl.inline_asm_elementwise(_MMA_KEYS, _C_KEYS, [a00, a01, a02, a03, a10, a11, a12, a13, a20, a21, a22, a23,
                                                          a30, a31, a32, a33, b00, b01, b10, b11, b20, b21, b30, b31],
                                     dtype=(tl.int32, tl.int32, tl.int32, tl.int32), is_pure=True, pack=1)


@triton.jit
def mma_values(a0, a1, a2, a3, b0, b1, c0, c1, c2, c3):
    """``C + A @ B`` (``m16n8k32``, u8 x u8 -> int32), one per element: the A registers ``a0-a3``,
    the B registers ``b0``, ``b1``, the C fragment ``c0-c3``. Returns the D fragment (4 tensors)."""
    return tl.inline_asm_elementwise(_MMA_VALUES, _C_VALUES, [a0, a1, a2, a3, b0, b1, c0, c1, c2, c3],
                                     dtype=(tl.int32, tl.int32, tl.int32, tl.int32), is_pure=True, pack=1)


@triton.jit
def bfly(x, MASK: tl.constexpr):
    """float32 ``x`` plus ``x`` of lane ``l ^ MASK``."""
    y = tl.inline_asm_elementwise(_BFLY, _C_BFLY, [x.to(tl.int32, bitcast=True), tl.zeros(x.shape, tl.int32) + MASK],
                                  dtype=tl.int32, is_pure=True, pack=1)
    return x + y.to(tl.float32, bitcast=True)


@triton.jit
def spread_p(p0, p1, p2, p3):
    """Lane ``(g, t)`` gets ``p0-p3`` of lane ``4t`` and of lane ``4t + 16`` (int32 bits): 8 tensors."""
    return tl.inline_asm_elementwise(_SPREAD, _C_SPREAD, [p0, p1, p2, p3],
                                     dtype=(tl.int32, tl.int32, tl.int32, tl.int32, tl.int32, tl.int32, tl.int32,
                                            tl.int32), is_pure=True, pack=1)


@triton.jit
def transpose4(a, b, c, d):
    """4 x 4 byte transpose: output ``j`` holds byte ``j`` of ``a``, ``b``, ``c``, ``d`` (int32 words)."""
    return tl.inline_asm_elementwise(_TRANSPOSE, _C_TRANSPOSE, [a, b, c, d],
                                     dtype=(tl.int32, tl.int32, tl.int32, tl.int32), is_pure=True, pack=1)


@triton.jit
def prmt(a, b, sel):
    """``prmt.b32``: byte ``k`` of the result is byte ``(sel >> 4k) & 7`` of ``b:a`` (``a`` bytes
    0-3, ``b`` 4-7); int32 tensors of one shape, elementwise (the selector may differ by lane)."""
    return tl.inline_asm_elementwise(_PRMT, _C_PRMT, [a, b, sel], dtype=tl.int32, is_pure=True, pack=1)


@triton.jit
def gather_byte(x0, x1, x2, x3, sel):
    """One word of byte ``L`` of ``x0 .. x3`` (in that order); ``sel`` = ``L | (L + 4) << 4``."""
    return tl.inline_asm_elementwise(_GATHER, _C_GATHER, [x0, x1, x2, x3, sel], dtype=tl.int32,
                                     is_pure=True, pack=1)


@triton.jit
def key_b(w0, w1, w2):
    """The key product's 8 B registers (k-step ``s``, register ``r`` at ``2s + r``), [32] int32 each,
    from limb words: lane ``4j + t`` holds limb ``k`` of its four dimensions in ``w<k>``, those of
    B register ``j`` of lanes ``(g, t)``; lane ``(g, t)`` takes limb ``g`` (columns 3-7 are 0)."""
    return tl.inline_asm_elementwise(_KEY_B, _C_KEY_B, [w0, w1, w2],
                                     dtype=(tl.int32, tl.int32, tl.int32, tl.int32, tl.int32, tl.int32, tl.int32,
                                            tl.int32), is_pure=True, pack=1)


@triton.jit
def l2_bulk(on, addr, nbytes):
    """Prefetch ``nbytes`` (a multiple of 16) from ``addr`` (int64, 16-byte aligned) into L2 where
    ``on`` (int32) is nonzero; [32] tensors, one element per lane. Returns a dummy int32."""
    return tl.inline_asm_elementwise(_L2_BULK, "=r,r,l,r", [on, addr, nbytes], dtype=tl.int32, is_pure=False,
                                     pack=1)


@triton.constexpr_function
def _smem_decl(nbytes):
    return _SMEM_DECL_HEAD + f"{nbytes}];\n mov.u32 $0, lmc_stages; }}"


@triton.jit
def smem_stages(x, NBYTES: tl.constexpr):
    """Shared address (int32 [32], the same in every lane) of ``NBYTES`` of static shared memory,
    128-byte aligned. ``x``: any int32 [32]. Call it once per kernel: each call is its own array."""
    return tl.inline_asm_elementwise(_smem_decl(NBYTES), "=r,r", [x], dtype=tl.int32, is_pure=False, pack=1)


@triton.jit
def mbar_init(on, bar):
    """Initialise the mbarrier at shared address ``bar`` for one arrival where ``on`` is nonzero
    (one lane), and make it visible to the TMA unit; [32] int32 tensors. Returns a dummy."""
    return tl.inline_asm_elementwise(_MBAR_INIT, "=r,r,r", [on, bar], dtype=tl.int32, is_pure=False, pack=1)


@triton.jit
def arrive_tx(on, bar, nbytes):
    """Where ``on`` is nonzero (one lane), arrive at barrier ``bar`` expecting ``nbytes`` from the
    copies that follow: its phase completes when they have all landed. Every lane first orders its
    earlier reads of shared memory before those copies. [32] int32 tensors; returns a dummy."""
    return tl.inline_asm_elementwise(_ARRIVE_TX, "=r,r,r,r", [on, bar, nbytes], dtype=tl.int32, is_pure=False,
                                     pack=1)


@triton.jit
def bulk_copy(on, dst, src, nbytes, bar):
    """Where ``on`` is nonzero, copy ``nbytes`` (a multiple of 16) from global ``src`` (int64,
    16-byte aligned) to shared ``dst`` by the TMA unit, counted on barrier ``bar``. [32] tensors."""
    return tl.inline_asm_elementwise(_BULK_COPY, "=r,r,r,l,r,r", [on, dst, src, nbytes, bar], dtype=tl.int32,
                                     is_pure=False, pack=1)


@triton.jit
def wait(bar, parity):
    """Spin until the phase of parity ``parity`` (0 or 1) of barrier ``bar`` has completed; [32]
    int32. Returns a token for the reads that must follow it (``lds128``, ``lds64``)."""
    return tl.inline_asm_elementwise(_WAIT, "=r,r,r", [bar, parity], dtype=tl.int32, is_pure=False, pack=1)


@triton.jit
def lds128(tok, addr):
    """Four int32 words at shared address ``addr`` (16-byte aligned), read after ``tok``; [32] each."""
    return tl.inline_asm_elementwise(_LDS128, "=r,=r,=r,=r,r,r", [tok, addr],
                                     dtype=(tl.int32, tl.int32, tl.int32, tl.int32), is_pure=False, pack=1)


@triton.jit
def lds64(tok, addr):
    """Two int32 words at shared address ``addr`` (8-byte aligned), read after ``tok``; [32] each."""
    return tl.inline_asm_elementwise(_LDS64, "=r,=r,r,r", [tok, addr], dtype=(tl.int32, tl.int32), is_pure=False,
                                     pack=1)


# ---- numpy emulations (lane-major arrays: axis 0 is the lane; the matrix-unit ones in imma_ptx) ----

def _emu_l2_bulk(on, addr, nbytes):
    return [np.zeros_like(on)]


# Shared memory under the interpreter: one array, made anew by each program's ``smem_stages``
# (the interpreter runs programs one after another); addresses are offsets into it, and the
# bulk copy is done at once, so barriers have nothing to wait for.
_SMEM = np.zeros(0, np.uint8)


def _emu_smem_decl(nbytes: int):
    def emu(x):
        global _SMEM
        _SMEM = np.zeros(nbytes, np.uint8)
        return [np.zeros_like(x)]
    return emu


def _emu_nothing(*ops):
    return [np.zeros(np.shape(ops[0]), np.int32)]


def _emu_bulk_copy(on, dst, src, nbytes, bar):
    for o, d, a, n in zip(*(np.ravel(x) for x in (on, dst, src, nbytes))):
        if o:
            assert int(a) % 16 == 0 and int(d) % 16 == 0 and int(n) % 16 == 0, "bulk copies move 16-byte units"
            _SMEM[int(d):int(d) + int(n)] = np.frombuffer(ctypes.string_at(int(a), int(n)), np.uint8)
    return [np.zeros(np.shape(on), np.int32)]


def _emu_lds(words: int):
    def emu(tok, addr):
        a = np.ravel(addr).astype(np.int64)
        assert np.all(a % (4 * words) == 0), "vector shared loads are aligned to their size"
        w = _SMEM[a[:, None] + np.arange(4 * words)].reshape(-1, words, 4).copy().view("<i4")[..., 0]
        return [w[:, j].reshape(np.shape(addr)) for j in range(words)]
    return emu


_EMULATIONS = {**_imma.EMULATIONS, _L2_BULK.value: _emu_l2_bulk, _MBAR_INIT.value: _emu_nothing,
               _ARRIVE_TX.value: _emu_nothing, _BULK_COPY.value: _emu_bulk_copy, _WAIT.value: _emu_nothing,
               _LDS128.value: _emu_lds(4), _LDS64.value: _emu_lds(2)}


def _emulation(asm: str):
    """The numpy emulation of an asm string of this module, or None."""
    if asm.startswith(_SMEM_DECL_HEAD):
        return _emu_smem_decl(int(asm[len(_SMEM_DECL_HEAD):].split("]")[0]))
    return _EMULATIONS.get(asm)


def emulate_in_interpreter() -> None:
    """Let Triton's interpreter run this module's asm strings through their numpy emulations.

    Only these strings: any other inline asm still raises as before. Idempotent.
    """
    from triton.runtime import interpreter

    builder = interpreter.InterpreterBuilder
    if getattr(builder.create_inline_asm, "_lmcache", False):
        return
    original = builder.create_inline_asm

    def create_inline_asm(self, asm, constraints, values, types, is_pure, pack):
        fn = _emulation(asm)
        if fn is None:
            return original(self, asm, constraints, values, types, is_pure, pack)
        shape = np.broadcast_shapes(*(v.data.shape for v in values))
        outs = fn(*(_as_int32(np.broadcast_to(v.data, shape)) for v in values))
        return _Results([interpreter.TensorHandle(np.asarray(o, np.int32).reshape(shape), tl.int32) for o in outs])

    create_inline_asm._lmcache = True
    builder.create_inline_asm = create_inline_asm


def _as_int32(x: np.ndarray) -> np.ndarray:
    """float32 as its bits, int64 (addresses) as it is, other integers as int32."""
    if x.dtype == np.int64:
        return x
    return x.view(np.int32) if x.dtype == np.float32 else x.astype(np.int32)


class _Results:
    def __init__(self, handles):
        self._handles = handles

    def get_result(self, i):
        return self._handles[i]
