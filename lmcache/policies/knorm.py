"""``knorm``: keep the tokens whose keys have the smallest L2 norm; needs no attention scores."""

from __future__ import annotations

import numpy as np

from .base import Policy, _check_int
from .snapkv import pool


class KNorm(Policy):
    """Key-norm eviction (Devoto et al., 2024): low-norm keys draw attention, so keep them.

    The statistic is each token's squared key L2 norm, taken from the full-precision key
    when it arrives (before any quantization; a Hadamard rotation does not change it), so it
    needs no attention scores, works with any attention kernel and can compress a prompt
    before any question about it is known. The score (minus the norm) is max-pooled over
    ``kernel`` neighbouring tokens, so a low-norm token keeps its neighbours: a fact spans
    several tokens (a 5-digit number is 5 tokens) and the paper's plain per-token choice
    (``kernel=1``, what NVIDIA kvpress's KnormPress does) tends to keep parts of it.
    Measured on the passkey benchmark's prefix-reuse case (SmolLM2-135M, ~1900 tokens,
    CPU, two runs of 6 prompts sharing one key, so only a hint): at a 25% budget
    ``kernel=3`` found the key in 4 and 2 of 6, ``kernel=1`` in 2 and 2 of 6; at 50%,
    ``kernel=3`` in 2 of 6 and ``kernel=1`` in 4 of 6.
    ``window``: newest tokens always kept.
    """

    name = "knorm"
    statistic = "key_norm"

    def __init__(self, window: int = 32, slack: int = 32, kernel: int = 3):
        super().__init__(window, slack)
        self.kernel = _check_int("kernel", kernel, 1)

    def scores(self, stats, n, shape):
        """Minus the key norm, max-pooled over ``kernel`` tokens: float64 ``[B, H, n]``."""
        return pool(-np.asarray(stats, dtype=np.float64), self.kernel, "max")

    def __repr__(self) -> str:
        return f"KNorm(window={self.window}, slack={self.slack}, kernel={self.kernel})"
