"""The storage of one layer's KV for a set of KV heads that share their bit-widths.

Tokens arrive in a full-precision residual; once it holds ``residual + group_size`` tokens
or more, its oldest whole key groups are quantized into a block (keys per channel over
``group_size`` tokens, values per token over ``min(group_size, head_dim)`` channels). Blocks
are kept oldest first and merged like a binary counter (two neighbours of equal size become
one), so a long decode holds O(log n) blocks and copies each token O(log n) times.

With ``fp_sinks > 0`` the first ``fp_sinks`` tokens of the sequence are kept apart in full
precision (and out of every quantization group), ahead of the blocks: attention-sink tokens
take most of the attention mass in many heads, and a sink inside a key group both suffers
and causes large errors (its channels widen the group's range).
"""

from __future__ import annotations

from dataclasses import dataclass

from .backends.base import Backend, KVView, QuantBlock
from .plan import heads_by_bits
from .quant import QuantSpec, hadamard

#: ``rotate=`` values -> (rotate keys, rotate values).
ROTATE = {False: (False, False), None: (False, False), True: (True, True), "kv": (True, True),
          "k": (True, False), "v": (False, True)}


@dataclass(frozen=True)
class GroupConfig:
    """Bits and grouping for one head group. ``None`` bits keep that side in full precision."""

    k_bits: int | None
    v_bits: int | None
    group_size: int
    head_dim: int
    residual: int
    rotate_k: bool = False
    rotate_v: bool = False
    fp_sinks: int = 0

    @property
    def k_spec(self) -> QuantSpec | None:
        return None if self.k_bits is None else QuantSpec(self.k_bits, self.group_size, -2, self.rotate_k)

    @property
    def v_spec(self) -> QuantSpec | None:
        return None if self.v_bits is None else QuantSpec(self.v_bits, min(self.group_size, self.head_dim), -1,
                                                           self.rotate_v)


def _tokens(x) -> int:
    return x.codes.shape[2] if isinstance(x, QuantBlock) else x.shape[2]


class HeadGroupKV:
    """Quantized blocks plus full-precision residual for KV heads ``heads`` of one layer."""

    def __init__(self, be: Backend, heads: list[int], cfg: GroupConfig, dtype: str):
        self.be, self.heads, self.cfg, self.dtype = be, heads, cfg, dtype
        self.k_blocks: list = []
        self.v_blocks: list = []
        self.n_quant = 0
        self.k_res = None
        self.v_res = None
        self.k_sink = None  # the first cfg.fp_sinks tokens, full precision (None when fp_sinks == 0)
        self.v_sink = None

    @property
    def n_res(self) -> int:
        return 0 if self.k_res is None else self.k_res.shape[2]

    @property
    def n_sink(self) -> int:
        return 0 if self.k_sink is None else self.k_sink.shape[2]

    @property
    def seq_len(self) -> int:
        return self.n_sink + self.n_quant + self.n_res

    def appended(self, k, v) -> HeadGroupKV:
        """A copy of this state with ``k``/``v`` (``[B, H, T, D]``, H = len(heads)) appended.

        The receiver is not modified, so a failure leaves the cache as it was.
        """
        be, cfg = self.be, self.cfg
        if cfg.rotate_k:
            k = be.rotate(k)
        if cfg.rotate_v:
            v = be.rotate(v)
        new = HeadGroupKV(be, self.heads, cfg, self.dtype)
        new.k_blocks, new.v_blocks, new.n_quant = list(self.k_blocks), list(self.v_blocks), self.n_quant
        new.k_sink, new.v_sink = self.k_sink, self.v_sink
        if self.n_sink < cfg.fp_sinks:  # still filling the sinks: nothing has reached the residual yet
            take = min(cfg.fp_sinks - self.n_sink, k.shape[2])
            ks, vs = k[:, :, :take], v[:, :, :take]
            new.k_sink = ks if self.k_sink is None else be.concat([self.k_sink, ks], axis=2)
            new.v_sink = vs if self.v_sink is None else be.concat([self.v_sink, vs], axis=2)
            k, v = k[:, :, take:], v[:, :, take:]
            if not k.shape[2]:
                new.k_res, new.v_res = self.k_res, self.v_res
                return new
        k_res = k if self.k_res is None else be.concat([self.k_res, k], axis=2)
        v_res = v if self.v_res is None else be.concat([self.v_res, v], axis=2)
        n = k_res.shape[2]
        g = cfg.group_size
        n_flush = (n - cfg.residual) // g * g if n >= cfg.residual + g else 0
        if n_flush:
            kq, vq = k_res[:, :, :n_flush], v_res[:, :, :n_flush]
            new._push(kq if cfg.k_spec is None else be.quantize(kq, cfg.k_spec),
                      vq if cfg.v_spec is None else be.quantize(vq, cfg.v_spec))
            new.n_quant += n_flush
            k_res, v_res = k_res[:, :, n_flush:], v_res[:, :, n_flush:]
        new.k_res, new.v_res = (k_res, v_res) if k_res.shape[2] else (None, None)
        return new

    def _push(self, kb, vb) -> None:
        self.k_blocks.append(kb)
        self.v_blocks.append(vb)
        while len(self.k_blocks) >= 2 and _tokens(self.k_blocks[-2]) <= _tokens(self.k_blocks[-1]):
            kb, vb = self.k_blocks.pop(), self.v_blocks.pop()
            self.k_blocks[-1] = self._merge(self.k_blocks[-1], kb)
            self.v_blocks[-1] = self._merge(self.v_blocks[-1], vb)

    def _merge(self, a, b):
        cat = self.be.concat
        if isinstance(a, QuantBlock):
            return QuantBlock(cat([a.codes, b.codes], 2), cat([a.scale, b.scale], 2), cat([a.lo, b.lo], 2), a.spec)
        return cat([a, b], 2)

    def view(self) -> KVView:
        """What attention reads (see ``KVView``)."""
        if self.k_sink is not None:
            return KVView([self.k_sink, *self.k_blocks], [self.v_sink, *self.v_blocks], self.n_sink + self.n_quant,
                          self.k_res, self.v_res, self.cfg.rotate_k, self.cfg.rotate_v, self.dtype)
        return KVView(list(self.k_blocks), list(self.v_blocks), self.n_quant, self.k_res, self.v_res,
                      self.cfg.rotate_k, self.cfg.rotate_v, self.dtype)

    @property
    def nbytes(self) -> int:
        """Bytes held: packed codes, scales, offsets, full-precision blocks and residual."""
        nb = self.be.nbytes
        total = 0
        for blk in self.k_blocks + self.v_blocks:
            total += nb(blk.codes) + nb(blk.scale) + nb(blk.lo) if isinstance(blk, QuantBlock) else nb(blk)
        if self.k_res is not None:
            total += nb(self.k_res) + nb(self.v_res)
        if self.k_sink is not None:
            total += nb(self.k_sink) + nb(self.v_sink)
        return total


