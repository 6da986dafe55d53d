"""Tier placement: which chunks a full tier moves down a tier (the last tier drops them).

A chunk's value combines recency and frequency: ``last_use + freq_weight * log2(uses)``,
where time is counted in chunk accesses (puts and hits) over the whole store. A chunk used
once and long ago goes first; a chunk hit often keeps its place against newer one-off
chunks for about ``freq_weight`` accesses per doubling of its use count.
"""

from __future__ import annotations

import math
import numbers


class RecencyFrequency:
    """Per-tier bookkeeping of chunk value; ``victims`` names the least valuable chunks.

    ``freq_weight``: accesses of recency that one doubling of a chunk's use count is worth.
    Not thread-safe: the store calls it under its lock.
    """

    def __init__(self, freq_weight: float = 16.0):
        if isinstance(freq_weight, bool) or not isinstance(freq_weight, numbers.Real) or not freq_weight >= 0:
            raise ValueError(f"freq_weight must be a number >= 0, got {freq_weight!r}")
        self.freq_weight = float(freq_weight)
        self._clock = 0
        self._tiers: dict[int, dict[bytes, list]] = {}  # tier -> key -> [last_use, uses, nbytes]

    def _tick(self) -> int:
        self._clock += 1
        return self._clock

    def added(self, tier: int, key: bytes, nbytes: int, uses: int = 1) -> None:
        """``key`` (``nbytes``) now lives in ``tier``; ``uses`` carries its count across tiers."""
        self._tiers.setdefault(tier, {})[key] = [self._tick(), uses, nbytes]

    def touched(self, tier: int, key: bytes) -> None:
        """``key`` was hit in ``tier``."""
        e = self._tiers.get(tier, {}).get(key)
        if e is not None:
            e[0] = self._tick()
            e[1] += 1

    def uses(self, tier: int, key: bytes) -> int:
        """How often ``key`` was used (put or hit) while in ``tier``; 1 for an unknown key."""
        e = self._tiers.get(tier, {}).get(key)
        return 1 if e is None else e[1]

    def removed(self, tier: int, key: bytes) -> None:
        """``key`` left ``tier`` (moved down, dropped or deleted); unknown keys are ignored."""
        self._tiers.get(tier, {}).pop(key, None)

    def value(self, tier: int, key: bytes) -> float:
        """``key``'s value in ``tier`` (higher stays longer); ``KeyError`` for an unknown key."""
        last, uses, _ = self._tiers[tier][key]
        return last + self.freq_weight * math.log2(uses)

    def victims(self, tier: int, need: int, exclude: set | None = None) -> list[bytes]:
        """The least valuable chunks of ``tier`` whose bytes add up to at least ``need``."""
        entries = self._tiers.get(tier, {})
        order = sorted((k for k in entries if not exclude or k not in exclude), key=lambda k: self.value(tier, k))
        out, freed = [], 0
        for k in order:
            if freed >= need:
                break
            out.append(k)
            freed += entries[k][2]
        return out
