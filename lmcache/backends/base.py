"""The Backend contract: every array operation the backend-neutral core needs.

The core (cache, quant, calibrate, store, policies) never touches a framework. It holds
arrays of the backend's own type and calls the methods below. A backend implements the
abstract methods; the concrete ones are composites that a backend may override with a
faster path (a fused kernel, for instance).

Shapes follow the cache: ``[batch, heads, tokens, head_dim]``. Dtypes are named by
strings (``"float16"``, ``"bfloat16"``, ``"float32"``, ``"uint8"``, ...), never by a
framework's dtype objects, so the core can reason about them.
"""

from __future__ import annotations

import abc
import functools
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..quant import QuantSpec, hadamard

Array = Any  # an array of the backend's framework

#: The float dtypes a cache accepts, when the backend has them.
FLOAT_DTYPES = ("float16", "bfloat16", "float32")


@functools.cache
def host_dtype(name: str) -> np.dtype:
    """The numpy dtype of the dtype name ``name`` (``bfloat16`` through ``ml_dtypes``)."""
    if name == "bfloat16":
        import ml_dtypes

        return np.dtype(ml_dtypes.bfloat16)
    return np.dtype(name)


@dataclass
class QuantBlock:
    """One quantized span of a K or V tensor, in the DESIGN.md format.

    ``codes``: uint8 ``[B, H, T, D * bits // 8]`` (packed along head_dim).
    ``scale``/``lo``: ``[B, H, T // group, D]`` for keys (``axis=-2``),
    ``[B, H, T, D // group]`` for values (``axis=-1``); float16, or float32 for float32 input.
    """

    codes: Array
    scale: Array
    lo: Array
    spec: QuantSpec


@dataclass
class KVView:
    """What attention reads for one group of KV heads of one layer.

    ``k_blocks``/``v_blocks``: the quantized spans oldest first (each a ``QuantBlock``, or
    a plain ``[B, H, T_i, D]`` array where that side is kept in full precision), covering
    ``n_quant`` tokens in all. ``k_res``/``v_res``: the full-precision residual
    ``[B, H, R, D]`` (or ``None``). ``rotate_k``/``rotate_v``: whether the stored side is in
    the Hadamard-rotated space. ``dtype``: the dtype name of the cache's input.
    """

    k_blocks: list = field(default_factory=list)
    v_blocks: list = field(default_factory=list)
    n_quant: int = 0
    k_res: Array | None = None
    v_res: Array | None = None
    rotate_k: bool = False
    rotate_v: bool = False
    dtype: str = "float32"


