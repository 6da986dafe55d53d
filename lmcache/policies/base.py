"""The eviction Policy contract and ``get_policy``, the registry of policies by name.

A policy says which tokens a KV head keeps. It never touches a framework: the cache keeps
one statistic per kept token and KV head (on the backend, fed by ``attend`` or ``update``),
copies it to the host when a layer must shrink, and asks the policy for a score per token
(a numpy array, higher keeps). The mechanics shared by every policy (the first ``sinks``
tokens and the newest ``window`` tokens are always kept, the rest by score, ties to the
older token) live in ``lmcache.eviction``, so a policy is only its statistic and its score.
"""

from __future__ import annotations

import importlib
from typing import Any

import numpy as np

#: The statistics a cache can keep per kept token and KV head.
STATISTICS = (None, "attention", "key_norm", "keys")

# name -> (module, class)
_REGISTRY = {
    "window": ("lmcache.policies.window", "Window"),
    "sink": ("lmcache.policies.sink", "Sink"),
    "h2o": ("lmcache.policies.h2o", "H2O"),
    "snapkv": ("lmcache.policies.snapkv", "SnapKV"),
    "knorm": ("lmcache.policies.knorm", "KNorm"),
    "keydiff": ("lmcache.policies.keydiff", "KeyDiff"),
}


def _check_int(name: str, value: Any, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return int(value)


class Policy:
    """Which tokens each KV head keeps: a statistic per token and a score from it.

    ``window``: the newest tokens always kept (at least 1, so the newest token always
    stays and attention of the newest queries stays causal and exact). ``slack``: how far a
    head may grow past ``budget`` before it is evicted back down to ``budget``; eviction
    costs a pass over the layer, so it is amortized over ``slack`` new tokens.

    Subclasses set ``name`` and ``statistic`` (``None``: no statistic; ``"attention"``: the
    attention mass each token received, summed over the query heads of its group and over
    the queries that ``score_queries`` selects; ``"key_norm"``: the squared L2 norm of its key;
    ``"keys"``: nothing kept between evictions, ``scores`` gets the held keys themselves,
    float32 ``[B, H, n, D]``) and implement ``scores``.
    """

    name = "base"
    statistic: str | None = None
    #: For ``statistic == "attention"``: ``True`` counts every query of each ``attend``;
    #: an int ``n`` counts only the last ``n`` queries of each call.
    score_queries: bool | int = True

    def __init__(self, window: int = 32, slack: int = 32):
        self.window = _check_int("window", window, 1)
        self.slack = _check_int("slack", slack, 0)

    def scores(self, stats: np.ndarray | None, n: int, shape: tuple[int, int]) -> np.ndarray:
        """Scores of the ``n`` kept tokens of each head, higher keeps: float64 ``[B, H, n]``.

        ``stats``: float32 ``[B, H, n]`` (the policy's statistic) or ``None`` when
        ``statistic`` is ``None``; ``shape``: ``(B, H)``. Only the order of the scores
        between the sinks and the recent window matters.
        """
        raise NotImplementedError(f"{type(self).__name__} must implement scores()")

    def min_budget(self, sinks: int) -> int:
        """The smallest budget this policy accepts with ``sinks`` sink tokens."""
        return sinks + self.window

    def __repr__(self) -> str:
        return f"{type(self).__name__}(window={self.window}, slack={self.slack})"


def available() -> list[str]:
    """The names ``get_policy`` accepts."""
    return list(_REGISTRY)


def get_policy(policy: Any) -> Policy:
    """The eviction policy named ``policy`` with its defaults, or ``policy`` itself if it is a ``Policy``.

    Raises ``ValueError`` for an unknown name and ``TypeError`` for anything else.
    """
    if isinstance(policy, Policy):
        return policy
    if isinstance(policy, str):
        key = policy.strip().lower()
        if key not in _REGISTRY:
            raise ValueError(f"unknown eviction policy {policy!r}; known policies: {', '.join(_REGISTRY)} "
                             f"(or a lmcache.policies.Policy instance)")
        module, cls = _REGISTRY[key]
        return getattr(importlib.import_module(module), cls)()
    raise TypeError(f"policy must be a policy name ({', '.join(_REGISTRY)}) or a lmcache.policies.Policy, "
                    f"got {type(policy).__name__}")
