"""Unpack and dequantize in one pass: ``code * scale + lo`` in float32, cast to the output dtype.

Multiply and add stay two roundings (``enable_fp_fusion=False``), as in the numpy reference,
so the result is bit-identical to it.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ....quant import QuantSpec
from . import is_pow2


@triton.jit
def _round_to_bf16(x):
    # Round float32 to bfloat16 precision, ties to even, by integer arithmetic: the GPU's
    # conversion does this already, the interpreter truncates; this way both agree with torch.
    bits = x.to(tl.uint32, bitcast=True)
    bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
    return bits.to(tl.float32, bitcast=True)


@triton.jit
def _dequantize_kernel(c_ptr, s_ptr, l_ptr, o_ptr, n_tok, T,
                       D: tl.constexpr, G: tl.constexpr, AXIS_TOKENS: tl.constexpr, BITS: tl.constexpr,
                       PER: tl.constexpr, BLOCK_T: tl.constexpr):
    # One program: BLOCK_T consecutive tokens of the flattened [rows * T] axis, every channel.
    W: tl.constexpr = D // PER
    t = (tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)).to(tl.int64)
    w = tl.arange(0, W)
    i = tl.arange(0, PER)
    mt = t < n_tok
    mask = mt[:, None, None]
    b = tl.load(c_ptr + t[:, None] * W + w[None, :], mask=mt[:, None], other=0).to(tl.int32)
    c = ((b[:, :, None] >> (i * BITS)[None, None, :]) & (2 ** BITS - 1)).to(tl.float32)  # [BT, W, PER]
    ch = w[:, None] * PER + i[None, :]
    if AXIS_TOKENS:  # keys: scale [rows, T // G, D]
        row = t // T
        sidx = (row * (T // G) + (t % T) // G)[:, None, None] * D + ch[None]
    else:  # values: scale [rows * T, D // G]
        sidx = t[:, None, None] * (D // G) + (ch // G)[None]
    s = tl.load(s_ptr + sidx, mask=mask, other=1.0).to(tl.float32)
    lo = tl.load(l_ptr + sidx, mask=mask, other=0.0).to(tl.float32)
    x = c * s + lo
    if o_ptr.dtype.element_ty == tl.bfloat16:
        x = _round_to_bf16(x)
    tl.store(o_ptr + t[:, None, None] * D + ch[None], x.to(o_ptr.dtype.element_ty), mask=mask)


def supported(codes_shape: tuple, spec: QuantSpec) -> bool:
    """Whether the kernel takes packed codes of ``codes_shape`` (power-of-two head_dim)."""
    return len(codes_shape) >= 2 and is_pow2(codes_shape[-1] * spec.per_byte)


def dequantize(codes: torch.Tensor, scale: torch.Tensor, lo: torch.Tensor, spec: QuantSpec,
               dtype: torch.dtype) -> torch.Tensor:
    """Unpack uint8 ``codes`` ``[..., n, D * bits // 8]`` and reconstruct ``[..., n, D]`` of ``dtype``.

    ``scale``/``lo``: ``[..., n // g, D]`` (``spec.axis == -2``) or ``[..., n, D // g]``.
    """
    if codes.dtype != torch.uint8:
        raise TypeError(f"codes must be uint8, got {codes.dtype}")
    if not supported(tuple(codes.shape), spec):
        raise ValueError(f"the Triton dequantize kernel does not take codes of shape {tuple(codes.shape)}; "
                         f"use ops.dequantize")
    n, d = codes.shape[-2], codes.shape[-1] * spec.per_byte
    out = torch.empty(codes.shape[:-1] + (d,), dtype=dtype, device=codes.device)
    n_tok = codes.numel() // codes.shape[-1] if codes.shape[-1] else 0
    block_t = max(1, min(64, 4096 // d))
    if n_tok:
        _dequantize_kernel[(triton.cdiv(n_tok, block_t),)](
            codes.contiguous(), scale.contiguous(), lo.contiguous(), out, n_tok, n, D=d, G=spec.group_size,
            AXIS_TOKENS=spec.axis == -2, BITS=spec.bits, PER=spec.per_byte, BLOCK_T=block_t,
            num_warps=4, enable_fp_fusion=False)
    return out
