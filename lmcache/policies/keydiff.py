"""``keydiff``: keep the tokens whose keys differ most from the average key; needs no queries."""

from __future__ import annotations

import numpy as np

from .base import Policy, _check_int
from .snapkv import pool


def key_similarity(keys: np.ndarray) -> np.ndarray:
    """Cosine similarity of each key to its head's anchor (the mean of the unit keys).

    ``keys``: ``[B, H, n, D]`` (any float dtype). Returns float64 ``[B, H, n]``. A zero key
    counts as similarity 0. The cosine is unchanged by an orthogonal rotation of the keys
    (the cache's optional Hadamard rotation), so rotated and plain keys give the same scores.
    """
    k = np.asarray(keys, dtype=np.float64)
    norm = np.linalg.norm(k, axis=-1, keepdims=True)
    unit = np.divide(k, norm, out=np.zeros_like(k), where=norm > 0)
    anchor = unit.mean(axis=2, keepdims=True)
    a_norm = np.linalg.norm(anchor, axis=-1)
    cos = (unit * anchor).sum(axis=-1)
    return np.divide(cos, a_norm, out=np.zeros_like(cos), where=a_norm > 0)


class KeyDiff(Policy):
    """KeyDiff (Park et al., 2025): keep the keys least similar to the average key of their head.

    Query-agnostic like ``knorm``: a prompt can be compressed before any question about it is
    known (a cached prefix compressed once for every later question). A token whose key points
    where most keys point adds little that its neighbours do not already give; a distinctive
    key (a name, a number in a sea of filler) is kept. The statistic is the keys themselves,
    read when the layer is evicted (``statistic = "keys"``: nothing is kept per token between
    evictions); the anchor is the mean of the held keys' unit vectors, per head. The score
    (minus the cosine similarity) is max-pooled over ``kernel`` neighbouring tokens, so a
    distinctive token keeps its neighbours (``kernel=1``: the paper's and NVIDIA kvpress's
    plain per-token choice; in a 6-prompt trial of the passkey prefix-reuse case at a 25%
    budget, ``kernel=3`` found 5 keys, ``kernel=1`` 4). In the benchmark (SmolLM2-135M, ~1900
    tokens, 60 prompts) it kept 100% of the keys at a 50% budget and 98% at 25% in that case,
    where ``knorm`` kept 63% and 32% and the attention-based policies at most 33%.
    ``window``: newest tokens always kept.
    """

    name = "keydiff"
    statistic = "keys"

    def __init__(self, window: int = 32, slack: int = 32, kernel: int = 3):
        super().__init__(window, slack)
        self.kernel = _check_int("kernel", kernel, 1)

    def scores(self, stats, n, shape):
        """Minus each key's cosine similarity to the anchor, max-pooled: float64 ``[B, H, n]``.

        ``stats``: the held keys, float32 ``[B, H, n, D]``.
        """
        keys = np.asarray(stats)
        if keys.ndim != 4 or keys.shape[:3] != tuple(shape) + (n,):
            raise ValueError(f"keydiff needs the held keys of shape {tuple(shape) + (n,)} + (head_dim,), "
                             f"got {keys.shape}")
        return pool(-key_similarity(keys), self.kernel, "max")

    def __repr__(self) -> str:
        return f"KeyDiff(window={self.window}, slack={self.slack}, kernel={self.kernel})"
