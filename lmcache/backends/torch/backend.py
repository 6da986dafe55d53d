"""``TorchBackend``: the Backend contract on torch tensors (CPU, CUDA, ROCm).

On CUDA and ROCm tensors quantization, dequantization and attention over the compressed
cache run as Triton kernels (``triton/``); on CPU tensors, or where Triton is missing, the
torch-only path (``ops.py``) runs. Both give the numpy reference's codes bit for bit.
``LMCACHE_TORCH_KERNELS=torch`` forces the torch-only path everywhere.
"""

from __future__ import annotations

import functools
import math
import os
import warnings
import weakref
from collections.abc import Sequence

import numpy as np
import torch

from ...quant import QuantSpec
from ..base import FLOAT_DTYPES, Backend, KVView, QuantBlock, host_dtype
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


def host_tensor(a: np.ndarray) -> torch.Tensor:
    """A tensor sharing the memory of host array ``a`` (bfloat16 through its uint16 bits); no copy."""
    bf16 = a.dtype.name == "bfloat16"
    if bf16:
        a = a.view(np.uint16)
    if a.flags.writeable:
        t = torch.from_numpy(a)
    else:  # a read-only source (a received payload): only ever read from
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            t = torch.from_numpy(a)
    return t.view(torch.bfloat16) if bf16 else t


