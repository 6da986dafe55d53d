"""``h2o``: heavy hitters by accumulated attention, plus the recent window."""

from __future__ import annotations

import numpy as np

from .base import Policy


class H2O(Policy):
    """Heavy-Hitter Oracle (Zhang et al., 2023): keep the tokens that received the most attention.

    The statistic is the attention mass each kept token received from every query seen so
    far (all prompt queries at prefill, then each decoded token), summed over the query
    heads that share its KV head. ``window``: newest tokens always kept.

    Good at language modelling (the best perplexity at a 50% budget in
    ``bench/eviction.py``), bad at retrieving one fact: summed over every prompt query, a
    token's mass is decided by the many queries that do not need it, and the few that ask
    for it (the question) barely count. It found no passkey at 50% or 25% budgets where
    ``snapkv`` found all of them.
    """

    name = "h2o"
    statistic = "attention"
    score_queries = True

    def __init__(self, window: int = 32, slack: int = 32):
        super().__init__(window, slack)

    def scores(self, stats, n, shape):
        """The accumulated attention itself, float64 ``[B, H, n]``."""
        return np.asarray(stats, dtype=np.float64)
