"""The reference backend: plain, readable, exact numpy, vectorized over tokens and groups."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from ..quant import QuantSpec, storage_dtype
from .base import Backend, QuantBlock

# Bytes of input quantized per step: large enough to amortise numpy's per-call cost,
# small enough that a chunk's temporaries stay in the L2 cache (measured on the 2-core
# CI machine: 256 KiB chunks run quantize about 2x faster than one pass over 64 MB).
_CHUNK_BYTES = 1 << 18


def _np_dtype(name: str) -> np.dtype:
    if name == "bfloat16":
        import ml_dtypes  # optional: shipped with jax, not a hard dependency

        return np.dtype(ml_dtypes.bfloat16)
    return np.dtype(name)


def pack(codes: np.ndarray, bits: int) -> np.ndarray:
    """Pack uint8 ``codes`` (``[..., D]``, values below ``2**bits``) into ``[..., D * bits // 8]``."""
    if bits == 8:
        return codes
    per = 8 // bits
    c = codes.reshape(codes.shape[:-1] + (codes.shape[-1] // per, per))
    out = c[..., 0].copy()
    for j in range(1, per):  # 2 or 4 shifts, over whole arrays
        out |= c[..., j] << np.uint8(bits * j)
    return out


def unpack(packed: np.ndarray, bits: int) -> np.ndarray:
    """Inverse of ``pack``: uint8 ``[..., P]`` to codes ``[..., P * 8 // bits]``."""
    if bits == 8:
        return packed
    per = 8 // bits
    mask = np.uint8((1 << bits) - 1)
    shifts = (np.arange(per, dtype=np.uint8) * np.uint8(bits))
    c = (packed[..., None] >> shifts) & mask
    return c.reshape(packed.shape[:-1] + (packed.shape[-1] * per,))


def _grouped(x: np.ndarray, spec: QuantSpec) -> tuple[np.ndarray, int]:
    """``x`` reshaped so each group lies along one axis; returns (view, that axis)."""
    g = spec.group_size
    if spec.axis == -1:
        return x.reshape(x.shape[:-1] + (x.shape[-1] // g, g)), -1
    return x.reshape(x.shape[:-2] + (x.shape[-2] // g, g, x.shape[-1])), -2


def _quantize_rows(x: np.ndarray, spec: QuantSpec, sdtype: np.dtype):
    """Quantize a float32 array whose leading axes are independent rows."""
    xg, ax = _grouped(x, spec)
    lo = xg.min(axis=ax)
    hi = xg.max(axis=ax)
    scale_s = ((hi - lo) / np.float32(spec.qmax)).astype(sdtype)
    lo_s = lo.astype(sdtype)
    scale_s[scale_s == 0] = 1
    s = np.expand_dims(scale_s.astype(np.float32, copy=False), ax)
    lo_f = np.expand_dims(lo_s.astype(np.float32, copy=False), ax)
    t = np.subtract(xg, lo_f)
    t /= s
    np.rint(t, out=t)  # round half to even
    np.clip(t, 0, spec.qmax, out=t)
    codes = t.astype(np.uint8).reshape(x.shape)
    return pack(codes, spec.bits), scale_s, lo_s


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
                _np_dtype("bfloat16")
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
        return a if dtype is None else a.astype(_np_dtype(dtype), copy=False)

    def empty(self, shape, dtype, device=None):
        return np.empty(tuple(shape), dtype=_np_dtype(dtype))

    def cast(self, x, dtype):
        return x.astype(_np_dtype(dtype), copy=False)

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
        shape = x.shape
        # Rows of the leading axes are independent: process a few at a time so that the
        # float32 temporaries stay in cache.
        rows = x.reshape((-1,) + shape[-2:])
        row_bytes = max(1, shape[-2] * shape[-1] * 4)
        step = max(1, _CHUNK_BYTES // row_bytes)
        n = rows.shape[0]
        packed_last = shape[-1] // spec.per_byte
        codes = np.empty((n, shape[-2], packed_last), np.uint8)
        sshape = (shape[-2] // spec.group_size, shape[-1]) if spec.axis == -2 else \
            (shape[-2], shape[-1] // spec.group_size)
        scale = np.empty((n,) + sshape, sdtype)
        lo = np.empty((n,) + sshape, sdtype)
        for i in range(0, n, step):
            chunk = rows[i:i + step].astype(np.float32, copy=False)
            codes[i:i + step], scale[i:i + step], lo[i:i + step] = _quantize_rows(chunk, spec, sdtype)
        lead = shape[:-2]
        return QuantBlock(codes.reshape(lead + codes.shape[1:]), scale.reshape(lead + sshape),
                          lo.reshape(lead + sshape), spec)

    def dequantize(self, q: QuantBlock, dtype: str):
        spec = q.spec
        out_dt = _np_dtype(dtype)
        shape = q.codes.shape[:-1] + (q.codes.shape[-1] * spec.per_byte,)
        rows_c = q.codes.reshape((-1,) + q.codes.shape[-2:])
        rows_s = q.scale.reshape((-1,) + q.scale.shape[-2:])
        rows_l = q.lo.reshape((-1,) + q.lo.shape[-2:])
        n = rows_c.shape[0]
        out = np.empty((n,) + shape[-2:], out_dt)
        step = max(1, _CHUNK_BYTES // max(1, shape[-2] * shape[-1] * 4))
        ax = -1 if spec.axis == -1 else -2
        for i in range(0, n, step):
            c = unpack(rows_c[i:i + step], spec.bits).astype(np.float32)
            cg, _ = _grouped(c, spec)
            s = np.expand_dims(rows_s[i:i + step].astype(np.float32, copy=False), ax)
            lo = np.expand_dims(rows_l[i:i + step].astype(np.float32, copy=False), ax)
            cg *= s
            cg += lo
            out[i:i + step] = c
        return out.reshape(shape)

    # ------------------------------------------------------------------ attention
    def attention(self, q, k, v, scale):
        b, hq, L, d = q.shape
        hkv, t = k.shape[1], k.shape[2]
        acc = np.float64 if q.dtype == np.float64 else np.float32
        qg = q.astype(acc).reshape(b, hkv, hq // hkv, L, d)
        kf = k.astype(acc)[:, :, None]
        vf = v.astype(acc)[:, :, None]
        s = np.matmul(qg, kf.swapaxes(-1, -2)) * acc(scale)  # [B, Hkv, rep, L, T]
        pos = np.arange(t - L, t)[:, None]
        s = np.where(np.arange(t)[None, :] <= pos, s, -np.inf)
        s -= s.max(axis=-1, keepdims=True)
        p = np.exp(s)
        p /= p.sum(axis=-1, keepdims=True)
        out = np.matmul(p, vf).reshape(b, hq, L, d)
        return out.astype(q.dtype)
