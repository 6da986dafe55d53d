"""QuantPlan: the bit-width of every (layer, KV head, K or V), saved and loaded as JSON."""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass, field

from .quant import check_bits

_FORMAT = "lmcache.QuantPlan/1"


def _check_row(row, what: str) -> list:
    out = []
    for b in row:
        out.append(None if b is None else check_bits(b))
    if not out:
        raise ValueError(f"{what} must list at least one KV head")
    return out


@dataclass
class QuantPlan:
    """Bits per layer and KV head for keys and values (``None`` keeps that head in full precision).

    ``k_bits[layer][head]`` and ``v_bits[layer][head]``: 2, 4, 8 or ``None``.
    ``meta``: free-form provenance (model, budget, errors measured by calibration).
    """

    k_bits: list
    v_bits: list
    meta: dict = field(default_factory=dict)

    def __post_init__(self):
        if len(self.k_bits) != len(self.v_bits) or not self.k_bits:
            raise ValueError(f"a QuantPlan needs the same non-zero number of layers for keys and values, "
                             f"got {len(self.k_bits)} and {len(self.v_bits)}")
        self.k_bits = [_check_row(r, f"k_bits[{i}]") for i, r in enumerate(self.k_bits)]
        self.v_bits = [_check_row(r, f"v_bits[{i}]") for i, r in enumerate(self.v_bits)]
        for i, (rk, rv) in enumerate(zip(self.k_bits, self.v_bits)):
            if len(rk) != len(rv):
                raise ValueError(f"layer {i} of the plan has {len(rk)} key heads but {len(rv)} value heads")

    @classmethod
    def uniform(cls, num_layers: int, num_kv_heads: int, bits: int | None) -> QuantPlan:
        """The same ``bits`` everywhere."""
        row = [bits] * num_kv_heads
        return cls([list(row) for _ in range(num_layers)], [list(row) for _ in range(num_layers)])

    @property
    def num_layers(self) -> int:
        return len(self.k_bits)

    def layer_bits(self, layer: int, num_kv_heads: int) -> tuple[list, list]:
        """``(k_bits, v_bits)`` of ``layer``, each a list of ``num_kv_heads`` entries.

        Raises ``ValueError`` when the plan was made for another number of layers or heads.
        """
        if not 0 <= layer < self.num_layers:
            raise ValueError(f"the plan covers layers 0..{self.num_layers - 1}, got layer {layer}")
        rk, rv = self.k_bits[layer], self.v_bits[layer]
        if len(rk) != num_kv_heads:
            raise ValueError(f"the plan has {len(rk)} KV heads in layer {layer}, the model has {num_kv_heads}")
        return list(rk), list(rv)

    def check(self, num_layers: int, num_kv_heads: int) -> None:
        """Raise ``ValueError`` unless the plan fits a model of this many layers and KV heads."""
        if self.num_layers != num_layers:
            raise ValueError(f"the plan has {self.num_layers} layers, the model has {num_layers}")
        for layer in range(num_layers):
            self.layer_bits(layer, num_kv_heads)

    def average_bits(self, head_dim: int = 64, group_size: int = 64, scale_bits: int = 16) -> float:
        """Average stored bits per K/V element, scales and offsets (``scale_bits`` each) included.

        Keys are grouped over ``group_size`` tokens, values over ``min(group_size, head_dim)``
        channels; a full-precision (``None``) head counts 16 bits.
        """
        total = n = 0
        for rows, group in ((self.k_bits, group_size), (self.v_bits, min(group_size, head_dim))):
            for row in rows:
                for b in row:
                    total += 16 if b is None else b + 2 * scale_bits / group
                    n += 1
        return total / n

    def summary(self) -> str:
        """A readable table: one line per layer, bits per head for K and V.

        The average counts the head_dim, group size and scale bits that ``calibrate`` recorded
        in ``meta``; a plan without them (written by hand) is counted at head_dim 64, groups
        of 64 and 16-bit scales.
        """
        dims = (self.meta.get("errors") or {}).get("head_dim") or [64]
        head_dim, group, scale_bits = int(dims[0]), self.meta.get("group_size", 64), self.meta.get("scale_bits", 16)
        lines = [f"QuantPlan: {self.num_layers} layers, {len(self.k_bits[0])} KV heads, average "
                 f"{self.average_bits(head_dim, group, scale_bits):.2f} bits (scales included, head_dim "
                 f"{head_dim}, groups of {group})"]
        for i, (rk, rv) in enumerate(zip(self.k_bits, self.v_bits)):
            fmt = lambda r: " ".join("fp" if b is None else str(b) for b in r)  # noqa: E731
            lines.append(f"  layer {i:3d}  K: {fmt(rk)}  V: {fmt(rv)}")
        return "\n".join(lines)

    def to_dict(self) -> dict:
        return {"format": _FORMAT, "k_bits": self.k_bits, "v_bits": self.v_bits, "meta": self.meta}

    @classmethod
    def from_dict(cls, d: dict) -> QuantPlan:
        if not isinstance(d, dict) or d.get("format") != _FORMAT:
            raise ValueError(f"not a lmcache plan: expected format {_FORMAT!r}")
        return cls(d["k_bits"], d["v_bits"], dict(d.get("meta", {})))

    def save(self, path: str | os.PathLike) -> None:
        """Write the plan as JSON to ``path``."""
        with open(path, "w") as f:
            json.dump(self.to_dict(), f, indent=1)

    @classmethod
    def load(cls, path: str | os.PathLike) -> QuantPlan:
        """Read a plan written by ``save``; ``ValueError`` if the file is not one."""
        with open(path) as f:
            try:
                d = json.load(f)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path} is not a lmcache plan: {e}") from None
        return cls.from_dict(d)


def heads_by_bits(k_bits: Sequence, v_bits: Sequence) -> dict[tuple, list[int]]:
    """Group head indices by their ``(k_bits, v_bits)`` pair, in head order."""
    groups: dict[tuple, list[int]] = {}
    for h, pair in enumerate(zip(k_bits, v_bits)):
        groups.setdefault(pair, []).append(h)
    return groups
