"""Quantize and pack in one pass: keys per channel over token groups, values per token.

Bit-exact with the numpy reference: float32 min/max, the scale and offset rounded to their
storage dtype before the codes are computed, the IEEE quotient ``(x - lo) / scale`` (a
reciprocal per group and one fused correction per element), and round-half-to-even through
the 1.5 * 2**23 trick (exact for the clipped range 0..255).
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from ....quant import QuantSpec
from ..ops import storage_dtype
from . import is_pow2

# Adding and subtracting 1.5 * 2**23 rounds a float32 in [0, 2**22) to the nearest integer,
# ties to even, in the float unit's own rounding mode: no libdevice call needed (the
# interpreter has none).
_RNE = tl.constexpr(12582912.0)

# Launch settings: bench/decode_attention.py tries several and reports the best. One H200, one
# layer of a 32K-token prefill (40 heads x 128, 4-bit), keys and values together, in one
# process with the previous kernels: keys with 1 warp over 64 channels 0.365 ms (2 warps over
# all 128 channels, as before, 0.391; 32 channels 0.468); the previous kernels 0.377.
# "values_tokens": tokens per values program (of head_dim 128; scaled to keep its element
# count). Later, by the do_bench-style timer: values with 4 warps over 32 tokens 0.138 ms, 8 over
# 64 0.137, 2 over 32 0.142, 4 over 16 0.156; streaming cache hints (evict-first loads, ``.cs``
# stores) made keys and values together slower (0.293 against 0.285) and were dropped.
CONFIG = {"keys_warps": 1, "keys_channels": 64, "values_warps": 4, "values_tokens": 32}


@triton.jit
def _round_codes(x, lo, scale, inv, QMAX: tl.constexpr):
    # (x - lo) / scale, correctly rounded without a division per element: q0 = a * (1/scale)
    # is within an ulp, and one fused correction step makes it the IEEE quotient (Markstein's
    # theorem, given inv = RN(1/scale)).
    a = x - lo
    q0 = a * inv
    t = tl.fma(tl.fma(-q0, scale, a), inv, q0)
    t = tl.minimum(tl.maximum(t, 0.0), QMAX)  # clip first: equal to clip(round(t)) and keeps t small
    # t + 1.5 * 2**23 rounds to an integer (ties to even) that sits in the low mantissa bits.
    return (t + _RNE).to(tl.int32, bitcast=True) & 0xFF


@triton.jit
def _pair(codes, N: tl.constexpr, C: tl.constexpr, SH: tl.constexpr):
    """[N, C] -> [N, C // 2]: element 2i | element 2i + 1 << SH, splitting an axis of two in the thread."""
    even, odd = tl.split(tl.reshape(codes, [N, C // 2, 2]))
    return even | (odd << SH)


@triton.jit
def _pack(codes, N: tl.constexpr, C: tl.constexpr, BITS: tl.constexpr, PER: tl.constexpr):
    """int32 codes [N, C] packed along C, little-end first: [N, C // PER].

    PER = 1, 2 or 4 fills bytes; PER = 32 // BITS fills int32 words, the same bytes in memory
    (little-endian) stored with a quarter of the store instructions. Neighbouring channels are
    joined first, then pairs of pairs, each by splitting an axis of two that stays inside the
    thread (no exchange between threads).
    """
    out = codes
    if PER >= 2:
        out = _pair(out, N, C, BITS)
    if PER >= 4:
        out = _pair(out, N, C // 2, 2 * BITS)
    if PER >= 8:
        out = _pair(out, N, C // 4, 4 * BITS)
    if PER >= 16:
        out = _pair(out, N, C // 8, 8 * BITS)
    return out


@triton.jit
def _quantize_keys_kernel(x_ptr, c_ptr, s_ptr, l_ptr, T,
                          D: tl.constexpr, G: tl.constexpr, BITS: tl.constexpr, PER: tl.constexpr,
                          DC: tl.constexpr):
    # One program: one row (batch * head), one group of G tokens and DC of the D channels. The
    # tile is read as [G, DC], contiguous runs of each row, and packed by splitting the channel axis.
    row = tl.program_id(0).to(tl.int64)
    grp = tl.program_id(1)
    c0 = tl.program_id(2) * DC
    W: tl.constexpr = D // PER
    t = grp * G + tl.arange(0, G)
    ch = c0 + tl.arange(0, DC)
    x = tl.load(x_ptr + row * T * D + t[:, None] * D + ch[None, :]).to(tl.float32)
    lo = tl.min(x, axis=0)
    hi = tl.max(x, axis=0)
    sdt = s_ptr.dtype.element_ty
    scale = tl.math.div_rn(hi - lo, tl.zeros_like(hi) + (2 ** BITS - 1)).to(sdt)  # IEEE division
    scale = tl.where(scale == 0, 1.0, scale.to(tl.float32)).to(sdt)
    lo_s = lo.to(sdt)
    sf = scale.to(tl.float32)
    inv = tl.math.div_rn(tl.zeros_like(sf) + 1.0, sf)
    codes = _round_codes(x, lo_s.to(tl.float32)[None], sf[None], inv[None], 2 ** BITS - 1)
    packed = _pack(codes, G, DC, BITS, PER)  # [G, DC // PER]: channel 2i is the low nibble of byte i
    w = c0 // PER + tl.arange(0, DC // PER)
    tl.store(c_ptr + row * T * W + t[:, None] * W + w[None, :], packed.to(c_ptr.dtype.element_ty))
    soff = row * (T // G) * D + grp * D + ch
    tl.store(s_ptr + soff, scale)
    tl.store(l_ptr + soff, lo_s)


@triton.jit
def _quantize_values_kernel(x_ptr, c_ptr, s_ptr, l_ptr, n_tok,
                            D: tl.constexpr, G: tl.constexpr, BITS: tl.constexpr, PER: tl.constexpr,
                            BLOCK_T: tl.constexpr):
    # One program: BLOCK_T tokens (of all rows flattened), every channel group.
    NG: tl.constexpr = D // G
    WG: tl.constexpr = G // PER
    t = (tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)).to(tl.int64)
    g = tl.arange(0, NG)
    mask_t = t < n_tok
    ch = g[:, None] * G + tl.arange(0, G)[None, :]  # [NG, G]: whole contiguous rows
    x = tl.load(x_ptr + t[:, None, None] * D + ch[None], mask=mask_t[:, None, None], other=0.0).to(tl.float32)
    lo = tl.min(x, axis=2)                                                # [BLOCK_T, NG]
    hi = tl.max(x, axis=2)
    sdt = s_ptr.dtype.element_ty
    scale = tl.math.div_rn(hi - lo, tl.zeros_like(hi) + (2 ** BITS - 1)).to(sdt)
    scale = tl.where(scale == 0, 1.0, scale.to(tl.float32)).to(sdt)
    lo_s = lo.to(sdt)
    sf = scale.to(tl.float32)
    inv = tl.math.div_rn(tl.zeros_like(sf) + 1.0, sf)
    codes = _round_codes(x, lo_s.to(tl.float32)[:, :, None], sf[:, :, None], inv[:, :, None], 2 ** BITS - 1)
    packed = tl.reshape(_pack(tl.reshape(codes, [BLOCK_T * NG, G]), BLOCK_T * NG, G, BITS, PER),
                        [BLOCK_T, NG, WG])
    w = tl.arange(0, WG)
    coff = t[:, None, None] * (D // PER) + g[None, :, None] * WG + w[None, None, :]
    tl.store(c_ptr + coff, packed.to(c_ptr.dtype.element_ty), mask=mask_t[:, None, None])
    soff = t[:, None] * NG + g[None, :]
    tl.store(s_ptr + soff, scale, mask=mask_t[:, None])
    tl.store(l_ptr + soff, lo_s, mask=mask_t[:, None])


def supported(shape: tuple, spec: QuantSpec) -> bool:
    """Whether the kernels take this shape (power-of-two head_dim and group); else use ``ops``."""
    d = shape[-1]
    g = spec.group_size
    if len(shape) < 2 or not (is_pow2(d) and is_pow2(g)) or d % spec.per_byte:
        return False
    if spec.axis == -2:
        return shape[-2] % g == 0 and g * d <= 1 << 15
    return g <= d and g % spec.per_byte == 0


def quantize(x: torch.Tensor, spec: QuantSpec) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Quantize and pack float ``x`` ``[..., n, D]`` along ``spec.axis`` (see ``ops.quantize``).

    Returns ``(codes, scale, lo)``, the same arrays as ``ops.quantize``, contiguous.
    Raises ``ValueError`` for a shape ``supported`` rejects.
    """
    shape = tuple(x.shape)
    if not supported(shape, spec):
        raise ValueError(f"the Triton quantize kernel does not take shape {shape} with {spec}; use ops.quantize")
    if x.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise TypeError(f"x must be float16, bfloat16 or float32, got {x.dtype}")
    n, d = shape[-2], shape[-1]
    g, per = spec.group_size, spec.per_byte
    lead = shape[:-2]
    rows = math.prod(lead)
    xc = x.contiguous()
    sdt = storage_dtype(x)
    codes = torch.empty(lead + (n, d // per), dtype=torch.uint8, device=x.device)
    # Whole int32 words where a packed row (keys) or group (values) fills them: the same bytes.
    whole = (d if spec.axis == -2 else g) * spec.bits % 32 == 0
    out = codes.view(torch.int32) if whole and codes.numel() else codes
    per = 32 // spec.bits if out is not codes else per
    if spec.axis == -2:
        sshape = lead + (n // g, d)
        scale = torch.empty(sshape, dtype=sdt, device=x.device)
        lo = torch.empty(sshape, dtype=sdt, device=x.device)
        # A program takes DC channels: fewer registers per program, more programs in flight.
        dc = max(min(d, CONFIG["keys_channels"]), per)
        if rows and n:
            _quantize_keys_kernel[(rows, n // g, d // dc)](xc, out, scale, lo, n, D=d, G=g, BITS=spec.bits, PER=per,
                                                           DC=dc, num_warps=CONFIG["keys_warps"],
                                                           enable_fp_fusion=False)
    else:
        sshape = lead + (n, d // g)
        scale = torch.empty(sshape, dtype=sdt, device=x.device)
        lo = torch.empty(sshape, dtype=sdt, device=x.device)
        n_tok = rows * n
        # CONFIG["values_tokens"] at head_dim 128 (4096 elements): enough bytes in flight per SM
        # to stream at bandwidth.
        block_t = max(1, min(64, CONFIG["values_tokens"] * 128 // d))
        if n_tok:
            _quantize_values_kernel[(triton.cdiv(n_tok, block_t),)](
                xc, out, scale, lo, n_tok, D=d, G=g, BITS=spec.bits, PER=per, BLOCK_T=block_t,
                num_warps=CONFIG["values_warps"], enable_fp_fusion=False)
    return codes, scale, lo
