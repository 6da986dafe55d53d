"""The inline PTX of the integer matrix-unit decode kernels, and its numpy emulations (framework-neutral).

Used by ``torch/triton/decode_imma`` (through ``torch/triton/ptx``) and ``jax/pallas/decode_lanes``
(through ``jax/pallas/ptx``): the asm strings, their constraint strings, and for each a numpy
function that computes what one warp's asm computes, on lane-major arrays (axis 0 is the lane),
by the PTX ISA's fragment layouts. The interpreters run the kernels through these emulations.

Fragments of ``mma.sync.aligned.m16n8k32`` (8-bit A and B, int32 C), lane ``l``: group
``g = l // 4``, ``t = l % 4``. A (16 x 32, row): register 0 holds ``A[g, 4t .. 4t + 3]``,
1 ``A[g + 8, 4t ..]``, 2 ``A[g, 4t + 16 ..]``, 3 ``A[g + 8, 4t + 16 ..]`` (byte ``i`` = column
``+ i``). B (32 x 8, col): register 0 ``B[4t .. 4t + 3, g]``, 1 ``B[4t + 16 .., g]``.
C/D (16 x 8): ``D[g, 2t]``, ``D[g, 2t + 1]``, ``D[g + 8, 2t]``, ``D[g + 8, 2t + 1]``.
"""

from __future__ import annotations

import numpy as np

MMA_KEYS = "".join(
    ["mov.b32 $0, 0;\n mov.b32 $1, 0;\n mov.b32 $2, 0;\n mov.b32 $3, 0;\n"]
    + [f"mma.sync.aligned.m16n8k32.row.col.s32.u8.s8.s32 {{$0,$1,$2,$3}}, {{${4 + 4 * s},${5 + 4 * s},"
       f"${6 + 4 * s},${7 + 4 * s}}}, {{${20 + 2 * s},${21 + 2 * s}}}, {{$0,$1,$2,$3}};\n" for s in range(4)])
MMA_VALUES = ("mma.sync.aligned.m16n8k32.row.col.s32.u8.u8.s32 {$0,$1,$2,$3}, {$4,$5,$6,$7}, {$8,$9}, "
              "{$10,$11,$12,$13};")
BFLY = "shfl.sync.bfly.b32 $0, $1, $2, 0x1f, 0xffffffff;"
SPREAD = ("{ .reg .u32 l, s0, s1;\n mov.u32 l, %laneid;\n and.b32 l, l, 3;\n shl.b32 s0, l, 2;\n"
          " add.u32 s1, s0, 16;\n"
          + "".join(f"shfl.sync.idx.b32 ${j}, ${8 + j}, s0, 0x1f, 0xffffffff;\n" for j in range(4))
          + "".join(f"shfl.sync.idx.b32 ${4 + j}, ${8 + j}, s1, 0x1f, 0xffffffff;\n" for j in range(4))
          + "}")
TRANSPOSE = ("{ .reg .b32 x, y, z, w;\n prmt.b32 x, $4, $5, 0x5140;\n prmt.b32 y, $4, $5, 0x7362;\n"
             " prmt.b32 z, $6, $7, 0x5140;\n prmt.b32 w, $6, $7, 0x7362;\n prmt.b32 $0, x, z, 0x5410;\n"
             " prmt.b32 $1, x, z, 0x7632;\n prmt.b32 $2, y, w, 0x5410;\n prmt.b32 $3, y, w, 0x7632; }")
PRMT = "prmt.b32 $0, $1, $2, $3;"
GATHER = ("{ .reg .b32 y, z;\n prmt.b32 y, $1, $2, $5;\n prmt.b32 z, $3, $4, $5;\n"
          " prmt.b32 $0, y, z, 0x5410; }")
# Key B words from limb words: round r reads lane 4r + t's three limb words, keeps limb g's (0 for g >= 3)
KEY_B = ("{ .reg .u32 l, t, g, s;\n .reg .pred p1, p2, p3;\n .reg .b32 a, b, c;\n mov.u32 l, %laneid;\n"
         " and.b32 t, l, 3;\n shr.u32 g, l, 2;\n setp.eq.u32 p1, g, 1;\n setp.eq.u32 p2, g, 2;\n"
         " setp.gt.u32 p3, g, 2;\n"
         + "".join(f" add.u32 s, t, {4 * r};\n shfl.sync.idx.b32 a, $8, s, 0x1f, 0xffffffff;\n"
                   f" shfl.sync.idx.b32 b, $9, s, 0x1f, 0xffffffff;\n"
                   f" shfl.sync.idx.b32 c, $10, s, 0x1f, 0xffffffff;\n selp.b32 a, b, a, p1;\n"
                   f" selp.b32 a, c, a, p2;\n selp.b32 ${r}, 0, a, p3;\n" for r in range(8))
         + "}")
