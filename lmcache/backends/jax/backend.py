"""JaxBackend: the Backend contract on jax arrays; Pallas kernels on GPUs, the jnp path elsewhere."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from ...quant import QuantSpec
from ..base import FLOAT_DTYPES, Backend, KVView, QuantBlock


def _platform_name(dev) -> str:
    """``"cpu"``, ``"cuda:N"``, ``"rocm:N"`` or ``"<platform>:N"`` for a jax device."""
    if dev.platform == "cpu":
        return "cpu"
    if dev.platform == "gpu":
        version = str(getattr(dev.client, "platform_version", "")).lower()
        return f"{'rocm' if 'rocm' in version else 'cuda'}:{dev.id}"
    return f"{dev.platform}:{dev.id}"


class JaxBackend(Backend):
    """Arrays are ``jax.Array``; ``write`` returns a new array (jax arrays are immutable).

    ``device``: ``None`` (jax's default device), ``"cpu"``, ``"cuda"``/``"gpu"`` (the first
    GPU), ``"cuda:N"``/``"gpu:N"``, ``"tpu:N"``. On a GPU, quantization, dequantization
    and single-token decode attention run as Pallas kernels (``kernel_path()`` says
    ``"pallas (gpu)"``); elsewhere, and for shapes the kernels do not tile, the jnp ops.
    """

    name = "jax"
    extra = "jax"

    def __init__(self, device: str | None = None):
        import jax
        import jax.numpy as jnp

        from . import ops

        self._jax, self._jnp, self._ops = jax, jnp, ops
        self._dev = self._resolve(device) if device is not None else None
        super().__init__(device)
        platform = (self._dev or jax.devices()[0]).platform
        self._pallas = platform == "gpu"

    # ------------------------------------------------------------------ description
    def _resolve(self, device: str):
        jax = self._jax
        if not isinstance(device, str):
            raise TypeError(f"device must be a string like 'cpu' or 'cuda:0', got {type(device).__name__}")
        kind, _, idx = device.partition(":")
        kind = {"cuda": "gpu", "rocm": "gpu"}.get(kind, kind)
        try:
            devs = jax.devices(kind)
            return devs[int(idx) if idx else 0]
        except (RuntimeError, ValueError, IndexError):
            raise ValueError(f"device={device!r} is not available to jax; it has "
                             f"{', '.join(self.devices())}") from None

    def devices(self) -> list[str]:
        return [_platform_name(d) for d in self._jax.devices()]

    def kernel_path(self) -> str:
        return "pallas (gpu)" if self._pallas else "jnp ops"

    def has_accelerator(self) -> bool:
        return any(d.platform in ("gpu", "tpu") for d in self._jax.devices())

    def supports_dtype(self, dtype: str) -> bool:
        if dtype == "float64":
            return bool(self._jax.config.jax_enable_x64)
        return dtype in FLOAT_DTYPES

    # ------------------------------------------------------------------ arrays
    def is_array(self, x) -> bool:
        return isinstance(x, self._jax.Array)

    def dtype_name(self, x) -> str:
        return np.dtype(x.dtype).name

    def device_of(self, x) -> str:
        return _platform_name(next(iter(x.devices())))

    def to_numpy(self, x) -> np.ndarray:
        a = np.asarray(x)
        return a.astype(np.float32) if a.dtype.name == "bfloat16" else a

    def _put(self, x, device):
        dev = self._resolve(device) if device is not None else self._dev
        return x if dev is None else self._jax.device_put(x, dev)

    def from_numpy(self, a, dtype=None, device=None):
        a = np.asarray(a)
        return self._put(self._jnp.asarray(a, dtype=dtype), device)

    def empty(self, shape, dtype, device=None):
        return self._put(self._jnp.zeros(tuple(shape), dtype=dtype), device)

    def cast(self, x, dtype):
        return x if self.dtype_name(x) == dtype else x.astype(dtype)

    def concat(self, xs: Sequence, axis: int):
        return self._jnp.concatenate(list(xs), axis=axis)

    def write(self, buf, start, value, axis=2):
        axis = axis % buf.ndim
        n = value.shape[axis]
        if isinstance(start, bool) or not isinstance(start, (int, np.integer)) or start < 0 \
                or start + n > buf.shape[axis]:
            raise ValueError(f"write of {n} entries at start={start!r} does not fit axis {axis} of length "
                             f"{buf.shape[axis]}")
        return self._jax.lax.dynamic_update_slice_in_dim(buf, value.astype(buf.dtype), int(start), axis)

    def matmul(self, a, b):
        return self._jnp.matmul(a, b, precision=self._jax.lax.Precision.HIGHEST)

    def take(self, x, index, axis):
        """``x`` at positions ``index`` (a list of ints) along ``axis``."""
        return self._jnp.take(x, self._jnp.asarray(list(index), dtype=self._jnp.int32), axis=axis)

    def nbytes(self, x) -> int:
        return int(x.size) * np.dtype(x.dtype).itemsize

    # ------------------------------------------------------------------ eviction
    def topk(self, x, k):
        jnp = self._jnp
        # lax.top_k puts the lower index first among equals, like the reference's stable sort.
        _, idx = self._jax.lax.top_k(x.astype(jnp.float32), k)
        return jnp.sort(idx, axis=-1)

    def gather(self, x, index, axis):
        return self._jnp.take_along_axis(x, index, axis=axis)

    # ------------------------------------------------------------------ quantization
    def quantize(self, x, spec: QuantSpec) -> QuantBlock:
        args = (x, spec.bits, spec.group_size, spec.axis)
        if self._pallas and x.dtype != self._jnp.float64:
            from .pallas import quantize as kq

            if kq.gpu_supported(x.shape, *args[1:]):
                return QuantBlock(*kq.quantize(*args), spec)
            # XLA:GPU's float32 division is not correctly rounded (measured on an H200, jax
            # 0.11.2: about 1 scale or code in 10**4 one step off), so shapes the kernel does
            # not tile are quantized by the numpy reference on the host instead.
            return self._quantize_host(x, spec)
        return QuantBlock(*self._ops.quantize(*args), spec)

    def _quantize_host(self, x, spec: QuantSpec) -> QuantBlock:
        """The numpy reference's quantization of ``x``, returned on ``x``'s device (exact anywhere)."""
        from ..numpy import NumpyBackend

        blk = NumpyBackend().quantize(np.asarray(x), spec)
        dev = next(iter(x.devices()))
        put = self._jax.device_put
        return QuantBlock(put(blk.codes, dev), put(blk.scale, dev), put(blk.lo, dev), spec)

    def dequantize(self, q: QuantBlock, dtype: str):
        spec = q.spec
        if self._pallas and dtype != "float64":
            from .pallas import dequantize as kd

            if kd.gpu_supported(q.codes.shape, q.scale.shape, spec.bits, spec.axis):
                return kd.dequantize(q.codes, q.scale, q.lo, spec.bits, spec.axis, dtype)
        return self._ops.dequantize(q.codes, q.scale, q.lo, spec.bits, spec.axis, self._jnp.dtype(dtype))

    def rotate(self, x):
        return self._ops.rotate(x)

    # ------------------------------------------------------------------ attention
    def attention(self, q, k, v, scale):
        return self._ops.attention(q, k, v, float(scale))

    def attention_scores(self, q, k, v, scale, last=None):
        return self._ops.attention_scores(q, k, v, float(scale), None if last is None else int(last))

    def attend(self, q, view: KVView, scale: float, want_scores: bool | int = False):
        """Fused Pallas decode attention for one query token over quantized blocks (GPU).

        Other cases (a prompt, a full-precision side, the CPU, ``want_scores``) take the
        composite path.
        """
        kernels = None if want_scores is not False and want_scores is not None else self._fused_kernels(q, view)
        if kernels is None:
            return super().attend(q, view, scale, want_scores)
        ops = self._ops
        qr = ops.rotate(q) if view.rotate_k else q
        parts = []
        for kern, kb, vb in zip(kernels, view.k_blocks, view.v_blocks):
            parts.append(kern.decode_attention(qr[:, :, 0], kb.codes, kb.scale, kb.lo, vb.codes, vb.scale, vb.lo,
                                               k_bits=kb.spec.bits, v_bits=vb.spec.bits, scale=scale))
        if view.k_res is not None:
            o, lse = ops.masked_attention_lse(qr, view.k_res, view.v_res, scale, view.k_res.shape[2], offset=None)
            parts.append((o[:, :, 0], lse[:, :, 0]))
        out = ops.combine(parts)[:, :, None]
        if view.rotate_v:
            out = ops.rotate(out)
        return out.astype(q.dtype)

    def _fused_kernels(self, q, view: KVView) -> list | None:
        """The Pallas decode kernel module of each (K, V) block pair of ``view``, or ``None`` if any
        block cannot take one (then the composite path runs)."""
        if not self._pallas or q.shape[2] != 1 or not view.k_blocks:
            return None
        kernels = []
        for kb, vb in zip(view.k_blocks, view.v_blocks):
            if not (isinstance(kb, QuantBlock) and isinstance(vb, QuantBlock)):
                return None
            if (kb.spec.axis, vb.spec.axis) != (-2, -1):  # the kernels' layout: the Cache's
                return None
            kernels.append(self._kernel(q.shape[-1], kb, vb))
            if kernels[-1] is None:
                return None
        return kernels

    @staticmethod
    def _kernel(d: int, kb: QuantBlock, vb: QuantBlock):
        """The Pallas decode kernel module for a (K, V) block pair (``decode_int8.fused_kernel``)."""
        from .pallas import decode_int8

        t = kb.codes.shape[2]
        return decode_int8.fused_kernel(d, kb.spec.bits, vb.spec.bits, t // kb.scale.shape[2], d // vb.scale.shape[3],
                                        t)
