"""``TorchBackend``: the Backend contract on torch tensors (CPU, CUDA, ROCm).

On CUDA and ROCm tensors quantization, dequantization and attention over the compressed
cache run as Triton kernels (``triton/``); on CPU tensors, or where Triton is missing, the
torch-only path (``ops.py``) runs. Both give the numpy reference's codes bit for bit.
``LMCACHE_TORCH_KERNELS=torch`` forces the torch-only path everywhere.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Sequence

import numpy as np
import torch

from ...quant import QuantSpec
from ..base import FLOAT_DTYPES, Backend, KVView, QuantBlock
from . import ops


@functools.lru_cache(maxsize=1)
def triton_available() -> bool:
    """Whether Triton imports and torch sees a GPU it can compile for (CUDA or ROCm)."""
    if os.environ.get("LMCACHE_TORCH_KERNELS", "").strip().lower() == "torch":
        return False
    if not torch.cuda.is_available():
        return False
    try:
        import triton  # noqa: F401
    except Exception:  # a broken Triton install is passed over: the torch path still runs
        return False
    return True


def gpu_vendor() -> str:
    """``"rocm"`` when torch is a HIP build, else ``"cuda"``."""
    return "rocm" if getattr(torch.version, "hip", None) else "cuda"


class TorchBackend(Backend):
    """torch tensors on any device torch has; Triton kernels on CUDA/ROCm tensors.

    ``device``: ``None`` (arrays stay where they are; new ones go to the CPU), ``"cpu"``,
    ``"cuda"``, ``"cuda:N"``.
    """

    name = "torch"
    extra = "torch"

    def __init__(self, device: str | None = None):
        if device is not None:
            try:
                dev = torch.device(device)
            except (RuntimeError, TypeError) as e:
                raise ValueError(f"device={device!r} is not a torch device: {e}") from None
            if dev.type == "cuda" and not torch.cuda.is_available():
                raise ValueError(f"device={device!r} is not available: torch sees no GPU; use 'cpu' or None")
        super().__init__(device)

    # ------------------------------------------------------------------ description
    def devices(self) -> list[str]:
        return ["cpu"] + [f"cuda:{i}" for i in range(torch.cuda.device_count())]

    def kernel_path(self) -> str:
        if triton_available():
            return (f"triton ({gpu_vendor()}) on GPU tensors: fused quantize/dequantize and split-K "
                    f"decode attention over packed codes; torch ops on CPU tensors")
        return "torch ops (no Triton: dequantize then attend)"

    def uses_triton(self, x: torch.Tensor) -> bool:
        """Whether operations on tensor ``x`` run as Triton kernels."""
        return x.is_cuda and triton_available()

    def has_accelerator(self) -> bool:
        return torch.cuda.is_available()

    def supports_dtype(self, dtype: str) -> bool:
        return dtype in FLOAT_DTYPES or dtype == "float64"

    # ------------------------------------------------------------------ arrays
    def is_array(self, x) -> bool:
        return isinstance(x, torch.Tensor)

    def dtype_name(self, x) -> str:
        return ops.NAMES.get(x.dtype, str(x.dtype).removeprefix("torch."))

    def device_of(self, x) -> str:
        return str(x.device)

    def _device(self, device: str | None) -> torch.device:
        return torch.device(device if device is not None else (self.device or "cpu"))

    def to_numpy(self, x) -> np.ndarray:
        x = x.detach()
        if x.dtype == torch.bfloat16:
            x = x.to(torch.float32)
        return x.cpu().numpy()

    def from_numpy(self, a, dtype=None, device=None):
        a = np.ascontiguousarray(a)
        if not a.flags.writeable:  # torch.from_numpy shares memory: never alias a read-only array
            a = a.copy()
        if a.dtype.name == "bfloat16":  # ml_dtypes: torch reads the bits as uint16
            t = torch.from_numpy(a.view(np.uint16)).view(torch.bfloat16)
        else:
            t = torch.from_numpy(a)
        t = t.to(self._device(device))
        return t if dtype is None else t.to(ops.torch_dtype(dtype))

    def empty(self, shape: Sequence[int], dtype: str, device: str | None = None):
        return torch.empty(tuple(shape), dtype=ops.torch_dtype(dtype), device=self._device(device))

    def cast(self, x, dtype):
        return x.to(ops.torch_dtype(dtype))

    def concat(self, xs, axis):
        return torch.cat(list(xs), dim=axis)

    def write(self, buf, start, value, axis=2):
        buf.narrow(axis, start, value.shape[axis]).copy_(value)
        return buf

    def matmul(self, a, b):
        return torch.matmul(a, b)

    def take(self, x, index, axis):
        """``x`` at positions ``index`` (a list of ints) along ``axis``."""
        idx = torch.as_tensor(list(index), dtype=torch.int64, device=x.device)
        return torch.index_select(x, axis, idx)

    def nbytes(self, x) -> int:
        return x.numel() * x.element_size()

    # ------------------------------------------------------------------ eviction
    def topk(self, x, k):
        # A stable descending sort keeps the lower index first among ties, as numpy does.
        idx = torch.sort(x.to(torch.float64), dim=-1, descending=True, stable=True).indices[..., :k]
        return torch.sort(idx, dim=-1).values

    def gather(self, x, index, axis):
        return torch.gather(x, axis, index.to(device=x.device, dtype=torch.int64))

    # ------------------------------------------------------------------ quantization
    def quantize(self, x, spec: QuantSpec) -> QuantBlock:
        if self.uses_triton(x):
            from .triton.quantize import quantize as tq
            from .triton.quantize import supported

            if supported(tuple(x.shape), spec):
                return QuantBlock(*tq(x, spec), spec)
        return QuantBlock(*ops.quantize(x, spec), spec)

    def dequantize(self, q: QuantBlock, dtype: str):
        td = ops.torch_dtype(dtype)
        if self.uses_triton(q.codes):
            from .triton.dequantize import dequantize as tdq
            from .triton.dequantize import supported

            if supported(tuple(q.codes.shape), q.spec):
                return tdq(q.codes, q.scale, q.lo, q.spec, td)
        return ops.dequantize(q.codes, q.scale, q.lo, q.spec, td)

    # ------------------------------------------------------------------ attention
    def attention(self, q, k, v, scale):
        return ops.attention(q, k, v, scale)

    def attention_scores(self, q, k, v, scale, last=None):
        return ops.attention_scores(q, k, v, scale, last)

    def attend(self, q, view: KVView, scale: float, want_scores=False):
        """Fused split-K attention over the packed codes on GPU tensors; the composite elsewhere.

        ``want_scores`` (eviction statistics, see ``Backend.attend``) takes the composite path.
        """
        if want_scores is not False and want_scores is not None:
            return super().attend(q, view, scale, want_scores)
        if self.uses_triton(q):
            from .triton.decode_attention import attend_view

            out = attend_view(q, view, scale, self.rotate)
            if out is not None:
                return out
        return super().attend(q, view, scale)
