"""The quantization format, the same on every backend (see DESIGN.md).

For a group of ``g`` values ``x`` and ``b`` bits, in float32: ``lo = min(x)``,
``hi = max(x)``, ``scale = (hi - lo) / (2**b - 1)``. ``scale`` and ``lo`` are rounded to
their storage dtype (float16; float32 when the input is float32) and the codes are computed
from the stored values: ``code = clip(round_half_even((x - lo) / scale), 0, 2**b - 1)``. A
group whose stored scale is 0 gets ``scale = 1`` (and so codes 0). Reconstruction is
``code * scale + lo`` in float32, cast to the input dtype.

Codes are packed along the last axis, little end first: for 4 bits element ``2i`` is the
low nibble of byte ``i`` and ``2i+1`` the high nibble; for 2 bits element ``4i+j`` sits at
bits ``2j..2j+1``; 8-bit codes are stored as they are. So the last axis must hold a
multiple of ``8 // bits`` elements.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any

import numpy as np

BITS = (2, 4, 8)


def storage_dtype(input_dtype: str) -> str:
    """The dtype name of the stored ``scale`` and ``lo`` for input dtype name ``input_dtype``."""
    return "float32" if input_dtype in ("float32", "float64") else "float16"


@functools.lru_cache(maxsize=16)
def hadamard(n: int) -> np.ndarray:
    """The normalized Sylvester-Hadamard matrix ``H / sqrt(n)``, float32 ``[n, n]``.

    Symmetric and orthonormal: ``x @ H @ H == x``. ``n`` must be a power of two.
    """
    if n < 1 or n & (n - 1):
        raise ValueError(f"rotate needs head_dim to be a power of two, got {n}")
    h = np.ones((1, 1), dtype=np.float64)
    while h.shape[0] < n:
        h = np.block([[h, h], [h, -h]])
    out = (h / np.sqrt(n)).astype(np.float32)
    out.setflags(write=False)
    return out


@dataclass(frozen=True)
class QuantSpec:
    """How one tensor is quantized.

    ``bits``: 2, 4 or 8. ``group_size``: values per (scale, lo) pair, dividing the length
    of ``axis``. ``axis``: the grouping axis, negative (``-1``: along the last axis, as for
    values; ``-2``: along tokens per channel, as for keys). ``rotate``: the last axis is
    multiplied by the normalized Hadamard matrix before grouping.
    """

    bits: int
    group_size: int
    axis: int = -1
    rotate: bool = False

    def __post_init__(self):
        check_bits(self.bits)
        if isinstance(self.group_size, bool) or not isinstance(self.group_size, (int, np.integer)) \
                or self.group_size < 1:
            raise ValueError(f"group_size must be a positive integer, got {self.group_size!r}")
        if self.axis not in (-1, -2):
            raise ValueError(f"axis must be -1 or -2 (counted from the end), got {self.axis!r}")

    @property
    def per_byte(self) -> int:
        """How many codes one uint8 holds."""
        return 8 // self.bits

    @property
    def qmax(self) -> int:
        return (1 << self.bits) - 1


def check_bits(bits: Any) -> int:
    """Return ``bits`` if it is one of 2, 4, 8; raise a ``ValueError`` naming it otherwise."""
    if isinstance(bits, bool) or not isinstance(bits, (int, np.integer)) or int(bits) not in BITS:
        raise ValueError(f"bits must be one of 2, 4 or 8 (or None for full precision), got {bits!r}")
    return int(bits)


def check_shape(shape: tuple, spec: QuantSpec) -> None:
    """Raise a ``ValueError`` if a tensor of ``shape`` cannot be quantized with ``spec``."""
    if len(shape) < 2:
        raise ValueError(f"quantize needs an array of at least 2 dimensions, got shape {tuple(shape)}")
    n = shape[spec.axis]
    if n % spec.group_size:
        raise ValueError(
            f"group_size={spec.group_size} does not divide axis {spec.axis} of length {n} (shape {tuple(shape)})")
    if shape[-1] % spec.per_byte:
        raise ValueError(
            f"{spec.bits}-bit codes pack {spec.per_byte} to a byte along the last axis, whose length "
            f"{shape[-1]} is not a multiple of {spec.per_byte}")


@dataclass
class QuantizedTensor:
    """A quantized array: packed codes, per-group ``scale`` and ``lo``, and what restores it.

    ``codes``: uint8, the input's shape with the last axis divided by ``8 // bits``.
    ``scale``, ``lo``: the input's shape with ``spec.axis`` divided by ``group_size``.
    ``shape``/``dtype``: the original array's. All arrays are of the backend ``backend``.
    """

    codes: Any
    scale: Any
    lo: Any
    spec: QuantSpec
    shape: tuple
    dtype: str
    backend: Any

    @property
    def nbytes(self) -> int:
        """Bytes held: codes, scales and offsets."""
        b = self.backend
        return b.nbytes(self.codes) + b.nbytes(self.scale) + b.nbytes(self.lo)


def quantize(x: Any, bits: int = 4, group_size: int = 64, axis: int = -1, *, rotate: bool = False,
             backend: Any = None) -> QuantizedTensor:
    """Quantize ``x`` group-wise along ``axis`` with ``bits`` bits per value.

    ``x``: a float array (float16, bfloat16, float32 or float64) of any framework with at
    least 2 dimensions; the length of ``axis`` must be a multiple of ``group_size``.
    ``axis``: ``-1`` (or ``ndim - 1``) groups along the last axis, ``-2`` (or ``ndim - 2``)
    along the one before. ``rotate``: multiply the last axis (a power of two) by the
    normalized Hadamard matrix first. Returns a ``QuantizedTensor`` of the same framework.
    """
    from .backends import backend_of, get_backend

    be = get_backend(backend) if backend is not None else backend_of(x)
    if not be.is_array(x):
        x = be.from_numpy(np.asarray(x))
    dtype = be.dtype_name(x)
    if dtype not in ("float16", "bfloat16", "float32", "float64"):
        raise TypeError(f"quantize needs a real floating-point array, got dtype {dtype}")
    ndim = len(x.shape)
    if isinstance(axis, (int, np.integer)) and not isinstance(axis, bool) and ndim >= 2 and 0 <= axis < ndim:
        axis = axis - ndim
    spec = QuantSpec(check_bits(bits), group_size, axis, bool(rotate))
    check_shape(tuple(x.shape), spec)
    if rotate:
        hadamard(x.shape[-1])  # validates the power of two before any work
        x = be.rotate(x)
    blk = be.quantize(x, spec)
    return QuantizedTensor(blk.codes, blk.scale, blk.lo, spec, tuple(x.shape), dtype, be)


def dequantize(q: QuantizedTensor) -> Any:
    """Reconstruct the array that ``q`` encodes: same shape, dtype and framework as the input."""
    if not isinstance(q, QuantizedTensor):
        raise TypeError(f"dequantize takes a lmcache.QuantizedTensor, got {type(q).__name__}")
    from .backends.base import QuantBlock

    be = q.backend
    out = be.dequantize(QuantBlock(q.codes, q.scale, q.lo, q.spec), q.dtype)
    if q.spec.rotate:
        out = be.rotate(out)
    return out
