"""The reference backend: plain, readable, exact numpy, vectorized over tokens and groups."""

from __future__ import annotations

import sys
from collections.abc import Sequence

import numpy as np

from ..quant import QuantSpec, storage_dtype
from .base import Backend, QuantBlock, attention_scores_numpy, host_dtype

# Float32 bytes quantized per step: large enough to amortise numpy's per-call cost, small
# enough that a chunk's temporaries stay in the L2 cache (bench/quant_cpu.py on the 2-core
# EPYC CI machine: 256 KiB chunks beat whole-head passes of 2 MiB).
_CHUNK_BYTES = 1 << 18


_LITTLE = sys.byteorder == "little"


def pack(codes: np.ndarray, bits: int) -> np.ndarray:
    """Pack uint8 ``codes`` (``[..., D]``, values below ``2**bits``) into ``[..., D * bits // 8]``."""
    if bits == 8:
        return codes
    per = 8 // bits
    codes = np.ascontiguousarray(codes)
    if _LITTLE:
        # Read 2 (4) codes as one little-endian uint16 (uint32) and slide the fields together:
        # whole-array integer ops instead of strided byte gathers.
        if bits == 4:
            v = codes.view(np.uint16)
            return ((v & 0xF) | ((v >> 4) & 0xF0)).astype(np.uint8)
        v = codes.view(np.uint32)
        return ((v & 0x3) | ((v >> 6) & 0xC) | ((v >> 12) & 0x30) | ((v >> 18) & 0xC0)).astype(np.uint8)
    c = codes.reshape(codes.shape[:-1] + (codes.shape[-1] // per, per))
    out = c[..., 0].copy()
    for j in range(1, per):
        out |= c[..., j] << np.uint8(bits * j)
    return out


def unpack(packed: np.ndarray, bits: int) -> np.ndarray:
    """Inverse of ``pack``: uint8 ``[..., P]`` to codes ``[..., P * 8 // bits]``."""
    if bits == 8:
        return packed
    per = 8 // bits
    shape = packed.shape[:-1] + (packed.shape[-1] * per,)
    if _LITTLE:
        if bits == 4:
            v = packed.astype(np.uint16)
            return ((v & 0xF) | ((v & 0xF0) << 4)).view(np.uint8).reshape(shape)
        v = packed.astype(np.uint32)
        v = (v & 0x3) | ((v & 0xC) << 6) | ((v & 0x30) << 12) | ((v & 0xC0) << 18)
        return v.view(np.uint8).reshape(shape)
    shifts = np.arange(per, dtype=np.uint8) * np.uint8(bits)
    return ((packed[..., None] >> shifts) & np.uint8((1 << bits) - 1)).reshape(shape)


def _grouped(x: np.ndarray, spec: QuantSpec) -> tuple[np.ndarray, int]:
    """``x`` reshaped so each group lies along one axis; returns (view, that axis)."""
    g = spec.group_size
    if spec.axis == -1:
        return x.reshape(x.shape[:-1] + (x.shape[-1] // g, g)), -1
    return x.reshape(x.shape[:-2] + (x.shape[-2] // g, g, x.shape[-1])), -2


def _quantize_chunk(x: np.ndarray, spec: QuantSpec, sdtype: np.dtype):
    """Quantize float ``x`` ``[n, D]`` (whole groups): returns packed codes, scale, lo."""
    if spec.axis == -1 and spec.group_size % spec.per_byte == 0:
        return _quantize_rows_transposed(x, spec, sdtype)
    xg, ax = _grouped(x, spec)
    lo = xg.min(axis=ax)
    hi = xg.max(axis=ax)
    scale_s, lo_s, s, lo_f = _stored(lo, hi, spec, sdtype)
    t = np.subtract(xg, np.expand_dims(lo_f, ax), dtype=np.float32)
    t /= np.expand_dims(s, ax)
    np.rint(t, out=t)  # round half to even
    np.clip(t, 0, spec.qmax, out=t)
    return pack(t.astype(np.uint8).reshape(x.shape), spec.bits), scale_s, lo_s


def _stored(lo: np.ndarray, hi: np.ndarray, spec: QuantSpec, sdtype: np.dtype):
    """Stored scale and lo (``sdtype``, a zero scale made 1) and their float32 values."""
    scale_s = ((hi.astype(np.float32) - lo.astype(np.float32)) / np.float32(spec.qmax)).astype(sdtype)
    lo_s = lo.astype(sdtype)
    scale_s[scale_s == 0] = 1
    return scale_s, lo_s, scale_s.astype(np.float32, copy=False), lo_s.astype(np.float32, copy=False)


def _quantize_rows_transposed(x: np.ndarray, spec: QuantSpec, sdtype: np.dtype):
    """``_quantize_chunk`` for groups along the last axis, computed on the transposed chunk.

    numpy reduces a short contiguous axis (64 values) row by row, slowly; transposed, every
    group is a column and min, max and the arithmetic run down whole contiguous rows (1.5x
    faster on the CI machine). The packing of ``per`` neighbours along the last axis becomes
    a weighted sum of ``per`` neighbouring rows, exact in float32 (at most 255).
    """
    n, d = x.shape
    g, per = spec.group_size, spec.per_byte
    xt = np.ascontiguousarray(x.reshape(-1, g).T, dtype=np.float32)  # [g, groups]
    scale_s, lo_s, s, lo_f = _stored(xt.min(axis=0), xt.max(axis=0), spec, sdtype)
    xt -= lo_f
    xt /= s
    np.rint(xt, out=xt)  # round half to even
    np.clip(xt, 0, spec.qmax, out=xt)
    if per > 1:
        v = xt.reshape(g // per, per, -1)
        packed = v[:, 0].copy()
        for j in range(1, per):
            packed += v[:, j] * np.float32(1 << (spec.bits * j))
        xt = packed
    codes = xt.astype(np.uint8).T.reshape(n, d // per)
    return codes, scale_s.reshape(n, d // g), lo_s.reshape(n, d // g)


def _token_step(spec: QuantSpec, n: int, d: int) -> int:
    """Tokens per chunk: about _CHUNK_BYTES of float32, whole key groups, at least one group."""
    unit = spec.group_size if spec.axis == -2 else 1
    return min(n, max(unit, _CHUNK_BYTES // (4 * d) // unit * unit))


class NumpyBackend(Backend):
    """The reference backend. Host memory only (``device`` must be ``None`` or ``"cpu"``)."""

    name = "numpy"
    extra = ""

    def __init__(self, device: str | None = None):
        if device not in (None, "cpu"):
            raise ValueError(f"device={device!r} is not available on the numpy backend; it accepts 'cpu' or None")
        super().__init__("cpu")

    def devices(self) -> list[str]:
        return ["cpu"]

    def kernel_path(self) -> str:
        return "numpy reference (vectorized, dequantize then attend)"

    def supports_dtype(self, dtype: str) -> bool:
        if dtype == "bfloat16":
            try:
                host_dtype("bfloat16")
            except ImportError:
                return False
            return True
        return dtype in ("float16", "float32", "float64")

    # ------------------------------------------------------------------ arrays
    def is_array(self, x) -> bool:
        return isinstance(x, np.ndarray)

    def dtype_name(self, x) -> str:
        return np.dtype(x.dtype).name

    def device_of(self, x) -> str:
        return "cpu"

    def to_numpy(self, x) -> np.ndarray:
        x = np.asarray(x)
        return x.astype(np.float32) if x.dtype.name == "bfloat16" else x

    def from_numpy(self, a, dtype=None, device=None):
        if device not in (None, "cpu"):
            raise ValueError(f"device={device!r} is not available on the numpy backend")
        a = np.asarray(a)
        return a if dtype is None else a.astype(host_dtype(dtype), copy=False)

    def empty(self, shape, dtype, device=None):
        return np.empty(tuple(shape), dtype=host_dtype(dtype))

    def cast(self, x, dtype):
        return x.astype(host_dtype(dtype), copy=False)

    def concat(self, xs: Sequence, axis: int):
        return np.concatenate(list(xs), axis=axis)

    def write(self, buf, start, value, axis=2):
        idx = (slice(None),) * (axis % buf.ndim) + (slice(start, start + value.shape[axis]),)
        buf[idx] = value
        return buf

    def matmul(self, a, b):
        return np.matmul(a, b)

    def take(self, x, index, axis):
        return np.take(x, list(index), axis=axis)

    def nbytes(self, x) -> int:
        return int(x.nbytes)

    # ------------------------------------------------------------------ eviction
    def topk(self, x, k):
        idx = np.argsort(-np.asarray(x, dtype=np.float64), axis=-1, kind="stable")[..., :k]
        return np.sort(idx, axis=-1).astype(np.int64)

    def gather(self, x, index, axis):
        return np.take_along_axis(x, index, axis=axis)

    # ------------------------------------------------------------------ quantization
    def quantize(self, x, spec: QuantSpec) -> QuantBlock:
        x = np.asarray(x)
        sdtype = np.dtype(storage_dtype(x.dtype.name))
        *lead, n, d = x.shape
        g = spec.group_size
        rows = x.reshape((-1, n, d))
        r = rows.shape[0]
        codes = np.empty((r, n, d // spec.per_byte), np.uint8)
        sshape = (n // g, d) if spec.axis == -2 else (n, d // g)
        scale = np.empty((r,) + sshape, sdtype)
        lo = np.empty((r,) + sshape, sdtype)
        # Chunks of whole groups sized so their float32 temporaries stay in cache.
        step = _token_step(spec, n, d)
        sg = g if spec.axis == -2 else 1
        for i in range(r):
            for t0 in range(0, n, step):
                t1 = min(n, t0 + step)
                c, sc, lo_ = _quantize_chunk(rows[i, t0:t1], spec, sdtype)
                codes[i, t0:t1], scale[i, t0 // sg:t1 // sg], lo[i, t0 // sg:t1 // sg] = c, sc, lo_
        lead = tuple(lead)
        return QuantBlock(codes.reshape(lead + codes.shape[1:]), scale.reshape(lead + sshape),
                          lo.reshape(lead + sshape), spec)

    def dequantize(self, q: QuantBlock, dtype: str):
        spec = q.spec
        *lead, n, p = q.codes.shape
        d = p * spec.per_byte
        g = spec.group_size
        sg = g if spec.axis == -2 else 1
        rows_c = q.codes.reshape((-1, n, p))
        rows_s = q.scale.reshape((-1,) + q.scale.shape[-2:])
        rows_l = q.lo.reshape((-1,) + q.lo.shape[-2:])
        out = np.empty((rows_c.shape[0], n, d), host_dtype(dtype))
        step = _token_step(spec, n, d)
        ax = spec.axis
        for i in range(rows_c.shape[0]):
            for t0 in range(0, n, step):
                t1 = min(n, t0 + step)
                c = unpack(rows_c[i, t0:t1], spec.bits).astype(np.float32)
                cg, _ = _grouped(c, spec)
                cg *= np.expand_dims(rows_s[i, t0 // sg:t1 // sg].astype(np.float32, copy=False), ax)
                cg += np.expand_dims(rows_l[i, t0 // sg:t1 // sg].astype(np.float32, copy=False), ax)
                out[i, t0:t1] = c
        return out.reshape(tuple(lead) + (n, d))

    # ------------------------------------------------------------------ attention
    def attention(self, q, k, v, scale):
        return attention_scores_numpy(q, k, v, scale, 0)[0]

    def attention_scores(self, q, k, v, scale, last=None):
        return attention_scores_numpy(q, k, v, scale, last)