class Backend(abc.ABC):
    """One array framework (and device) the cache runs on.

    Subclasses set ``name`` and import their framework in ``__init__`` (never at module
    import), so that ``import lmcache`` costs nothing.
    """

    name: str = "base"
    #: The ``pip install`` extra that brings the framework.
    extra: str = ""

    def __init__(self, device: str | None = None):
        self.device = device

    # ------------------------------------------------------------------ description
    @abc.abstractmethod
    def devices(self) -> list[str]:
        """The devices this backend can place arrays on, e.g. ``["cpu", "cuda:0"]``."""

    def kernel_path(self) -> str:
        """A short sentence saying which code runs quantization and attention."""
        return "composite ops (no fused kernels)"

    def has_accelerator(self) -> bool:
        """Whether this backend sees a GPU or other accelerator (used by ``"auto"``)."""
        return False

    def supports_dtype(self, dtype: str) -> bool:
        """Whether arrays of the dtype name ``dtype`` can be created on this backend."""
        return dtype in FLOAT_DTYPES

    # ------------------------------------------------------------------ arrays
    @abc.abstractmethod
    def is_array(self, x: Any) -> bool:
        """Whether ``x`` is an array of this backend's framework."""

    @abc.abstractmethod
    def dtype_name(self, x: Array) -> str:
        """The dtype of ``x`` as a string (``"float16"``, ``"bfloat16"``, ``"uint8"``...)."""

    @abc.abstractmethod
    def device_of(self, x: Array) -> str:
        """The device ``x`` lives on, as a string (``"cpu"``, ``"cuda:0"``...)."""

    @abc.abstractmethod
    def to_numpy(self, x: Array) -> np.ndarray:
        """Copy ``x`` to a host numpy array (bfloat16 becomes float32)."""

    @abc.abstractmethod
    def from_numpy(self, a: np.ndarray, dtype: str | None = None, device: str | None = None) -> Array:
        """Make a backend array from numpy ``a``, cast to ``dtype`` and placed on ``device``."""

    @abc.abstractmethod
    def empty(self, shape: Sequence[int], dtype: str, device: str | None = None) -> Array:
        """An uninitialised array of ``shape`` and dtype name ``dtype``."""

    @abc.abstractmethod
    def cast(self, x: Array, dtype: str) -> Array:
        """``x`` converted to the dtype name ``dtype`` (no copy when it already is)."""

    @abc.abstractmethod
    def concat(self, xs: Sequence[Array], axis: int) -> Array:
        """Concatenate ``xs`` along ``axis``."""

    @abc.abstractmethod
    def write(self, buf: Array, start: int, value: Array, axis: int = 2) -> Array:
        """Write ``value`` into ``buf`` at ``start`` along ``axis``; return the buffer.

        Frameworks with immutable arrays return a new array; callers always keep the result.
        """

    @abc.abstractmethod
    def matmul(self, a: Array, b: Array) -> Array:
        """Batched matrix product ``a @ b`` with broadcasting over leading axes."""

    @abc.abstractmethod
    def nbytes(self, x: Array) -> int:
        """Bytes held by ``x``'s elements."""

    @abc.abstractmethod
    def take(self, x: Array, index: Sequence[int], axis: int) -> Array:
        """``x`` at positions ``index`` (a list of ints) along ``axis``, e.g. a plan's head group."""

    # ------------------------------------------------------------------ eviction
    @abc.abstractmethod
    def topk(self, x: Array, k: int) -> Array:
        """Indices (int64) of the ``k`` largest entries of ``x`` along its last axis, ascending.

        Ties go to the lower index, so every backend keeps the same tokens.
        """

    @abc.abstractmethod
    def gather(self, x: Array, index: Array, axis: int) -> Array:
        """``take_along_axis(x, index, axis)``: per-row selection, e.g. kept tokens per head."""

    # ------------------------------------------------------------------ transfers
    def to_host(self, x: Array) -> np.ndarray:
        """Copy to host memory (for the host, disk and remote tiers)."""
        return self.to_numpy(x)

    def to_device(self, a: np.ndarray, dtype: str | None = None, device: str | None = None) -> Array:
        """Copy host ``a`` onto ``device`` (default: this backend's device)."""
        return self.from_numpy(a, dtype, device if device is not None else self.device)

    # ------------------------------------------------------------------ host staging (the store's tiers)
    # The store keeps chunks (lists of arrays, "segments") in one host pool and on the device.
    # These hooks move a chunk between the backend's arrays and host memory with as few copies
    # as the framework allows. Copies may run asynchronously: the destination (and the host
    # source) must not be read or changed until ``synchronize()`` returns. The defaults are
    # correct for every backend and copy once per array; accelerator backends override them.

    def pins_host_memory(self) -> bool:
        """Whether ``host_buffer`` returns page-locked memory (fast, asynchronous device copies)."""
        return False

    def host_buffer(self, nbytes: int) -> np.ndarray:
        """``nbytes`` of host memory as a numpy ``uint8`` array, every page already faulted in.

        Touching the pages once here (not during the first copies into it) keeps page faults
        out of later copies; a backend with a device overrides this with pinned memory.
        """
        if isinstance(nbytes, bool) or not isinstance(nbytes, (int, np.integer)) or nbytes < 1:
            raise ValueError(f"nbytes must be a positive number of bytes, got {nbytes!r}")
        buf = np.empty(int(nbytes), np.uint8)
        buf.fill(0)
        return buf

    def copy_to_host(self, src: Array, dst: np.ndarray) -> None:
        """Copy ``src`` into the host array ``dst`` (same shape and dtype). May be asynchronous."""
        np.copyto(dst, src if isinstance(src, np.ndarray) else self.to_host(src), casting="same_kind")

    def copy_from_host(self, buf: Array, start: int, src: np.ndarray, axis: int = 2) -> Array:
        """Write host ``src`` into ``buf`` at ``start`` along ``axis``; return the buffer (see ``write``).

        May be asynchronous: ``src`` must stay unchanged until ``synchronize()``.
        """
        if isinstance(buf, np.ndarray):  # host arrays: one copy, no backend round trip
            np.copyto(buf[(slice(None),) * (axis % buf.ndim) + (slice(start, start + src.shape[axis]),)], src,
                      casting="same_kind")
            return buf
        return self.write(buf, start, self.from_numpy(src, None, self.device_of(buf)), axis)

    def pack_to_host(self, arrays: Sequence[Array], dst: np.ndarray) -> None:
        """The bytes of ``arrays`` back to back (each C-ordered) into host ``uint8`` ``dst``. May be asynchronous.

        ``dst`` holds exactly ``sum(nbytes(a))`` bytes; this is the payload layout of a stored chunk.
        """
        flat = dst.reshape(-1).view(np.uint8)
        sizes = [self.nbytes(a) for a in arrays]
        if sum(sizes) != flat.nbytes:
            raise ValueError(f"dst must hold the arrays' {sum(sizes)} bytes, it holds {flat.nbytes}")
        off = 0
        for a, n in zip(arrays, sizes):
            self.copy_to_host(a, flat[off:off + n].view(host_dtype(self.dtype_name(a))).reshape(tuple(a.shape)))
            off += n

    def unpack_from_host(self, src: np.ndarray, segments: Sequence[tuple], dests: list, starts: Sequence[int],
                         axis: int = 2) -> list:
        """Copy a packed chunk out of host memory into the arrays ``dests``; return them (see ``write``).

        ``src``: ``uint8``, the segments back to back (what ``pack_to_host`` writes);
        ``segments``: ``(dtype name, shape)`` of each; segment ``j`` goes into ``dests[j]`` at
        ``starts[j]`` along ``axis``. May be asynchronous: ``src`` must stay unchanged until
        ``synchronize()``. Frameworks with immutable arrays return new arrays.
        """
        flat, off, out = src.reshape(-1).view(np.uint8), 0, list(dests)
        for j, (dt, shape) in enumerate(segments):
            dtype = host_dtype(dt)
            n = math.prod(shape) * dtype.itemsize
            out[j] = self.copy_from_host(out[j], starts[j], flat[off:off + n].view(dtype).reshape(tuple(shape)), axis)
            off += n
        return out

    def empty_many(self, specs: Sequence[tuple], device: str | None = None) -> list:
        """Uninitialised arrays, one per ``(shape, dtype name)`` of ``specs``, to receive chunks.

        The default allocates each; a backend may carve them out of one buffer, so that
        ``unpack_from_host`` fills a chunk's place in all of them with few copies.
        """
        return [self.empty(shape, dt, device) for shape, dt in specs]

    def pack_on_device(self, arrays: Sequence[Array]):
        """A private copy of a chunk's ``arrays`` where they are (the store's device tier).

        Opaque to the caller: ``unpack_on_device`` gives the arrays back. The default copies
        each array; a backend may keep the chunk as one buffer made in one copy.
        """
        return [self.concat([a], axis=0) for a in arrays]  # concat of one array is a copy everywhere

    def unpack_on_device(self, packed, segments: Sequence[tuple]) -> list:
        """The arrays (``(dtype name, shape)`` each, in order) of what ``pack_on_device`` returned: views, no copy."""
        return list(packed)

    def unpack_packed(self, packed, segments: Sequence[tuple], dests: list, starts: Sequence[int],
                      axis: int = 2) -> list:
        """Copy a chunk kept by ``pack_on_device`` into ``dests`` (as ``unpack_from_host`` does); return them."""
        out = list(dests)
        for j, a in enumerate(self.unpack_on_device(packed, segments)):
            out[j] = self.write(out[j], starts[j], a, axis)
        return out

    def synchronize(self) -> None:  # noqa: B027 - a no-op by default, not abstract
        """Wait until every copy the hooks above started has finished (a no-op where copies are synchronous)."""


    # ------------------------------------------------------------------ quantization
    @abc.abstractmethod
    def quantize(self, x: Array, spec: QuantSpec) -> QuantBlock:
        """Quantize and pack ``x`` (float ``[..., n, D]``) along ``spec.axis`` (DESIGN.md format).

        Rotation is not applied here: ``spec.rotate`` is handled by the caller.
        """

    @abc.abstractmethod
    def dequantize(self, q: QuantBlock, dtype: str) -> Array:
        """Unpack and dequantize ``q`` to an array of dtype name ``dtype``, shape ``[..., n, D]``."""

    def rotate(self, x: Array) -> Array:
        """``x @ H`` with the normalized Sylvester-Hadamard matrix over the last axis.

        ``H`` is symmetric and orthonormal, so the same call undoes it. Computed in float32.
        """
        d, dev = x.shape[-1], self.device_of(x)
        cache = self.__dict__.setdefault("_hadamard_cache", {})  # one upload per (head_dim, device)
        if (d, dev) not in cache:
            cache[(d, dev)] = self.from_numpy(hadamard(d), "float32", dev)
        return self.cast(self.matmul(self.cast(x, "float32"), cache[(d, dev)]), self.dtype_name(x))

    # ------------------------------------------------------------------ attention
    @abc.abstractmethod
    def attention(self, q: Array, k: Array, v: Array, scale: float) -> Array:
        """Plain causal attention of the newest ``L`` tokens, in float32 accumulation.

        ``q``: ``[B, Hq, L, D]``; ``k``/``v``: ``[B, Hkv, T, D]`` with ``Hq % Hkv == 0``
        (query head ``h`` reads KV head ``h // (Hq // Hkv)``) and ``L <= T``. Query ``i``
        sits at position ``T - L + i`` and sees tokens ``0..T - L + i``. Returns
        ``[B, Hq, L, D]`` in ``q``'s dtype.
        """

    def dequantize_view(self, view: KVView) -> tuple[Array, Array]:
        """The whole K and V of ``view`` as ``[B, H, T, D]`` arrays of ``view.dtype``.

        Rotated sides are rotated back, so the result is in the model's space.
        """
        ks = [b if not isinstance(b, QuantBlock) else self.dequantize(b, view.dtype) for b in view.k_blocks]
        vs = [b if not isinstance(b, QuantBlock) else self.dequantize(b, view.dtype) for b in view.v_blocks]
        if view.k_res is not None:
            ks.append(view.k_res)
            vs.append(view.v_res)
        k = ks[0] if len(ks) == 1 else self.concat(ks, axis=2)
        v = vs[0] if len(vs) == 1 else self.concat(vs, axis=2)
        if view.rotate_k:
            k = self.rotate(k)
        if view.rotate_v:
            v = self.rotate(v)
        return k, v

    def attention_scores(self, q: Array, k: Array, v: Array, scale: float, last: int | None = None):
        """``attention`` plus the attention mass each key received: returns ``(out, scores)``.

        ``out`` is what ``attention`` returns. ``scores``: float32 ``[B, Hkv, T]``, the
        softmax probabilities summed over the ``Hq // Hkv`` query heads of each KV head and
        over the last ``last`` queries (every query when ``last`` is ``None`` or ``>= L``);
        what eviction policies accumulate. This default goes through numpy on the host
        (correct everywhere, slow on accelerators); backends override it with their own ops.
        """
        out, scores = attention_scores_numpy(self.to_numpy(q), self.to_numpy(k), self.to_numpy(v), scale, last)
        dev = self.device_of(q)
        return self.from_numpy(out, self.dtype_name(q), dev), self.from_numpy(scores, "float32", dev)

    def attend(self, q: Array, view: KVView, scale: float, want_scores: bool | int = False):
        """Causal attention of ``q`` (``[B, Hq, L, D]``) over the compressed ``view``.

        The reference composite: dequantize, then ``attention``. Backends with a fused
        kernel override this to read the packed codes in place. ``want_scores``: ``False``
        returns the output alone; ``True`` (every query) or an int ``n`` (the last ``n``
        queries) returns ``(out, scores)`` with ``scores`` float32 ``[B, Hkv, T]`` aligned
        with the view's tokens (see ``attention_scores``). An override that cannot produce
        scores from its kernel falls back to this composite when ``want_scores`` is set.
        """
        k, v = self.dequantize_view(view)
        if want_scores is False or want_scores is None:
            return self.attention(q, k, v, scale)
        return self.attention_scores(q, k, v, scale, None if want_scores is True else int(want_scores))

    @staticmethod
    def default_scale(head_dim: int) -> float:
        return 1.0 / math.sqrt(head_dim)


def attention_scores_numpy(q: np.ndarray, k: np.ndarray, v: np.ndarray, scale: float, last: int | None = None):
    """Causal attention in numpy (float32, float64 for float64 input) and the attention mass per key.

    ``q``: ``[B, Hq, L, D]``; ``k``/``v``: ``[B, Hkv, T, D]``. Returns ``(out, scores)``:
    ``out`` ``[B, Hq, L, D]`` in ``q``'s dtype (what ``NumpyBackend.attention`` returns, bit for
    bit) and ``scores`` float32 ``[B, Hkv, T]``, the probabilities summed over the query heads
    of each KV head and the last ``last`` queries (all when ``None``).
    """
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
    out = np.matmul(p, vf).reshape(b, hq, L, d).astype(q.dtype)
    n = L if last is None else min(int(last), L)
    scores = p[:, :, :, L - n:].sum(axis=(2, 3), dtype=np.float64).astype(np.float32)
    return out, scores
