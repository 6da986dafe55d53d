"""``h2o``: heavy hitters by accumulated attention, plus the recent window."""

from __future__ import annotations

import numpy as np

from .base import Policy, _check_int
from .snapkv import pool


class H2O(Policy):
    """Heavy-Hitter Oracle (Zhang et al., 2023): keep the tokens that received the most attention.

    The statistic is the attention mass each kept token received from the queries seen so far
    (every prompt query at prefill, then each decoded token), summed over the query heads that
    share its KV head, chosen per KV head. Two departures from the paper, both measured on
    ``bench/eviction.py`` (passkey retrieval, question in the prompt, SmolLM2-135M, ~1900 tokens):

    * ``half_life``: each query's attention weighs ``2 ** (-age / half_life)``, its age counted
      in queries from the newest one (``None``: the paper's plain sum). Summed with equal
      weights over ~1900 prompt queries, a token's mass is decided by the filler queries that
      do not need it and the dozen that ask for it (the question) barely count: the plain sum
      kept the key's first digit and lost the rest, at 50% and 25% budgets alike (0 of 6).
      Dividing each token's sum by the number of queries that could see it (the usual fix for
      the sum's bias to early tokens) did not help (0 of 6 at depth 10%: it penalises a fact
      near the start). With forgetting the newest queries decide, as in SnapKV, but the
      statistic keeps accumulating while decoding instead of being fixed at prefill. Weights
      are applied per chunk of ``half_life // 2`` queries (the fused attention pass sums its
      queries unweighted, so a prompt's statistic costs a second, chunked pass).
    * ``kernel``: scores are max-pooled over ``kernel`` neighbouring tokens, so a kept token
      keeps its neighbours (a 5-digit key is 5 tokens; the question's queries point at its
      start). With ``kernel=7`` the answers at a 25% budget lost one digit in 3 of 24 prompts
      (``5602`` for 56002); ``kernel=11`` (or ``half_life=16``) found all three, and 24 of 24
      at 50% and 25% in the benchmark (bench/results/eviction-cpu-amd-epyc.json). Perplexity
      pays a little for the forgetting: 11.75 at 50% against 11.54 for the plain sum.

    ``window``: newest tokens always kept.
    """

    name = "h2o"
    statistic = "attention"
    score_queries = True

    def __init__(self, window: int = 32, slack: int = 32, kernel: int = 11, half_life: int | None = 32):
        super().__init__(window, slack)
        self.kernel = _check_int("kernel", kernel, 1)
        self.half_life = None if half_life is None else _check_int("half_life", half_life, 1)

    def scores(self, stats, n, shape):
        """The accumulated attention, max-pooled over ``kernel`` tokens: float64 ``[B, H, n]``."""
        return pool(np.asarray(stats, dtype=np.float64), self.kernel, "max")

    def __repr__(self) -> str:
        return (f"H2O(window={self.window}, slack={self.slack}, kernel={self.kernel}, "
                f"half_life={self.half_life})")
