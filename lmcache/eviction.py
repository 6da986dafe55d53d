"""Token eviction mechanics: per-token statistics, the choice of kept tokens, and the rebuild.

``Cache`` holds, next to each head group's storage, one float32 statistic per kept token
and KV head (``[B, H, n]`` on the backend): the attention mass it received (fed by
``attend``, no second pass over the cache) or its key's squared L2 norm (taken when it is
appended); a policy whose statistic is ``"keys"`` (``keydiff``) keeps nothing and reads the
held keys when the layer is evicted (``held_keys``). ``observe`` (attention computed by the
model) gets the statistic in chunks of queries (``chunked_scores``), each over the keys it
sees. When a layer holds more than ``budget + policy.slack`` tokens it is cut back to
``budget``: the statistic goes to the host (a few kilobytes), the policy scores it, and
every head keeps its first ``sinks`` tokens, its newest ``policy.window`` tokens and the
best-scoring rest (ties to the older token), in their original order. Doing the choice in
numpy makes it the same on every backend for the same statistic.

Positions: keys are cached after RoPE, so a kept token keeps its position and new tokens
continue the sequence (``Cache.seen_tokens``); the kept tokens stay in order and the
newest ones are always kept, so causal attention of the newest queries stays exact.

The rebuild, per head group (``evicted``):

* values are grouped per token, so their codes, scales and offsets are gathered exactly;
* keys are grouped per channel over ``group_size`` tokens, so a key group that loses
  tokens cannot keep its (scale, lo): the kept keys are gathered per head and quantized
  again into new groups. Three things keep that second rounding rare:

  - the keys of the last ``update`` are held in full precision until the layer's next
    ``attend``/``update`` when an eviction is due (``GroupState.fresh``), so the big
    eviction right after a prompt quantizes the kept prompt keys once, from full
    precision: the result equals quantizing the kept tokens once (a test checks it);
  - whole key groups that every head keeps in place (the sinks' group, an untouched
    prefix) are copied as they are;
  - eviction is amortized: it runs once per ``policy.slack`` new tokens.

  What is left is the re-quantization of thinned groups while decoding: each adds at most
  half a step of the new grid, which is never coarser than the old. Measured (numpy,
  ``KNorm``, head_dim 64, group 32, budget 256, a 1024-token prompt then 600 decoded tokens,
  ~45 evictions): the kept keys' RMS error is 2.6x (slack 16) / 2.2x (slack 64) that of
  quantizing the same tokens once at 4 bits, 1.75x / 1.7x at 2 bits. The alternatives were
  to mask evicted tokens (no memory saved) or to keep the kept keys in full precision (the
  memory eviction was meant to save).
* tokens that were still in the full-precision residual are quantized for the first time
  when they move into a block, exactly as a later flush would do it.

The layer is rebuilt as one quantized block plus a residual of at least ``residual``
tokens (the same flush rule as ``HeadGroupKV.appended``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from .backends.base import Backend, QuantBlock
from .kvblocks import HeadGroupKV
from .policies.base import Policy, get_policy


class Evictor:
    """A cache's eviction settings: ``policy`` (name or ``Policy``), ``budget`` and ``sinks``.

    ``budget``: tokens each KV head keeps after an eviction; a head is cut back to it once it
    holds more than ``budget + policy.slack``. Raises ``ValueError`` / ``TypeError`` for a
    bad policy, a budget that is not an integer or is below ``sinks + policy.window``.
    """

    def __init__(self, policy: Any, budget: Any, sinks: int):
        if policy is None:
            raise ValueError(f"budget={budget!r} needs an eviction policy (policy='h2o', 'snapkv', 'knorm', 'keydiff', "
                             f"'sink' or 'window')")
        if budget is None:
            raise ValueError(f"policy={policy!r} needs budget=, the number of tokens each KV head keeps")
        self.policy: Policy = get_policy(policy)
        if isinstance(budget, bool) or not isinstance(budget, (int, np.integer)) or budget < 1:
            raise ValueError(f"budget must be a positive integer (tokens kept per KV head), got {budget!r}")
        need = self.policy.min_budget(sinks)
        if budget < need:
            raise ValueError(f"budget={budget} is too small for policy {self.policy.name!r}: it must be at least "
                             f"sinks ({sinks}) + the recent window ({self.policy.window}) = {need}")
        self.budget, self.sinks = int(budget), int(sinks)

    @property
    def threshold(self) -> int:
        """A head holding more tokens than this is evicted down to ``budget``."""
        return self.budget + self.policy.slack

    @property
    def score_queries(self) -> bool | int:
        """What ``Backend.attend(want_scores=...)`` gets: ``False`` when no attention statistic is kept."""
        return self.policy.score_queries if self.policy.statistic == "attention" else False

    # ------------------------------------------------------------------ statistics
    def new_stats(self, be: Backend, k) -> Any:
        """The statistic of freshly appended keys ``k`` (``[B, H, t, D]``, before any rotation).

        Returns float32 ``[B, H, t]`` on ``k``'s device (zeros for attention, the squared key
        norm for ``key_norm``), or ``None`` for a policy that keeps no statistic.
        """
        stat = self.policy.statistic
        if stat not in PER_TOKEN:
            return None
        kf = be.cast(k, "float32")
        if stat == "attention":
            return kf[..., 0] * 0.0
        ones = be.from_numpy(np.ones((k.shape[-1], 1), np.float32), "float32", be.device_of(k))
        return be.matmul(kf * kf, ones)[..., 0]

    @staticmethod
    def appended_stats(be: Backend, stats, new) -> Any:
        """``stats`` (``[B, H, n]`` or ``None``) followed by ``new`` (``[B, H, t]`` or ``None``)."""
        if new is None:
            return None
        return new if stats is None else be.concat([stats, new], axis=2)

    def complete_stats(self, be: Backend, group: HeadGroupKV, stats) -> Any:
        """``stats`` extended to every token of ``group`` (tokens loaded without one, e.g. from a store).

        Missing attention mass is zero; a missing key norm is taken from the stored keys.
        """
        if self.policy.statistic not in PER_TOKEN:
            return None
        have = 0 if stats is None else stats.shape[2]
        n = group.seq_len
        if have >= n:
            return stats
        view = group.view()
        k = _cat(be, [be.dequantize(x, group.dtype) if isinstance(x, QuantBlock) else x for x in view.k_blocks]
                 + ([] if view.k_res is None else [view.k_res]))
        return self.appended_stats(be, stats, self.new_stats(be, k[:, :, have:n]))

    # ------------------------------------------------------------------ the cache's hooks
    # Each takes and returns per-group lists (``groups``: ``HeadGroupKV``; ``states``:
    # ``GroupState`` or ``None``) and never modifies its inputs, so a failure leaves the cache as it was.

    def before_append(self, be: Backend, groups: list, states: list) -> tuple[list, list, int]:
        """Evict a layer that ``attend`` left above the threshold (a caller that never attends).

        Runs before new tokens are appended, so they always stay for the caller's attention.
        Returns ``(groups, states, tokens dropped per head)``.
        """
        if not groups or groups[0].seq_len <= self.threshold:
            return groups, states, 0
        return self._evict_all(be, groups, states)

    def after_append(self, be: Backend, groups: list, states: list, keys: list) -> list:
        """The states of ``groups`` once the keys ``keys[i]`` (``[B, H_i, t, D]``) are appended to them.

        The new keys are also held in full precision (``GroupState.fresh``) until the layer's
        next ``attend`` or ``update``: an eviction right after a prompt then quantizes the
        kept prompt keys once, from full precision, rather than a second time.
        """
        out = []
        for g, st, k in zip(groups, states, keys):
            stats = None if self.policy.statistic not in PER_TOKEN else \
                self.appended_stats(be, self.complete_stats(be, g, _stats(st)), self.new_stats(be, k))
            fresh = None
            if g.cfg.k_spec is not None and g.seq_len + k.shape[2] > self.threshold:  # only if an eviction is due
                fresh = be.rotate(k) if g.cfg.rotate_k else k
            out.append(GroupState(stats, fresh))
        return out

    def attend(self, be: Backend, q, group: HeadGroupKV, state, scale: float,
               output: bool = True) -> tuple[Any, Any]:
        """Attention of ``q`` over ``group`` and the group's state updated with it: ``(out, state)``.

        With an attention statistic, the scores come out of the same attention pass
        (``Backend.attend(want_scores=...)``); otherwise this is plain ``be.attend``.
        ``output=False``: only the statistic is wanted (``out`` is ``None``); the queries
        outside the policy's observation window are not even computed.
        """
        want = self.score_queries
        if want is False:
            return (be.attend(q, group.view(), scale) if output else None), state
        half_life = getattr(self.policy, "half_life", None)
        L = q.shape[2]
        if half_life is None or (output and L == 1):
            if output:
                out, scores = attend_with_scores(be, q, group.view(), scale, want)
            else:
                if want is not True and want < L:
                    q = q[:, :, L - want:]  # the newest queries: still causal at the end of the view
                k, v = be.dequantize_view(group.view())
                out, scores = None, chunked_scores(be, q, k, v, scale)
        else:
            # Forgetting statistic: each query's attention weighs 2**(-age / half_life), so the
            # weights differ within a call and the fused pass (an unweighted sum) cannot give them.
            out = be.attend(q, group.view(), scale) if output else None
            k, v = be.dequantize_view(group.view())
            scores = chunked_scores(be, q, k, v, scale, chunk=max(1, half_life // 2), half_life=half_life)
        stats = self.complete_stats(be, group, _stats(state))
        if stats is not None and half_life is not None:
            stats = stats * float(0.5 ** (L / half_life))
        return out, GroupState(scores if stats is None else stats + scores, None if state is None else state.fresh)

    def after_attend(self, be: Backend, groups: list, states: list) -> tuple[list, list, int]:
        """Evict the layer down to ``budget`` if it holds more than ``threshold`` tokens.

        Either way the full-precision copy of the last update's keys is released.
        """
        if groups and groups[0].seq_len > self.threshold:
            return self._evict_all(be, groups, states)
        return groups, [None if st is None else GroupState(st.stats, None) for st in states], 0

    def _evict_all(self, be: Backend, groups: list, states: list) -> tuple[list, list, int]:
        dropped = groups[0].seq_len - self.budget
        new_groups, new_states = [], []
        for g, st in zip(groups, states):
            g2, stats = self.evict(be, g, self.complete_stats(be, g, _stats(st)), None if st is None else st.fresh)
            new_groups.append(g2)
            new_states.append(GroupState(stats, None))
        return new_groups, new_states, dropped

    # ------------------------------------------------------------------ choosing
    def choose(self, stats: np.ndarray | None, n: int, shape: tuple[int, int]) -> np.ndarray:
        """The tokens each head keeps: int64 ``[B, H, budget]``, ascending, out of ``n > budget``.

        ``stats``: the policy's statistic on the host, float32 ``[B, H, n]``, or ``None``.
        Every head keeps tokens ``0..sinks-1`` and ``n-window..n-1`` and the
        ``budget - sinks - window`` best-scoring tokens between them; ties go to the older token.
        """
        pol, sinks, budget = self.policy, self.sinks, self.budget
        b, h = shape
        lo, hi = sinks, n - pol.window
        scores = np.asarray(pol.scores(stats, n, (b, h)), dtype=np.float64)
        if scores.shape != (b, h, n):
            raise ValueError(f"policy {pol.name!r} returned scores of shape {scores.shape}, expected {(b, h, n)}")
        mid = scores[..., lo:hi]
        order = np.argsort(-mid, axis=-1, kind="stable")[..., :budget - sinks - pol.window]
        mid_idx = np.sort(order, axis=-1) + lo
        head = np.broadcast_to(np.arange(sinks, dtype=np.int64), (b, h, sinks))
        tail = np.broadcast_to(np.arange(hi, n, dtype=np.int64), (b, h, n - hi))
        return np.concatenate([head, mid_idx.astype(np.int64), tail], axis=-1)

    def evict(self, be: Backend, group: HeadGroupKV, stats, fresh=None) -> tuple[HeadGroupKV, Any]:
        """``group`` and its ``stats`` cut back to ``budget`` tokens per head (new objects).

        ``fresh``: the full-precision keys of the group's newest tokens in the stored space,
        or ``None`` (see ``evicted``). A no-op (the same objects) when the group holds
        ``budget`` tokens or fewer.
        """
        n = group.seq_len
        if n <= self.budget:
            return group, stats
        b = (group.k_blocks[0] if group.k_blocks else group.k_res)
        b = b.codes.shape[0] if isinstance(b, QuantBlock) else b.shape[0]
        if self.policy.statistic == "keys":
            host = held_keys(be, group, fresh)
        else:
            host = None if stats is None else be.to_numpy(stats).astype(np.float32, copy=False)
        idx = self.choose(host, n, (b, len(group.heads)))
        new = evicted(be, group, idx, fresh)
        if stats is not None:
            stats = be.gather(stats, be.from_numpy(idx, "int64", be.device_of(stats)), 2)
        return new, stats


#: The statistics kept per token between evictions (``"keys"`` is read at eviction time).
PER_TOKEN = ("attention", "key_norm")


def held_keys(be: Backend, group: HeadGroupKV, fresh=None) -> np.ndarray:
    """The keys ``group`` holds, dequantized, on the host: float32 ``[B, H, n, D]``.

    In the stored space (rotated if the group rotates keys); ``fresh`` (the newest tokens'
    full-precision keys, see ``evicted``) replaces their dequantized codes. What a policy with
    ``statistic == "keys"`` scores.
    """
    parts = [be.dequantize(x, "float32") if isinstance(x, QuantBlock) else be.cast(x, "float32")
             for x in group.k_blocks + ([] if group.k_res is None else [group.k_res])]
    k = _cat(be, parts)
    if fresh is not None:
        n, t = k.shape[2], fresh.shape[2]
        fresh = be.cast(fresh, "float32")
        k = fresh if t >= n else be.concat([k[:, :, :n - t], fresh], axis=2)
    return be.to_numpy(k).astype(np.float32, copy=False)


@dataclass(frozen=True)
class GroupState:
    """What eviction keeps for one head group of one layer.

    ``stats``: the policy's statistic, float32 ``[B, H, n]`` on the backend, or ``None``.
    ``fresh``: the last update's keys in full precision (stored space), ``[B, H, t, D]``,
    held only until the layer's next ``attend`` or ``update``; ``None`` otherwise.
    """

    stats: Any = None
    fresh: Any = None


def _stats(state):
    return None if state is None else state.stats


_SCORES_KW: dict[type, bool] = {}


def attend_with_scores(be: Backend, q, view, scale: float, want: bool | int):
    """``be.attend(q, view, scale, want_scores=want)`` -> ``(out, scores)``.

    A backend whose ``attend`` override predates ``want_scores`` gets the base composite
    (dequantize, then ``attention_scores``), which every backend supports.
    """
    cls = type(be)
    if cls not in _SCORES_KW:
        import inspect

        _SCORES_KW[cls] = "want_scores" in inspect.signature(cls.attend).parameters
    if _SCORES_KW[cls]:
        return be.attend(q, view, scale, want_scores=want)
    return Backend.attend(be, q, view, scale, want_scores=want)


#: Queries per ``attention_scores`` call in ``chunked_scores``.
SCORE_CHUNK = 256


def chunked_scores(be: Backend, q, k, v, scale: float, chunk: int = SCORE_CHUNK, half_life: int | None = None):
    """The attention mass each key receives from the queries ``q``: float32 ``[B, Hkv, T]``.

    ``q``: ``[B, Hq, L, D]``, the newest ``L`` of the ``T`` tokens of ``k``/``v`` (``[B, Hkv, T, D]``).
    The same sum as ``be.attention_scores(q, k, v, scale)[1]`` (up to float32 rounding) in
    chunks of ``chunk`` queries, each over the keys it can see: a long prompt's ``observe``
    then skips the masked half of the ``L x T`` scores and never holds all of them at once
    (3x faster on CPU for a 1900-token prompt, SmolLM2-135M's shapes). ``half_life``: weigh
    each chunk's attention by ``2 ** (-age / half_life)``, ``age`` counted in queries from the
    newest query to the chunk's middle (``None``: no weights).
    """
    L, t = q.shape[2], k.shape[2]
    if L <= chunk and half_life is None:
        return be.attention_scores(q, k, v, scale)[1]
    total = None
    for s in range(0, L, chunk):
        e = min(L, s + chunk)
        m = t - L + e  # the keys the chunk's last query sees
        part = be.attention_scores(q[:, :, s:e], k[:, :, :m], v[:, :, :m], scale)[1]
        if half_life is not None:
            part = part * float(0.5 ** ((L - 1 - (s + e - 1) / 2) / half_life))
        if m < t:
            part = be.concat([part, _zeros_like_tokens(be, part, t - m)], axis=2)
        total = part if total is None else total + part
    return total


def _zeros_like_tokens(be: Backend, x, n: int):
    """float32 zeros ``[B, H, n]`` on ``x``'s device."""
    return be.from_numpy(np.zeros(tuple(x.shape[:2]) + (n,), np.float32), "float32", be.device_of(x))


def _cat(be: Backend, xs: list):
    return xs[0] if len(xs) == 1 else be.concat(xs, axis=2)


def _gather_tokens(be: Backend, x, idx: np.ndarray):
    """``x`` (``[B, H, n, W]``) at tokens ``idx`` (``[B, H, m]``) per head: ``[B, H, m, W]``."""
    full = np.ascontiguousarray(np.broadcast_to(idx[..., None], idx.shape + (x.shape[-1],)))
    return be.gather(x, be.from_numpy(full, "int64", be.device_of(x)), 2)


def evicted(be: Backend, group: HeadGroupKV, idx: np.ndarray, fresh=None) -> HeadGroupKV:
    """A new ``HeadGroupKV`` holding only tokens ``idx`` (int64 ``[B, H, m]``, ascending) per head.

    Stays in the stored (possibly rotated) space. Values keep their codes exactly; keys are
    re-quantized over the new groups (see the module docstring); the newest tokens form the
    full-precision residual under the same rule as ``HeadGroupKV.appended``. ``fresh``: the
    full-precision keys ``[B, H, t, D]`` of the group's newest ``t`` tokens (stored space),
    used instead of their dequantized codes, or ``None``.
    """
    cfg, dtype = group.cfg, group.dtype
    m = idx.shape[-1]
    g = cfg.group_size
    n_flush = (m - cfg.residual) // g * g if m >= cfg.residual + g else 0

    def dense(blocks, res):
        parts = [be.dequantize(x, dtype) if isinstance(x, QuantBlock) else x for x in blocks]
        return _cat(be, parts + ([] if res is None else [res]))

    k_dense = dense(group.k_blocks, group.k_res)
    if fresh is not None:
        n, t = k_dense.shape[2], fresh.shape[2]
        k_dense = fresh if t >= n else be.concat([k_dense[:, :, :n - t], be.cast(fresh, dtype)], axis=2)
    k_kept = _gather_tokens(be, k_dense, idx)
    v_dense = dense(group.v_blocks, group.v_res)
    new = HeadGroupKV(be, group.heads, cfg, dtype)
    new.n_quant = n_flush
    if n_flush:
        kq = k_kept[:, :, :n_flush]
        if cfg.k_spec is None:
            new.k_blocks = [kq]
        else:
            # Whole key groups that every head keeps in place are copied as they are; only the
            # groups after the first dropped token are re-quantized (see the module docstring).
            same = (idx[..., :n_flush] == np.arange(n_flush)).all(axis=(0, 1))
            p = n_flush if same.all() else int(np.argmin(same))
            p = min(p, group.n_quant) // g * g
            parts = []
            if p:
                old = [x for x in group.k_blocks if isinstance(x, QuantBlock)]
                parts.append(QuantBlock(_cat(be, [x.codes for x in old])[:, :, :p],
                                        _cat(be, [x.scale for x in old])[:, :, :p // g],
                                        _cat(be, [x.lo for x in old])[:, :, :p // g], cfg.k_spec))
            if p < n_flush:
                parts.append(be.quantize(kq[:, :, p:], cfg.k_spec))
            new.k_blocks = [parts[0] if len(parts) == 1 else
                            QuantBlock(*(_cat(be, [getattr(x, f) for x in parts]) for f in ("codes", "scale", "lo")),
                                       cfg.k_spec)]
        idx_q = np.ascontiguousarray(idx[..., :n_flush])
        if cfg.v_spec is None:
            new.v_blocks = [_gather_tokens(be, v_dense, idx_q)]
        else:
            # Values are grouped per token: gather their codes as they are. Residual tokens are
            # quantized here exactly as the flush that would have moved them into a block.
            blocks = [x for x in group.v_blocks if isinstance(x, QuantBlock)]
            if group.v_res is not None:
                blocks.append(be.quantize(group.v_res, cfg.v_spec))
            codes = _cat(be, [x.codes for x in blocks])
            scale = _cat(be, [x.scale for x in blocks])
            lo = _cat(be, [x.lo for x in blocks])
            new.v_blocks = [QuantBlock(_gather_tokens(be, codes, idx_q), _gather_tokens(be, scale, idx_q),
                                       _gather_tokens(be, lo, idx_q), cfg.v_spec)]
    if m > n_flush:
        idx_r = np.ascontiguousarray(idx[..., n_flush:])
        new.k_res = k_kept[:, :, n_flush:]
        new.v_res = _gather_tokens(be, v_dense, idx_r)
    return new
