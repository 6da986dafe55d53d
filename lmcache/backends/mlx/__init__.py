"""The MLX backend: the Backend contract on ``mx.array``, with Metal kernels on Apple GPUs.

Quantize+pack, unpack+dequantize and single-query (decode) attention over packed K/V run as
Metal kernels (``metal/``) where MLX sees a Metal GPU, and as the pure-MLX ops of ``ops.py``
everywhere else (Linux CPU). Both produce the DESIGN.md format bit for bit.

MLX arrays carry no device: operations run on a stream. Devices are named ``"cpu"`` and
``"gpu"`` (``"metal"`` is accepted for ``"gpu"``); this backend runs its work on its device's
stream, and ``device_of`` reports the backend's device.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence

import numpy as np

from ...quant import QuantSpec
from ..base import Backend, KVView, QuantBlock

__all__ = ["MlxBackend"]

_DEVICE_ALIASES = {"cpu": "cpu", "gpu": "gpu", "metal": "gpu", "gpu:0": "gpu", "cpu:0": "cpu"}


class MlxBackend(Backend):
    """Apple MLX: Metal kernels on Apple silicon, pure-MLX ops elsewhere."""

    name = "mlx"
    extra = "mlx"

    def __init__(self, device: str | None = None):
        import mlx.core as mx

        from . import metal, ops

        self.mx, self.ops = mx, ops
        self._metal = metal.available()
        if device is None:
            device = "gpu" if self._metal else "cpu"
        if not isinstance(device, str) or device not in _DEVICE_ALIASES:
            raise ValueError(f"device={device!r} is not an mlx device; the mlx backend accepts "
                             f"{', '.join(self.devices())} or None")
        device = _DEVICE_ALIASES[device]
        if device == "gpu" and not self._metal:
            raise ValueError("device='gpu' needs a Metal GPU, which this machine does not have; use 'cpu' or None")
        super().__init__(device)
        self._mx_device = mx.gpu if device == "gpu" else mx.cpu
        # Kernels only where the work runs on the Metal GPU.
        self.use_metal = self._metal and device == "gpu"

    # ------------------------------------------------------------------ description
    def devices(self) -> list[str]:
        return ["cpu", "gpu"] if self._metal else ["cpu"]

    def kernel_path(self) -> str:
        if self.use_metal:
            return "metal"
        return "mlx ops (device='cpu')" if self._metal else "mlx ops (no Metal on this machine)"

    def has_accelerator(self) -> bool:
        return self._metal

    def _on_device(self):
        """Run the enclosed MLX operations on this backend's device."""
        if self.mx.default_device() == self._mx_device:
            return contextlib.nullcontext()
        return self.mx.stream(self._mx_device)

    # ------------------------------------------------------------------ arrays
    def is_array(self, x) -> bool:
        return isinstance(x, self.mx.array)

    def dtype_name(self, x) -> str:
        return self.ops.dtype_name(x.dtype)

    def device_of(self, x) -> str:
        return self.device

    def to_numpy(self, x) -> np.ndarray:
        if x.dtype == self.mx.bfloat16:
            x = x.astype(self.mx.float32)
        return np.array(x)

    def from_numpy(self, a, dtype=None, device=None):
        if device is not None and _DEVICE_ALIASES.get(device) != self.device:
            raise ValueError(f"device={device!r} differs from this mlx backend's device {self.device!r}")
        a = np.asarray(a)
        if a.dtype.name == "bfloat16":  # ml_dtypes' bfloat16: MLX does not read it directly
            x = self.mx.array(a.astype(np.float32)).astype(self.mx.bfloat16)
        elif a.dtype == np.float64:  # MLX has no float64 on the GPU
            x = self.mx.array(a.astype(np.float32))
        else:
            x = self.mx.array(a)
        return x if dtype is None else self.cast(x, dtype)

    def empty(self, shape, dtype, device=None):
        return self.mx.zeros(tuple(int(s) for s in shape), dtype=self.ops.mx_dtype(dtype))

    def cast(self, x, dtype):
        dt = self.ops.mx_dtype(dtype)
        return x if x.dtype == dt else x.astype(dt)

    def concat(self, xs: Sequence, axis: int):
        return self.mx.concatenate(list(xs), axis=axis)

    def write(self, buf, start, value, axis=2):
        # MLX slice assignment updates ``buf`` in place (a new graph node under the same
        # Python object); the buffer is returned as the contract asks.
        idx = (slice(None),) * (axis % buf.ndim) + (slice(start, start + value.shape[axis]),)
        buf[idx] = value
        return buf

    def matmul(self, a, b):
        return self.mx.matmul(a, b)

    def take(self, x, index, axis):
        """``x`` restricted to the entries ``index`` (a list of ints) along ``axis``."""
        return self.mx.take(x, self.mx.array(list(index), dtype=self.mx.int32), axis=axis)

    def nbytes(self, x) -> int:
        return int(x.nbytes)

    # ------------------------------------------------------------------ eviction
    def topk(self, x, k):
        # Ties must go to the lower index on every backend; MLX's sorts do not promise a
        # stable order, so the (small) score rows are ranked on the host, exactly as numpy.
        a = np.asarray(self.to_numpy(x), dtype=np.float64)
        idx = np.sort(np.argsort(-a, axis=-1, kind="stable")[..., :k], axis=-1).astype(np.int64)
        return self.mx.array(idx)

    def gather(self, x, index, axis):
        return self.mx.take_along_axis(x, index, axis=axis)

    # ------------------------------------------------------------------ quantization
    def quantize(self, x, spec: QuantSpec) -> QuantBlock:
        with self._on_device():
            if self.use_metal:
                from .metal import quantize as mq

                codes, scale, lo = mq.quantize(x, spec)
            else:
                codes, scale, lo = self.ops.quantize(x, spec)
        return QuantBlock(codes, scale, lo, spec)

    def dequantize(self, q: QuantBlock, dtype: str):
        dt = self.ops.mx_dtype(dtype)
        with self._on_device():
            if self.use_metal:
                from .metal import dequantize as md

                return md.dequantize(q.codes, q.scale, q.lo, q.spec, dt)
            return self.ops.dequantize(q.codes, q.scale, q.lo, q.spec, dt)

    # ------------------------------------------------------------------ attention
    def attention(self, q, k, v, scale):
        with self._on_device():
            return self.ops.attention(q, k, v, float(scale))

    def _partial(self, q32, kb, vb, scale, dtype):
        """Flash-decoding partial of float32 ``q32`` ``[B, Hq, D]`` over one K/V span.

        Dequantized values are rounded to the cache's MLX dtype ``dtype`` (what ``update``
        returns), so the fused path differs from dequantize-then-attend only in summation order.
        """
        ops = self.ops
        # The fused kernel (and its mirror) takes the Cache's layout: keys grouped along
        # tokens, values along head_dim; any other block is dequantized first.
        if isinstance(kb, QuantBlock) and isinstance(vb, QuantBlock) and (kb.spec.axis, vb.spec.axis) == (-2, -1):
            kq, vq = (kb.codes, kb.scale, kb.lo), (vb.codes, vb.scale, vb.lo)
            if self.use_metal:
                from .metal import decode_attention as mda

                return mda.decode_partial(q32, kq, kb.spec, vq, vb.spec, scale, dtype)
            return ops.decode_partial_quantized(q32, kq, kb.spec, vq, vb.spec, scale, dtype)
        k = self.dequantize(kb, self.ops.dtype_name(dtype)) if isinstance(kb, QuantBlock) else kb
        v = self.dequantize(vb, self.ops.dtype_name(dtype)) if isinstance(vb, QuantBlock) else vb
        return ops.decode_partial(q32, k, v, scale)

    def attend(self, q, view: KVView, scale: float, want_scores: bool | int = False):
        """Causal attention over ``view``; a single query reads the packed blocks in place.

        ``q``: ``[B, Hq, L, D]``. For ``L == 1`` (decode) each quantized block pair goes
        through the fused decode kernel (Metal) or its ops mirror, the residual through
        plain ops, and the partial softmaxes are merged; longer queries dequantize and attend.
        ``want_scores`` (eviction statistics, see ``Backend.attend``) takes the composite path.
        """
        if want_scores is not False and want_scores is not None:
            return super().attend(q, view, scale, want_scores)
        if q.shape[2] != 1:
            return super().attend(q, view, scale)
        mx = self.mx
        b, hq, _, d = q.shape
        with self._on_device():
            q32 = q.astype(mx.float32).reshape(b, hq, d)
            if view.rotate_k:
                q32 = self.rotate(q32)
            dt = self.ops.mx_dtype(view.dtype)
            parts = [self._partial(q32, kb, vb, scale, dt) for kb, vb in zip(view.k_blocks, view.v_blocks)]
            if view.k_res is not None:
                parts.append(self.ops.decode_partial(q32, view.k_res, view.v_res, scale))
            out = self.ops.combine(parts)
            if view.rotate_v:
                out = self.rotate(out)
            return out.reshape(b, hq, 1, d).astype(q.dtype)
