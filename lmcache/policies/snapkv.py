"""``snapkv``: scores from an observation window of the last prompt queries, pooled."""

from __future__ import annotations

import numpy as np

from .base import Policy, _check_int


def pool(x: np.ndarray, kernel: int, how: str) -> np.ndarray:
    """1-D pooling of ``x`` (``[..., n]``) along the last axis, same length, edges padded.

    ``how``: ``"max"`` or ``"avg"`` (the average over the part of the kernel inside ``x``).
    """
    if kernel <= 1:
        return x
    n = x.shape[-1]
    half = kernel // 2
    pad_value = -np.inf if how == "max" else 0.0
    xp = np.full(x.shape[:-1] + (n + 2 * half,), pad_value)
    xp[..., half:half + n] = x
    win = np.lib.stride_tricks.sliding_window_view(xp, 2 * half + 1, axis=-1)
    if how == "max":
        return win.max(axis=-1)
    ones = np.zeros(n + 2 * half)
    ones[half:half + n] = 1
    count = np.lib.stride_tricks.sliding_window_view(ones, 2 * half + 1).sum(-1)
    return win.sum(axis=-1) / count


class SnapKV(Policy):
    """SnapKV (Li et al., 2024): the last ``observation`` prompt queries vote, pooled over neighbours.

    The statistic is the attention mass from the last ``observation`` queries of each
    ``attend`` (at prefill: the end of the prompt, which usually holds the question; while
    decoding: every new query, so the choice keeps following what is being asked). Scores
    are pooled over ``kernel`` neighbouring tokens (``pooling``: ``"max"`` or ``"avg"``) so a
    chosen token keeps its context. Max pooling is the default: the question's queries
    point at the start of a fact ("the pass key is") and max pooling carries that peak to
    the next tokens undiminished; on the passkey benchmark (question in the prompt, 25%
    budget, ~1900 tokens) it found the key in 4 of 4 prompts, average pooling in 2 of 4.
    The choice is made when the prompt is attended (the first time a head exceeds
    ``budget + slack``). ``window``: newest tokens always kept; by default as many as the
    observation window. SnapKV needs the question: a prompt compressed before the question
    is known keeps what its last filler sentences looked at (``keydiff`` is for that case).
    """

    name = "snapkv"
    statistic = "attention"

    def __init__(self, window: int = 32, slack: int = 32, observation: int = 32, kernel: int = 7,
                 pooling: str = "max"):
        super().__init__(window, slack)
        self.observation = _check_int("observation", observation, 1)
        self.kernel = _check_int("kernel", kernel, 1)
        if pooling not in ("avg", "max"):
            raise ValueError(f"pooling must be 'avg' or 'max', got {pooling!r}")
        self.pooling = pooling

    def __repr__(self) -> str:
        return (f"SnapKV(window={self.window}, slack={self.slack}, observation={self.observation}, "
                f"kernel={self.kernel}, pooling={self.pooling!r})")

    @property
    def score_queries(self) -> int:
        return self.observation

    def scores(self, stats, n, shape):
        """The observation window's attention, pooled over ``kernel`` tokens: float64 ``[B, H, n]``."""
        return pool(np.asarray(stats, dtype=np.float64), self.kernel, self.pooling)
