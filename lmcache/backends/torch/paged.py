"""The paged layout: one layer's quantized KV in a pool of fixed-size pages, reached through a block table.

A page holds ``page_size`` tokens of every KV head: packed K codes with their per-channel
scales and offsets, packed V codes with their per-token scales and offsets. A sequence is a
list of page ids (its row of the block table), so pages can be freed one by one, shared by
sequences with a common prefix (reference counts), and exported to or imported from another
tier without touching the rest of the pool. ``paged_attention`` reads the pages in place:
the fused Triton kernel on GPU tensors, a gather-dequantize-attend torch path elsewhere.
"""

from __future__ import annotations

from collections import Counter

import numpy as np
import torch

from ...quant import QuantSpec, check_bits
from . import ops
from .backend import triton_available


class PagedKVPool:
    """A pool of ``num_pages`` pages of quantized K/V for ``kv_heads`` heads of ``head_dim``.

    ``page_size``: tokens per page, a multiple of ``group_size`` (the key group).
    ``k_bits``/``v_bits``: 2, 4 or 8. Values are grouped over ``min(group_size, head_dim)``
    channels, as in ``Cache``. ``dtype``: the model's dtype (scales are float32 for float32,
    float16 otherwise). Pages are numbered ``0 .. num_pages - 1``.
    """

    def __init__(self, num_pages: int, kv_heads: int, head_dim: int, page_size: int = 256, k_bits: int = 4,
                 v_bits: int = 4, group_size: int = 64, dtype: torch.dtype = torch.float16, device=None):
        for name, val in (("num_pages", num_pages), ("kv_heads", kv_heads), ("head_dim", head_dim),
                          ("page_size", page_size), ("group_size", group_size)):
            if isinstance(val, bool) or not isinstance(val, int) or val < 1:
                raise ValueError(f"{name} must be a positive integer, got {val!r}")
        if page_size % group_size:
            raise ValueError(f"page_size={page_size} must be a multiple of group_size={group_size}")
        self.k_spec = QuantSpec(check_bits(k_bits), group_size, -2)
        self.v_spec = QuantSpec(check_bits(v_bits), min(group_size, head_dim), -1)
        for spec in (self.k_spec, self.v_spec):
            if head_dim % spec.per_byte or head_dim % self.v_spec.group_size:
                raise ValueError(f"head_dim {head_dim} must be a multiple of {spec.per_byte} and of the value "
                                 f"group {self.v_spec.group_size}")
        if dtype not in (torch.float16, torch.bfloat16, torch.float32):
            raise TypeError(f"dtype must be torch.float16, bfloat16 or float32, got {dtype}")
        self.page_size, self.kv_heads, self.head_dim, self.dtype = page_size, kv_heads, head_dim, dtype
        dev = torch.device(device if device is not None else "cpu")
        sdt = torch.float32 if dtype == torch.float32 else torch.float16
        p, h, d, g, gv = num_pages, kv_heads, head_dim, group_size, self.v_spec.group_size
        self.k_codes = torch.zeros((p, h, page_size, d // self.k_spec.per_byte), dtype=torch.uint8, device=dev)
        self.k_scale = torch.ones((p, h, page_size // g, d), dtype=sdt, device=dev)
        self.k_lo = torch.zeros((p, h, page_size // g, d), dtype=sdt, device=dev)
        self.v_codes = torch.zeros((p, h, page_size, d // self.v_spec.per_byte), dtype=torch.uint8, device=dev)
        self.v_scale = torch.ones((p, h, page_size, d // gv), dtype=sdt, device=dev)
        self.v_lo = torch.zeros((p, h, page_size, d // gv), dtype=sdt, device=dev)
        self.refcount = [0] * num_pages
        self._free = list(range(num_pages - 1, -1, -1))

    # ------------------------------------------------------------------ pages
    @property
    def num_pages(self) -> int:
        """Pages in the pool, free or not."""
        return len(self.refcount)

    @property
    def num_free(self) -> int:
        """Pages not held by any sequence."""
        return len(self._free)

    def _arrays(self) -> dict[str, torch.Tensor]:
        return {"k_codes": self.k_codes, "k_scale": self.k_scale, "k_lo": self.k_lo,
                "v_codes": self.v_codes, "v_scale": self.v_scale, "v_lo": self.v_lo}

    def allocate(self, n: int) -> list[int]:
        """Take ``n`` free pages (reference count 1); ``MemoryError`` if fewer are free."""
        if n > len(self._free):
            raise MemoryError(f"the pool has {len(self._free)} free pages, {n} were asked for")
        pages = [self._free.pop() for _ in range(n)]
        for p in pages:
            self.refcount[p] = 1
        return pages

    def share(self, pages: list[int]) -> list[int]:
        """Add a reference to each of ``pages`` (a second sequence with the same prefix); returns them."""
        self._check(pages)
        for p in pages:
            self.refcount[p] += 1
        return list(pages)

    def free(self, pages: list[int]) -> None:
        """Drop one reference to each of ``pages``; a page with none left returns to the free list."""
        self._check(pages)
        counts = Counter(pages)
        over = [p for p, c in counts.items() if c > self.refcount[p]]
        if over:  # checked up front: a double free would otherwise leave negative counts
            raise ValueError(f"pages {over[:5]} are listed more times than they are referenced (a double free)")
        for p in pages:
            self.refcount[p] -= 1
            if self.refcount[p] == 0:
                self._free.append(p)

    def _check(self, pages) -> None:
        bad = [p for p in pages if not (isinstance(p, int) and 0 <= p < self.num_pages and self.refcount[p] > 0)]
        if bad:
            raise ValueError(f"pages {bad[:5]} are not allocated pages of this pool")

    # ------------------------------------------------------------------ tokens
    def append(self, pages: list[int], length: int, k: torch.Tensor, v: torch.Tensor, quantize=None) -> int:
        """Quantize ``k``/``v`` ``[kv_heads, n, head_dim]`` into the sequence ``pages`` after ``length`` tokens.

        ``n`` and ``length`` must be multiples of ``group_size`` (whole key groups). Pages are
        allocated and appended to ``pages`` as needed. ``quantize``: a ``(x, spec) -> (codes,
        scale, lo)`` function (default: the torch-only ``ops.quantize``). Returns the new length.
        """
        h, n, d = k.shape
        g = self.k_spec.group_size
        if (h, d) != (self.kv_heads, self.head_dim) or tuple(v.shape) != tuple(k.shape):
            raise ValueError(f"k and v must be [{self.kv_heads}, n, {self.head_dim}], got {tuple(k.shape)} "
                             f"and {tuple(v.shape)}")
        if n % g or length % g:
            raise ValueError(f"append takes whole key groups: n={n} and length={length} must be multiples of {g}")
        # Checked before pages are allocated, so a refused append leaves the pool unchanged
        # (a page allocated here is never shared).
        first = length // self.page_size
        if length % self.page_size and first < len(pages) and self.refcount[pages[first]] > 1:
            raise ValueError(f"page {pages[first]} is shared by {self.refcount[pages[first]]} sequences; "
                             f"share only whole pages of a common prefix")
        need = -(-(length + n) // self.page_size) - len(pages)
        if need > 0:
            pages.extend(self.allocate(need))
        quantize = quantize or ops.quantize
        kc, ks, kl = quantize(k.to(self.dtype), self.k_spec)
        vc, vs, vl = quantize(v.to(self.dtype), self.v_spec)
        pos = 0
        while pos < n:  # page by page: a page is the unit of placement
            at = length + pos
            page, off = pages[at // self.page_size], at % self.page_size
            m = min(n - pos, self.page_size - off)
            self.k_codes[page, :, off:off + m] = kc[:, pos:pos + m]
            self.k_scale[page, :, off // g:(off + m) // g] = ks[:, pos // g:(pos + m) // g]
            self.k_lo[page, :, off // g:(off + m) // g] = kl[:, pos // g:(pos + m) // g]
            self.v_codes[page, :, off:off + m] = vc[:, pos:pos + m]
            self.v_scale[page, :, off:off + m] = vs[:, pos:pos + m]
            self.v_lo[page, :, off:off + m] = vl[:, pos:pos + m]
            pos += m
        return length + n

    def export_pages(self, pages: list[int]) -> dict[str, np.ndarray]:
        """Host copies of ``pages`` (arrays ``[len(pages), ...]``), to move them to another tier."""
        self._check(pages)
        idx = torch.as_tensor(pages, dtype=torch.int64, device=self.k_codes.device)
        return {name: a.index_select(0, idx).cpu().numpy() for name, a in self._arrays().items()}

    def import_pages(self, arrays: dict[str, np.ndarray]) -> list[int]:
        """Allocate pages and fill them from ``export_pages`` output; returns the new page ids."""
        missing = [name for name in self._arrays() if name not in arrays]
        if missing:
            raise ValueError(f"arrays lacks {', '.join(missing)}; pass what export_pages returned")
        n = arrays["k_codes"].shape[0]
        for name, a in self._arrays().items():
            if tuple(arrays[name].shape) != (n,) + tuple(a.shape[1:]):
                raise ValueError(f"arrays[{name!r}] must have shape {(n,) + tuple(a.shape[1:])}")
        pages = self.allocate(n)
        idx = torch.as_tensor(pages, dtype=torch.int64, device=self.k_codes.device)
        for name, a in self._arrays().items():
            a.index_copy_(0, idx, torch.from_numpy(np.ascontiguousarray(arrays[name])).to(a.device))
        return pages

    def dequantize_sequence(self, pages: list[int], length: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The sequence's K and V ``[kv_heads, length, head_dim]`` in the pool's dtype (torch ops)."""
        n_pages = -(-length // self.page_size)
        idx = torch.as_tensor(pages[:n_pages], dtype=torch.int64, device=self.k_codes.device)

        def side(codes, scale, lo, spec):
            # [pages, H, X, Y] -> [H, pages * X, Y]; flatten, unlike reshape(h, -1, ...), also
            # takes a sequence of no pages (length 0).
            c, s, lo_ = (a.index_select(0, idx).transpose(0, 1).flatten(1, 2) for a in (codes, scale, lo))
            return ops.dequantize(c, s, lo_, spec, self.dtype)[:, :length]

        return (side(self.k_codes, self.k_scale, self.k_lo, self.k_spec),
                side(self.v_codes, self.v_scale, self.v_lo, self.v_spec))


def block_table(seqs: list[list[int]], device=None) -> torch.Tensor:
    """The block table ``[len(seqs), max_pages]`` int32 of page lists ``seqs`` (padded with 0)."""
    width = max(1, max((len(s) for s in seqs), default=1))
    t = torch.zeros((len(seqs), width), dtype=torch.int32)
    for i, s in enumerate(seqs):
        t[i, :len(s)] = torch.as_tensor(s, dtype=torch.int32)
    return t.to(device if device is not None else "cpu")


def paged_attention(q: torch.Tensor, pool: PagedKVPool, table: torch.Tensor, lengths: torch.Tensor, scale: float,
                    k_res: torch.Tensor | None = None, v_res: torch.Tensor | None = None,
                    use_triton: bool | None = None) -> torch.Tensor:
    """Causal attention of ``q`` ``[B, Hq, L, D]`` over paged sequences plus an optional dense tail.

    Sequence ``b`` holds ``lengths[b]`` quantized tokens in pages ``table[b]`` (int32
    ``[B, max_pages]``), then the ``R`` tokens of ``k_res``/``v_res`` ``[B, Hkv, R, D]``
    (the same ``R`` for every sequence). Query ``l`` sits at position ``lengths[b] + R - L + l``.
    ``use_triton``: ``None`` picks the fused kernel for GPU tensors; ``True`` forces it (the
    tests run it under ``TRITON_INTERPRET=1``). Returns ``[B, Hq, L, D]`` in ``q``'s dtype.
    """
    b, hq, L, d = q.shape
    if d != pool.head_dim or hq % pool.kv_heads:
        raise ValueError(f"q must be [B, a multiple of {pool.kv_heads}, L, {pool.head_dim}], got {tuple(q.shape)}")
    if table.dim() != 2 or table.shape[0] != b or lengths.shape != (b,):
        raise ValueError(f"table must be [{b}, max_pages] and lengths [{b}], got {tuple(table.shape)} and "
                         f"{tuple(lengths.shape)}")
    r = 0 if k_res is None else k_res.shape[2]
    lens = [int(x) for x in lengths.tolist()]
    if min(lens) + r < L:
        raise ValueError(f"every sequence needs at least q_len={L} tokens, got lengths {lens} and R={r}")
    if use_triton is None:
        use_triton = q.is_cuda and triton_available()
    if use_triton:
        from .triton.decode_attention import paged_decode_attention

        # The kernel reads the table through a pointer: it must sit on q's device (block_table
        # builds it on the CPU by default).
        out = paged_decode_attention(q, pool, table.to(device=q.device, dtype=torch.int32).contiguous(),
                                     lengths.to(device=q.device, dtype=torch.int32).contiguous(), max(lens), scale,
                                     k_res, v_res)
        if out is not None:
            return out
    outs = []
    for i in range(b):
        k, v = pool.dequantize_sequence([int(p) for p in table[i].tolist()], lens[i])
        k, v = k[None], v[None]
        if k_res is not None:
            k = torch.cat([k, k_res[i:i + 1].to(k.dtype)], 2)
            v = torch.cat([v, v_res[i:i + 1].to(v.dtype)], 2)
        outs.append(ops.attention(q[i:i + 1], k, v, scale))
    return torch.cat(outs, 0)
