"""Inline-PTX pieces of the integer matrix-unit kernel (``decode_imma``), with numpy emulations.

Each helper works on per-lane tensors: a ``[32, ...]`` tensor of one warp whose row ``l`` is
what lane ``l`` holds (the kernels' tensors all keep dimension 0 on the lanes). Every operand of
a fragment is a tensor of its own and the asm runs once per element (``pack=1``), because the
order of a thread's registers within a tensor is Triton's choice (it follows permutes).

Under ``TRITON_INTERPRET=1`` there is no PTX: ``emulate_in_interpreter`` teaches the interpreter
each asm string through its numpy emulation here, which implements the PTX ISA's fragment
layouts, so the kernel runs (and is tested) on CPU with the same lane arithmetic as on the GPU.
The shared-memory stages (sm_90: a static ``.shared`` ring, mbarriers, TMA bulk copies,
``ld.shared``) are emulated by one host array that each program makes anew, copies done at once.

Fragments of ``mma.sync.aligned.m16n8k32`` (8-bit A and B, int32 C), lane ``l``: group
``g = l // 4``, ``t = l % 4``. A (16 x 32, row): register 0 holds ``A[g, 4t .. 4t + 3]``,
1 ``A[g + 8, 4t ..]``, 2 ``A[g, 4t + 16 ..]``, 3 ``A[g + 8, 4t + 16 ..]`` (byte ``i`` = column
``+ i``). B (32 x 8, col): register 0 ``B[4t .. 4t + 3, g]``, 1 ``B[4t + 16 .., g]``.
C/D (16 x 8): ``D[g, 2t]``, ``D[g, 2t + 1]``, ``D[g + 8, 2t]``, ``D[g + 8, 2t + 1]``.
"""

from __future__ import annotations

import ctypes

import numpy as np
import triton
import triton.language as tl

_MMA_KEYS = tl.constexpr("".join(
    ["mov.b32 $0, 0;\n mov.b32 $1, 0;\n mov.b32 $2, 0;\n mov.b32 $3, 0;\n"]
    + [f"mma.sync.aligned.m16n8k32.row.col.s32.u8.s8.s32 {{$0,$1,$2,$3}}, {{${4 + 4 * s},${5 + 4 * s},"
       f"${6 + 4 * s},${7 + 4 * s}}}, {{${20 + 2 * s},${21 + 2 * s}}}, {{$0,$1,$2,$3}};\n" for s in range(4)]))
_MMA_VALUES = tl.constexpr("mma.sync.aligned.m16n8k32.row.col.s32.u8.u8.s32 {$0,$1,$2,$3}, {$4,$5,$6,$7}, {$8,$9}, "
                           "{$10,$11,$12,$13};")
_BFLY = tl.constexpr("shfl.sync.bfly.b32 $0, $1, $2, 0x1f, 0xffffffff;")
_SPREAD = tl.constexpr("{ .reg .u32 l, s0, s1;\n mov.u32 l, %laneid;\n and.b32 l, l, 3;\n shl.b32 s0, l, 2;\n"
                       " add.u32 s1, s0, 16;\n"
                       + "".join(f"shfl.sync.idx.b32 ${j}, ${8 + j}, s0, 0x1f, 0xffffffff;\n" for j in range(4))
                       + "".join(f"shfl.sync.idx.b32 ${4 + j}, ${8 + j}, s1, 0x1f, 0xffffffff;\n" for j in range(4))
                       + "}")
_TRANSPOSE = tl.constexpr("{ .reg .b32 x, y, z, w;\n prmt.b32 x, $4, $5, 0x5140;\n prmt.b32 y, $4, $5, 0x7362;\n"
                          " prmt.b32 z, $6, $7, 0x5140;\n prmt.b32 w, $6, $7, 0x7362;\n prmt.b32 $0, x, z, 0x5410;\n"
                          " prmt.b32 $1, x, z, 0x7632;\n prmt.b32 $2, y, w, 0x5410;\n prmt.b32 $3, y, w, 0x7632; }")
_PRMT = tl.constexpr("prmt.b32 $0, $1, $2, $3;")
_GATHER = tl.constexpr("{ .reg .b32 y, z;\n prmt.b32 y, $1, $2, $5;\n prmt.b32 z, $3, $4, $5;\n"
                       " prmt.b32 $0, y, z, 0x5410; }")