def whole_kv(be: Backend, groups: list[HeadGroupKV]):
    """The whole K and V ``[B, H, T, D]`` of one layer's head ``groups``, heads back in their order."""
    parts = [be.dequantize_view(g.view()) for g in groups]
    if len(parts) == 1:
        return parts[0]
    order = [h for g in groups for h in g.heads]
    inverse = sorted(range(len(order)), key=order.__getitem__)
    k = be.take(be.concat([p[0] for p in parts], 1), inverse, 1)
    v = be.take(be.concat([p[1] for p in parts], 1), inverse, 1)
    return k, v


def group_configs(k_bits: list, v_bits: list, group_size: int, head_dim: int, residual: int, rotate,
                  fp_sinks: int = 0) -> list[tuple[list[int], GroupConfig]]:
    """One ``(heads, GroupConfig)`` per distinct ``(k_bits, v_bits)`` pair of a layer's KV heads.

    ``k_bits``/``v_bits``: per KV head, 2, 4, 8 or ``None``. ``rotate``: a key of ``ROTATE``.
    Raises ``ValueError`` when ``head_dim`` cannot hold the codes, the value groups or the rotation.
    """
    rk, rv = ROTATE[rotate]
    out = []
    for (kb, vb), heads in heads_by_bits(k_bits, v_bits).items():
        cfg = GroupConfig(kb, vb, group_size, head_dim, residual, rk and kb is not None, rv and vb is not None,
                          fp_sinks)
        for bits, spec in ((kb, cfg.k_spec), (vb, cfg.v_spec)):
            if bits is None:
                continue
            if head_dim % spec.per_byte:
                raise ValueError(f"head_dim {head_dim} must be a multiple of {spec.per_byte} for {bits}-bit codes")
            if spec.axis == -1 and head_dim % spec.group_size:
                raise ValueError(f"group_size={group_size} must divide head_dim {head_dim} "
                                 f"(values are grouped over min(group_size, head_dim) channels)")
        if cfg.rotate_k or cfg.rotate_v:
            hadamard(head_dim)
        out.append((heads, cfg))
    return out
