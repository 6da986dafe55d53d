"""``window``: keep the newest tokens (plus the first ``sinks``, as every policy does)."""

from __future__ import annotations

import numpy as np

from .base import Policy


class Window(Policy):
    """A sliding window: each head keeps its ``sinks`` first tokens and the newest ``budget - sinks``.

    Needs no statistic. With ``sinks=0`` it is a plain sliding window.
    """

    name = "window"
    statistic = None

    def __init__(self, window: int = 1, slack: int = 32):
        super().__init__(window, slack)

    def scores(self, stats, n, shape):
        """Newer tokens score higher: ``[B, H, n]`` float64 ``0..n-1``."""
        return np.broadcast_to(np.arange(n, dtype=np.float64), tuple(shape) + (n,))