# Key B words from limb words: round r reads lane 4r + t's three limb words, keeps limb g's (0 for g >= 3)
_KEY_B = tl.constexpr("{ .reg .u32 l, t, g, s;\n .reg .pred p1, p2, p3;\n .reg .b32 a, b, c;\n mov.u32 l, %laneid;\n"
                      " and.b32 t, l, 3;\n shr.u32 g, l, 2;\n setp.eq.u32 p1, g, 1;\n setp.eq.u32 p2, g, 2;\n"
                      " setp.gt.u32 p3, g, 2;\n"
                      + "".join(f" add.u32 s, t, {4 * r};\n shfl.sync.idx.b32 a, $8, s, 0x1f, 0xffffffff;\n"
                                f" shfl.sync.idx.b32 b, $9, s, 0x1f, 0xffffffff;\n"
                                f" shfl.sync.idx.b32 c, $10, s, 0x1f, 0xffffffff;\n selp.b32 a, b, a, p1;\n"
                                f" selp.b32 a, c, a, p2;\n selp.b32 ${r}, 0, a, p3;\n" for r in range(8))
                      + "}")


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
_C_KEY_B = tl.constexpr(",".join(["=r"] * 8 + ["r"] * 3))
_C_KEYS = tl.constexpr(",".join(["=r"] * 4 + ["r"] * 24))
_C_VALUES = tl.constexpr(",".join(["=r"] * 4 + ["r"] * 10))
_C_SPREAD = tl.constexpr(",".join(["=r"] * 8 + ["r"] * 4))


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
    y = tl.inline_asm_elementwise(_BFLY, "=r,r,r", [x.to(tl.int32, bitcast=True), tl.zeros(x.shape, tl.int32) + MASK],
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
    return tl.inline_asm_elementwise(_TRANSPOSE, "=r,=r,=r,=r,r,r,r,r", [a, b, c, d],
                                     dtype=(tl.int32, tl.int32, tl.int32, tl.int32), is_pure=True, pack=1)


@triton.jit
def prmt(a, b, sel):
    """``prmt.b32``: byte ``k`` of the result is byte ``(sel >> 4k) & 7`` of ``b:a`` (``a`` bytes
    0-3, ``b`` 4-7); int32 tensors of one shape, elementwise (the selector may differ by lane)."""
    return tl.inline_asm_elementwise(_PRMT, "=r,r,r,r", [a, b, sel], dtype=tl.int32, is_pure=True, pack=1)


@triton.jit
def gather_byte(x0, x1, x2, x3, sel):
    """One word of byte ``L`` of ``x0 .. x3`` (in that order); ``sel`` = ``L | (L + 4) << 4``."""
    return tl.inline_asm_elementwise(_GATHER, "=r,r,r,r,r,r", [x0, x1, x2, x3, sel], dtype=tl.int32,
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


# ---- numpy emulations (lane-major arrays: axis 0 is the lane) ----

def _bytes(regs: np.ndarray) -> np.ndarray:
    """int32 [..., r] -> uint8 [..., r, 4], byte 0 the least significant."""
    return np.ascontiguousarray(regs).astype("<i4").view(np.uint8).reshape(*regs.shape, 4)


def _lanes(x: np.ndarray) -> np.ndarray:
    """[32, ...] -> [32, n]: lane-major, one column per instance."""
    return np.ascontiguousarray(x).astype(np.int32).reshape(32, -1)


def _mma(a_regs: list, b_regs: list, c: list, b_signed: bool) -> list:
    """One warp's m16n8k32 for each instance: 4 A, 2 B and 4 C arrays [32, n] -> 4 D arrays."""
    lane = np.arange(32)
    g, t = lane // 4, lane % 4
    ab = _bytes(np.stack([_lanes(x) for x in a_regs], -1)).astype(np.int64)  # [32, n, 4, 4]
    bb = _bytes(np.stack([_lanes(x) for x in b_regs], -1))
    bb = (bb.view(np.int8) if b_signed else bb).astype(np.int64)  # [32, n, 2, 4]
    n = ab.shape[1]
    A = np.zeros((n, 16, 32), np.int64)
    B = np.zeros((n, 32, 8), np.int64)
    for i in range(4):
        A[:, g, 4 * t + i] = ab[:, :, 0, i].T
        A[:, g + 8, 4 * t + i] = ab[:, :, 1, i].T
        A[:, g, 4 * t + 16 + i] = ab[:, :, 2, i].T
        A[:, g + 8, 4 * t + 16 + i] = ab[:, :, 3, i].T
        B[:, 4 * t + i, g] = bb[:, :, 0, i].T
        B[:, 4 * t + 16 + i, g] = bb[:, :, 1, i].T
    D = A @ B
    d = [D[:, g, 2 * t], D[:, g, 2 * t + 1], D[:, g + 8, 2 * t], D[:, g + 8, 2 * t + 1]]  # [n, 32] each
    return [(x.T + _lanes(cc)).astype(np.int64).astype(np.int32).reshape(np.shape(cc)) for x, cc in zip(d, c)]


def _emu_mma_keys(*ops):
    a, b = ops[:16], ops[16:]
    d = [np.zeros_like(a[0]) for _ in range(4)]
    for s in range(4):
        d = _mma(a[4 * s:4 * s + 4], b[2 * s:2 * s + 2], d, True)
    return d


def _emu_mma_values(*ops):
    return _mma(ops[:4], ops[4:6], ops[6:], False)


def _emu_bfly(x, mask):
    m = int(np.asarray(mask).reshape(32, -1)[0, 0])
    return [np.ascontiguousarray(x)[np.arange(32) ^ m]]


def _emu_spread(*p):
    t = np.arange(32) % 4
    return [np.ascontiguousarray(x)[4 * t] for x in p] + [np.ascontiguousarray(x)[4 * t + 16] for x in p]


def _emu_transpose(a, b, c, d):
    words = np.stack([_bytes(np.asarray(x)) for x in (a, b, c, d)], -1)  # [..., 4 (byte), 4 (word)]
    return [np.ascontiguousarray(words[..., j, :]).view("<i4")[..., 0] for j in range(4)]


def _emu_gather(x0, x1, x2, x3, sel):
    lb = np.asarray(sel) & 0xF
    words = np.stack([_bytes(np.asarray(x)) for x in (x0, x1, x2, x3)], -2)  # [..., 4 (word), 4 (byte)]
    picked = np.take_along_axis(words, np.broadcast_to(lb[..., None, None], words.shape[:-1] + (1,)), -1)
    return [np.ascontiguousarray(picked[..., 0]).view("<i4")[..., 0]]


def _emu_prmt(a, b, sel):
    src = np.concatenate([_bytes(np.asarray(a)), _bytes(np.asarray(b))], -1)  # [..., 8]
    s = np.asarray(sel)
    assert not np.any(s & 0x8888), "prmt's sign-replicating selectors are not emulated"
    idx = np.stack([(s >> (4 * k)) & 7 for k in range(4)], -1)
    return [np.ascontiguousarray(np.take_along_axis(src, idx, -1)).view("<i4")[..., 0]]


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


def _emu_key_b(w0, w1, w2):
    lane = np.arange(32)
    g, t = lane // 4, lane % 4
    w = np.stack([np.ascontiguousarray(x) for x in (w0, w1, w2)])  # [limb, 32, ...]
    return [np.where((g < 3).reshape((32,) + (1,) * (w.ndim - 2)), w[np.minimum(g, 2), 4 * r + t], 0)
            for r in range(8)]


_EMULATIONS = {_KEY_B.value: _emu_key_b, _L2_BULK.value: _emu_l2_bulk, _MMA_KEYS.value: _emu_mma_keys,
               _MMA_VALUES.value: _emu_mma_values, _BFLY.value: _emu_bfly,
               _SPREAD.value: _emu_spread, _TRANSPOSE.value: _emu_transpose, _GATHER.value: _emu_gather,
               _PRMT.value: _emu_prmt,
               _MBAR_INIT.value: _emu_nothing, _ARRIVE_TX.value: _emu_nothing, _BULK_COPY.value: _emu_bulk_copy,
               _WAIT.value: _emu_nothing, _LDS128.value: _emu_lds(4), _LDS64.value: _emu_lds(2)}


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
