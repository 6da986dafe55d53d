"""The torch-only path: quantize, dequantize and attention in plain torch ops.

It runs on any device torch supports (the CPU path of the backend, and the fallback where
Triton cannot run) and reproduces the numpy reference bit for bit: the same float32
arithmetic in the same order, round-half-to-even, separate multiply and add.
"""

from __future__ import annotations

import torch

from ...quant import QuantSpec

DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32,
          "float64": torch.float64, "uint8": torch.uint8, "int8": torch.int8, "int32": torch.int32,
          "int64": torch.int64, "bool": torch.bool}
NAMES = {v: k for k, v in DTYPES.items()}


def torch_dtype(name: str) -> torch.dtype:
    """The torch dtype for the dtype name ``name``; ``ValueError`` for an unknown name."""
    try:
        return DTYPES[name]
    except KeyError:
        raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, got {name!r}") from None


def storage_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype of ``scale``/``lo`` for input ``x``: float32 for float32/64 input, else float16."""
    return torch.float32 if x.dtype in (torch.float32, torch.float64) else torch.float16


def pack(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack uint8 ``codes`` ``[..., D]`` (values below ``2**bits``) into uint8 ``[..., D * bits // 8]``.

    Little end first: 4-bit element ``2i`` is the low nibble of byte ``i``.
    """
    if bits == 8:
        return codes
    per = 8 // bits
    c = codes.reshape(codes.shape[:-1] + (codes.shape[-1] // per, per))
    out = c[..., 0].clone()
    for j in range(1, per):
        out |= c[..., j] << (bits * j)
    return out


def unpack(packed: torch.Tensor, bits: int) -> torch.Tensor:
    """Inverse of ``pack``: uint8 ``[..., P]`` to uint8 codes ``[..., P * 8 // bits]``."""
    if bits == 8:
        return packed
    per = 8 // bits
    shifts = torch.arange(0, 8, bits, dtype=torch.uint8, device=packed.device)
    c = (packed[..., None] >> shifts) & ((1 << bits) - 1)
    return c.reshape(packed.shape[:-1] + (packed.shape[-1] * per,))


def _grouped(x: torch.Tensor, spec: QuantSpec) -> tuple[torch.Tensor, int]:
    g = spec.group_size
    if spec.axis == -1:
        return x.reshape(x.shape[:-1] + (x.shape[-1] // g, g)), -1
    return x.reshape(x.shape[:-2] + (x.shape[-2] // g, g, x.shape[-1])), -2


def quantize(x: torch.Tensor, spec: QuantSpec) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Quantize float ``x`` ``[..., n, D]`` along ``spec.axis`` (DESIGN.md format).

    Returns ``(codes, scale, lo)``: uint8 ``[..., n, D * bits // 8]`` and two arrays of the
    storage dtype, ``[..., n // g, D]`` for ``axis=-2`` or ``[..., n, D // g]`` for ``axis=-1``.
    """
    sdtype = storage_dtype(x)
    xf = x.to(torch.float32)
    xg, ax = _grouped(xf, spec)
    lo = xg.amin(dim=ax)
    hi = xg.amax(dim=ax)
    # A tensor divisor: torch on CUDA turns division by a Python number into a multiply by its
    # reciprocal, which can differ from numpy's quotient in the last bit.
    scale_s = ((hi - lo) / torch.full_like(hi, spec.qmax)).to(sdtype)
    lo_s = lo.to(sdtype)
    scale_s = torch.where(scale_s == 0, torch.ones_like(scale_s), scale_s)
    s = scale_s.to(torch.float32).unsqueeze(ax)
    lo_f = lo_s.to(torch.float32).unsqueeze(ax)
    t = (xg - lo_f) / s
    t = torch.round(t).clamp_(0, spec.qmax)  # torch.round rounds half to even
    codes = t.to(torch.uint8).reshape(x.shape)
    return pack(codes, spec.bits), scale_s, lo_s


def dequantize(codes: torch.Tensor, scale: torch.Tensor, lo: torch.Tensor, spec: QuantSpec,
               dtype: torch.dtype) -> torch.Tensor:
    """Unpack uint8 ``codes`` and reconstruct ``code * scale + lo`` (float32) as ``dtype``, ``[..., n, D]``."""
    c = unpack(codes, spec.bits).to(torch.float32)
    cg, ax = _grouped(c, spec)
    cg = cg.mul_(scale.to(torch.float32).unsqueeze(ax))  # multiply then add: no FMA, as numpy
    cg = cg.add_(lo.to(torch.float32).unsqueeze(ax))
    return cg.reshape(c.shape).to(dtype)


def attention_scores(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float,
                     last: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Causal attention and the attention mass per key (see ``Backend.attention_scores``).

    ``q``: ``[B, Hq, L, D]``; ``k``/``v``: ``[B, Hkv, T, D]``. Returns ``(out, scores)``: ``out``
    ``[B, Hq, L, D]`` in ``q``'s dtype and float32 ``scores`` ``[B, Hkv, T]``, the probabilities
    summed over each KV head's query heads and the last ``last`` queries (all when ``None``).
    """
    b, hq, L, d = q.shape
    hkv, t = k.shape[1], k.shape[2]
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32
    qg = q.to(acc).reshape(b, hkv, hq // hkv, L, d)
    kf = k.to(acc)[:, :, None]
    vf = v.to(acc)[:, :, None]
    s = torch.matmul(qg, kf.transpose(-1, -2)) * scale  # [B, Hkv, rep, L, T]
    pos = torch.arange(t - L, t, device=q.device)[:, None]
    allowed = torch.arange(t, device=q.device)[None, :] <= pos
    s = s.masked_fill(~allowed, float("-inf"))
    p = torch.softmax(s, dim=-1)
    out = torch.matmul(p, vf).reshape(b, hq, L, d).to(q.dtype)
    n = L if last is None else min(int(last), L)
    scores = p[:, :, :, L - n:].to(torch.float64).sum(dim=(2, 3)).to(torch.float32)
    return out, scores


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    """Causal attention of the newest ``L`` tokens in float32 (see ``Backend.attention``).

    ``q``: ``[B, Hq, L, D]``; ``k``/``v``: ``[B, Hkv, T, D]``. Returns ``[B, Hq, L, D]`` in ``q``'s dtype.
    """
    return attention_scores(q, k, v, scale)[0]