# their constraint strings (outputs "=r", inputs "r")
C_KEY_B = ",".join(["=r"] * 8 + ["r"] * 3)
C_KEYS = ",".join(["=r"] * 4 + ["r"] * 24)
C_VALUES = ",".join(["=r"] * 4 + ["r"] * 10)
C_SPREAD = ",".join(["=r"] * 8 + ["r"] * 4)
C_BFLY = "=r,r,r"
C_TRANSPOSE = "=r,=r,=r,=r,r,r,r,r"
C_PRMT = "=r,r,r,r"
C_GATHER = "=r,r,r,r,r,r"

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


def emu_mma_keys(*ops):
    """``MMA_KEYS``: 16 A then 8 B int32 arrays [32, ...] (k-step major) -> the 4 D arrays."""
    a, b = ops[:16], ops[16:]
    d = [np.zeros_like(a[0]) for _ in range(4)]
    for s in range(4):
        d = _mma(a[4 * s:4 * s + 4], b[2 * s:2 * s + 2], d, True)
    return d


def emu_mma_values(*ops):
    """``MMA_VALUES``: 4 A, 2 B, 4 C int32 arrays [32, ...] -> the 4 D arrays (``C + A @ B``)."""
    return _mma(ops[:4], ops[4:6], ops[6:], False)


def emu_bfly(x, mask):
    """``BFLY``: int32 ``x`` [32, ...] of lane ``l ^ mask`` (``mask`` the same in every element)."""
    m = int(np.asarray(mask).reshape(32, -1)[0, 0])
    return [np.ascontiguousarray(x)[np.arange(32) ^ m]]


def emu_spread(*p):
    """``SPREAD``: 4 int32 [32, ...] -> 8: each of lane ``4t``, then each of lane ``4t + 16``."""
    t = np.arange(32) % 4
    return [np.ascontiguousarray(x)[4 * t] for x in p] + [np.ascontiguousarray(x)[4 * t + 16] for x in p]


def emu_transpose(a, b, c, d):
    """``TRANSPOSE``: output ``j`` (int32) holds byte ``j`` of ``a``, ``b``, ``c``, ``d``."""
    words = np.stack([_bytes(np.asarray(x)) for x in (a, b, c, d)], -1)  # [..., 4 (byte), 4 (word)]
    return [np.ascontiguousarray(words[..., j, :]).view("<i4")[..., 0] for j in range(4)]


def emu_gather(x0, x1, x2, x3, sel):
    """``GATHER``: byte ``sel & 0xF`` of ``x0 .. x3`` into one int32 word."""
    lb = np.asarray(sel) & 0xF
    words = np.stack([_bytes(np.asarray(x)) for x in (x0, x1, x2, x3)], -2)  # [..., 4 (word), 4 (byte)]
    picked = np.take_along_axis(words, np.broadcast_to(lb[..., None, None], words.shape[:-1] + (1,)), -1)
    return [np.ascontiguousarray(picked[..., 0]).view("<i4")[..., 0]]


def emu_prmt(a, b, sel):
    """``PRMT``: ``prmt.b32`` of int32 ``a``, ``b`` by ``sel`` (no sign-replicating selectors)."""
    src = np.concatenate([_bytes(np.asarray(a)), _bytes(np.asarray(b))], -1)  # [..., 8]
    s = np.asarray(sel)
    assert not np.any(s & 0x8888), "prmt's sign-replicating selectors are not emulated"
    idx = np.stack([(s >> (4 * k)) & 7 for k in range(4)], -1)
    return [np.ascontiguousarray(np.take_along_axis(src, idx, -1)).view("<i4")[..., 0]]


def emu_key_b(w0, w1, w2):
    """``KEY_B``: the 8 B registers of lanes ``(g, t)`` from limb words ``w0-w2`` [32, ...] (limb ``g``,
    0 for ``g >= 3``, of lane ``4r + t`` for register ``r``)."""
    lane = np.arange(32)
    g, t = lane // 4, lane % 4
    w = np.stack([np.ascontiguousarray(x) for x in (w0, w1, w2)])  # [limb, 32, ...]
    return [np.where((g < 3).reshape((32,) + (1,) * (w.ndim - 2)), w[np.minimum(g, 2), 4 * r + t], 0)
            for r in range(8)]


#: asm string -> its numpy emulation (int32 arrays in, a list of int32 arrays out)
EMULATIONS = {KEY_B: emu_key_b, MMA_KEYS: emu_mma_keys, MMA_VALUES: emu_mma_values, BFLY: emu_bfly,
              SPREAD: emu_spread, TRANSPOSE: emu_transpose, GATHER: emu_gather, PRMT: emu_prmt}