def pack_into(arrays: Sequence[torch.Tensor], out: torch.Tensor) -> None:
    """Copy the bytes of ``arrays`` back to back (each C-ordered) into the flat ``uint8`` tensor ``out``.

    ``out`` is on the arrays' device. Arrays of one dtype and shape that recur at a fixed
    period (one layer's codes, scales and offsets, layer after layer) are gathered by one
    ``cat`` per position in the period: one kernel for a full-precision chunk (64 arrays),
    six for a quantized one, instead of one per array.
    """
    n = len(arrays)
    kinds = [(a.dtype, tuple(a.shape)) for a in arrays]
    offs, off = [], 0
    for a in arrays:
        offs.append(off)
        off += a.numel() * a.element_size()
    if off != out.numel():
        raise ValueError(f"out must hold the arrays' {off} bytes, it holds {out.numel()}")
    period = next((p for p in range(1, n) if n % p == 0 and kinds[p:] == kinds[:n - p]
                   and len({offs[j + p] - offs[j] for j in range(n - p)}) == 1), n)
    step = offs[period] - offs[0] if period < n else 0
    base = out.storage_offset()
    for r in range(period):
        members = arrays[r::period]
        dtype, shape = kinds[r]
        es = members[0].element_size()
        nb = members[0].numel() * es
        if (base + offs[r]) % es or step % es:  # unaligned for this dtype: byte copies
            for j in range(r, n, period):
                out[offs[j]:offs[j] + nb].copy_(arrays[j].contiguous().reshape(-1).view(torch.uint8))
            continue
        span = out[offs[r]:offs[r] + (len(members) - 1) * step + nb].view(dtype)
        if len(members) == 1:
            span.view(shape).copy_(members[0])
            continue
        dst = span.as_strided((len(members), *shape), (step // es, *_c_strides(shape)))
        if shape and shape[0] == 1:  # [1, H, T, D] arrays: a cat along the batch axis (one kernel)
            torch.cat(members, 0, out=dst.squeeze(1))
        else:
            torch.stack(members, 0, out=dst)


def scatter(src: torch.Tensor, sizes: list, segments, outs: list) -> None:
    """Copy the segments packed back to back in the flat ``uint8`` ``src`` into the views ``outs``.

    Where the views of one kind (dtype and shape) recur at a fixed period and sit at a fixed
    stride in one buffer (``TorchBackend.empty_many``), one copy fills all of them: one
    kernel for a full-precision chunk instead of one per segment.
    """
    n = len(outs)
    kinds = [(o.dtype, tuple(o.shape), o.stride()) for o in outs]
    offs = [0]
    for k in sizes[:-1]:
        offs.append(offs[-1] + k)
    try:
        ptrs = [o.data_ptr() for o in outs]
        stores = [o.untyped_storage().data_ptr() for o in outs]
    except RuntimeError:
        ptrs = stores = None
    period = n
    if ptrs is not None and len(set(stores)) == 1:
        period = next((p for p in range(1, n) if n % p == 0 and kinds[p:] == kinds[:n - p]
                       and len({offs[j + p] - offs[j] for j in range(n - p)}) == 1
                       and len({ptrs[j + p] - ptrs[j] for j in range(n - p)}) == 1), n)
    done = [False] * n
    if period < n:
        step, gap = offs[period] - offs[0], ptrs[period] - ptrs[0]
        for r in range(period):
            dtype, shape, stride = kinds[r]
            es = outs[r].element_size()
            if step % es or gap % es or (src.storage_offset() + offs[r]) % es:
                continue
            k = n // period
            span = src[offs[r]:offs[r] + (k - 1) * step + sizes[r]].view(dtype)
            s_view = span.as_strided((k, *shape), (step // es, *_c_strides(shape)))
            d_view = outs[r].as_strided((k, *shape), (gap // es, *stride))
            d_view.copy_(s_view)
            for j in range(r, n, period):
                done[j] = True
    rest = [j for j in range(n) if not done[j]]
    if rest:
        pieces = src.split(sizes)
        torch._foreach_copy_([outs[j] for j in rest], [_typed(pieces[j], *segments[j]) for j in rest])


def _c_strides(shape) -> tuple:
    """The element strides of a C-ordered array of ``shape``."""
    out, acc = [], 1
    for n in reversed(shape):
        out.append(acc)
        acc *= n
    return tuple(reversed(out))


def _typed(piece: torch.Tensor, dt: str, shape) -> torch.Tensor:
    """The flat ``uint8`` ``piece`` as an array of dtype name ``dt`` and ``shape`` (a view when aligned)."""
    td = ops.torch_dtype(dt)
    try:
        return piece.view(td).view(tuple(shape))
    except RuntimeError:  # an offset not a multiple of the item size: a copy
        return piece.clone().view(td).view(tuple(shape))


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
        self._streams: dict = {}  # (device, role) -> a side stream: "copy" (DMA) or "work" (gathers)
        self._busy: set = set()  # side streams with work since the last synchronize()
        self._inflight: list = []  # tensors asynchronous copies still read or write
        self._staging: list = []  # (event, buffer): device staging buffers until their last use ends

    # ------------------------------------------------------------------ description
    def devices(self) -> list[str]:
        return ["cpu"] + [f"cuda:{i}" for i in range(torch.cuda.device_count())]

    def kernel_path(self) -> str:
        if triton_available():
            mma = (" (4/8-bit K/V at head dim 128 on the integer matrix units, sm_80+, launch settings timed on "
                   "the card at the first large call; LMCACHE_AUTOTUNE=0 keeps the defaults)"
                   if gpu_vendor() == "cuda" else "")
            return (f"triton ({gpu_vendor()}) on GPU tensors: fused quantize/dequantize and split-K "
                    f"decode attention over packed codes{mma}; torch ops on CPU tensors")
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

    # ------------------------------------------------------------------ host staging (the store's tiers)
    def pins_host_memory(self) -> bool:
        """Page-locked host memory when torch sees a GPU and this backend is not bound to the CPU."""
        return torch.cuda.is_available() and (self.device is None or torch.device(self.device).type == "cuda")

    def host_buffer(self, nbytes: int) -> np.ndarray:
        """Pinned host memory (``uint8``) where a GPU is used, else touched pageable memory.

        The memory is numpy's, page-locked with ``cudaHostRegister`` and unregistered when the
        last view of it dies, so closing the pool returns it to the system (torch's own pinned
        allocator would keep it cached).
        """
        buf = super().host_buffer(nbytes)  # checked, and its pages faulted in
        if not self.pins_host_memory():
            return buf
        ptr = buf.ctypes.data
        try:
            cudart = torch.cuda.cudart()
            err = cudart.cudaHostRegister(ptr, buf.nbytes, 0)
            ok = int(getattr(err, "value", err)) == 0
        except Exception:  # noqa: BLE001 - no cudart binding in this build
            ok = False
        if not ok:  # cannot register (e.g. a locked-memory limit): torch's pinned allocator
            return torch.empty(int(nbytes), dtype=torch.uint8, pin_memory=True).numpy()
        weakref.finalize(buf, cudart.cudaHostUnregister, ptr)
        return buf

    def _side(self, t: torch.Tensor, role: str = "copy"):
        """A side stream of ``t``'s GPU, ordered after the work queued so far on the current stream.

        Two per GPU: ``"copy"`` for host transfers (the copy engine) and ``"work"`` for the
        gathers and scatters around them, so that chunk ``i``'s kernels overlap chunk
        ``i + 1``'s transfer instead of queueing behind it.
        """
        key = (t.device, role)
        s = self._streams.get(key)
        if s is None:
            s = self._streams[key] = torch.cuda.Stream(t.device)
        if s not in self._busy:
            s.wait_stream(torch.cuda.current_stream(t.device))
            self._busy.add(s)
        return s

    #: Device staging buffers in flight at most (each a chunk): bounds the memory a long put
    #: or get holds on the device, while leaving enough chunks in flight to overlap.
    STAGING = 4

    def _stage(self, nbytes: int, device, stream) -> torch.Tensor:
        """A device ``uint8`` buffer of ``nbytes`` for one chunk, allocated on ``stream``."""
        while len(self._staging) >= self.STAGING:  # wait for the oldest chunk's last use
            ev, _ = self._staging.pop(0)
            ev.synchronize()
        with torch.cuda.stream(stream):
            return torch.empty(nbytes, dtype=torch.uint8, device=device)

    def _done_with(self, buf: torch.Tensor, stream) -> None:
        """``buf``'s last use is the work queued on ``stream`` so far: free it once that ends."""
        ev = torch.cuda.Event()
        ev.record(stream)
        self._staging.append((ev, buf))

    def copy_to_host(self, src, dst: np.ndarray) -> None:
        """GPU tensor -> host ``dst`` on the side stream, asynchronous into pinned memory."""
        if isinstance(src, np.ndarray):
            np.copyto(dst, src)
            return
        if not src.is_cuda:
            host_tensor(dst).copy_(src)
            return
        with torch.cuda.stream(self._side(src)):
            host_tensor(dst).copy_(src, non_blocking=True)
        self._inflight.append(src)

    def copy_from_host(self, buf, start: int, src: np.ndarray, axis: int = 2):
        """Host ``src`` -> ``buf[start:]`` along ``axis``; on a GPU asynchronous, on the side stream."""
        dst = buf.narrow(axis, start, src.shape[axis])
        if not buf.is_cuda:
            dst.copy_(host_tensor(src))
            return buf
        with torch.cuda.stream(self._side(buf)):
            dst.copy_(host_tensor(src), non_blocking=True)
        self._inflight.append(buf)
        return buf

    def pack_to_host(self, arrays, dst: np.ndarray) -> None:
        """One gather kernel into a device staging buffer and one device-to-host copy per chunk.

        The gather runs on the "work" stream and the copy on the "copy" stream, so successive
        chunks overlap. CPU tensors are gathered straight into ``dst`` (one copy).
        """
        out = host_tensor(dst.reshape(-1).view(np.uint8))
        if not arrays or not arrays[0].is_cuda:
            pack_into(arrays, out)
            return
        dev = arrays[0].device
        work, copy = self._side(arrays[0], "work"), self._side(arrays[0], "copy")
        staging = self._stage(out.numel(), dev, work)
        with torch.cuda.stream(work):
            pack_into(arrays, staging)
        copy.wait_stream(work)
        with torch.cuda.stream(copy):
            out.copy_(staging, non_blocking=True)
        self._done_with(staging, copy)
        self._inflight += arrays

    def unpack_from_host(self, src: np.ndarray, segments, dests: list, starts, axis: int = 2) -> list:
        """One host-to-device copy per chunk into a staging buffer, then each segment into place.

        The copy runs on the "copy" stream and the scatter on the "work" stream, so successive
        chunks overlap. CPU destinations are filled straight from ``src`` (one copy).
        """
        flat = host_tensor(src.reshape(-1).view(np.uint8))
        sizes = [math.prod(shape) * host_dtype(dt).itemsize for dt, shape in segments]
        outs = [d.narrow(axis, st, shape[axis]) for d, st, (_, shape) in zip(dests, starts, segments)]
        if not dests or not dests[0].is_cuda:
            scatter(flat, sizes, segments, outs)
            return dests
        work, copy = self._side(dests[0], "work"), self._side(dests[0], "copy")
        staging = self._stage(flat.numel(), dests[0].device, copy)
        with torch.cuda.stream(copy):
            staging.copy_(flat, non_blocking=True)
        work.wait_stream(copy)
        with torch.cuda.stream(work):
            scatter(staging, sizes, segments, outs)
        self._done_with(staging, work)
        self._inflight += dests
        return dests

    def empty_many(self, specs, device=None) -> list:
        """The arrays as views of one buffer, each at a 256-byte boundary: arrays of one kind
        that recur at a fixed period then sit at a fixed stride, and ``unpack_from_host``
        fills a chunk's place in all of them with one copy."""
        dev = self._device(device)
        sizes = [math.prod(shape) * host_dtype(dt).itemsize for shape, dt in specs]
        offs, off = [], 0
        for n in sizes:
            offs.append(off)
            off += -(-n // 256) * 256
        buf = torch.empty(max(off, 1), dtype=torch.uint8, device=dev)
        return [buf[o:o + n].view(ops.torch_dtype(dt)).view(tuple(shape))
                for o, n, (shape, dt) in zip(offs, sizes, specs)]

    def pack_on_device(self, arrays):
        """The chunk as one flat ``uint8`` buffer on its device, made by one gather per segment kind."""
        total = sum(a.numel() * a.element_size() for a in arrays)
        flat = torch.empty(total, dtype=torch.uint8, device=arrays[0].device)
        pack_into(arrays, flat)
        return flat

    def unpack_packed(self, packed, segments, dests: list, starts, axis: int = 2) -> list:
        """The device tier's flat buffer into ``dests``: one copy per segment kind (see ``scatter``)."""
        if isinstance(packed, list):
            return super().unpack_packed(packed, segments, dests, starts, axis)
        sizes = [math.prod(shape) * host_dtype(dt).itemsize for dt, shape in segments]
        outs = [d.narrow(axis, st, shape[axis]) for d, st, (_, shape) in zip(dests, starts, segments)]
        scatter(packed, sizes, segments, outs)
        return dests

    def unpack_on_device(self, packed, segments) -> list:
        """Views of the flat buffer ``pack_on_device`` made, one per ``(dtype name, shape)``."""
        if isinstance(packed, list):
            return packed
        sizes = [math.prod(shape) * host_dtype(dt).itemsize for dt, shape in segments]
        return [_typed(p, dt, shape) for p, (dt, shape) in zip(packed.split(sizes), segments)]

    def synchronize(self) -> None:
        """Wait for the side streams' copies; then the tensors they used may be freed."""
        for s in self._busy:
            s.synchronize()
        self._busy.clear()
        self._inflight.clear()
        self._staging.clear()
