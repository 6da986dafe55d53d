"""Cache: one batch of sequences' KV across layers, quantized blocks plus a full-precision tail."""

from __future__ import annotations

from typing import Any

from .backends import backend_of, framework_of, get_backend
from .backends.base import Backend
from .eviction import Evictor
from .kvblocks import ROTATE, GroupConfig, HeadGroupKV, group_configs, whole_kv
from .plan import QuantPlan
from .quant import check_bits


def _check_int(name: str, value: Any, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return value


class _Layer:
    """One layer: its shape facts and one ``HeadGroupKV`` per distinct (k_bits, v_bits)."""

    def __init__(self, batch: int, kv_heads: int, head_dim: int, dtype: str, device: str, groups: list):
        self.batch, self.kv_heads, self.head_dim, self.dtype, self.device = batch, kv_heads, head_dim, dtype, device
        self.groups: list[HeadGroupKV] = groups
        self.last_added = 0
        self.stats: list = [None] * len(groups)  # eviction state per group (lmcache.eviction.GroupState)
        self.evicted = 0  # tokens per head dropped by eviction

    @property
    def seq_len(self) -> int:
        return self.groups[0].seq_len


class Cache:
    """The compressed KV cache of a model: ``update`` each layer, then ``attend`` or use the K/V.

    ``backend``: ``"auto"`` (the framework of the first array seen, then ``LMCACHE_BACKEND``
    / the best installed accelerator), ``"numpy"``, ``"torch"``, ``"jax"``, ``"mlx"`` or a
    ``Backend``. ``bits``: 2, 4, 8 or ``None`` (full precision). ``group_size``: tokens per
    key group and channels per value group (capped at head_dim). ``residual``: newest tokens
    always kept in full precision. ``plan``: a ``QuantPlan`` overriding ``bits`` per layer,
    KV head and K/V. ``rotate``: ``False``, ``True``/``"kv"``, ``"k"`` or ``"v"``: Hadamard
    rotation of that side before quantization. ``policy``/``budget``/``sinks``: token
    eviction; ``store``: a ``Store`` to reuse cached prefixes from. ``fp_sinks``: keep the
    first ``fp_sinks`` tokens in full precision, outside every quantization group (attention
    sinks; 0 by default; not yet with eviction or ``store``).
    """

    def __init__(self, backend: Any = "auto", device: str | None = None, bits: int | None = 4,
                 group_size: int = 64, residual: int = 128, plan: QuantPlan | None = None, policy: Any = None,
                 budget: int | None = None, sinks: int = 4, store: Any = None, rotate: Any = False,
                 fp_sinks: int = 0):
        if bits is not None:
            check_bits(bits)
        _check_int("group_size", group_size, 1)
        _check_int("residual", residual, 0)
        _check_int("sinks", sinks, 0)
        _check_int("fp_sinks", fp_sinks, 0)
        if fp_sinks and (policy is not None or budget is not None or store is not None):
            raise ValueError(f"fp_sinks={fp_sinks} cannot be combined with eviction (policy=, budget=) or store= "
                             f"yet; use fp_sinks=0 with them")
        if plan is not None and not isinstance(plan, QuantPlan):
            raise TypeError(f"plan must be a lmcache.QuantPlan or None, got {type(plan).__name__}")
        if rotate not in ROTATE:
            raise ValueError(f"rotate must be False, True, 'k', 'v' or 'kv', got {rotate!r}")
        self._evictor = None if policy is None and budget is None else Evictor(policy, budget, sinks)
        if store is not None and not all(hasattr(store, m) for m in ("put", "get", "fetch_prefix")):
            raise TypeError(f"store must be a lmcache.Store or None, got {type(store).__name__}")
        if isinstance(backend, str) and backend != "auto":
            backend = get_backend(backend, device)  # unknown / missing backends fail here, early
        elif not (backend == "auto" or isinstance(backend, Backend)):
            raise ValueError(f"backend must be 'auto', a backend name or a Backend, got {backend!r}")
        self._backend_arg = backend
        self._be: Backend | None = backend if isinstance(backend, Backend) else None
        self.device = device
        self.bits, self.group_size, self.residual, self.plan = bits, group_size, residual, plan
        self.rotate = rotate
        self.fp_sinks = fp_sinks
        self.policy, self.budget, self.sinks, self.store = policy, budget, sinks, store
        self._layers: list[_Layer] = []
        self._prefix = None  # chunks fetched by set_prompt, loaded on the first update

    # ------------------------------------------------------------------ helpers
    @property
    def backend(self) -> Backend | None:
        """The backend in use (``None`` until ``"auto"`` has seen its first array)."""
        return self._be

    def _resolve_backend(self, x) -> Backend:
        if self._be is not None:
            return self._be
        name = framework_of(x)
        self._be = backend_of(x, self.device) if name is not None else get_backend("auto", self.device)
        return self._be

    def _layer(self, layer: Any) -> _Layer:
        if isinstance(layer, bool) or not isinstance(layer, int):
            raise TypeError(f"layer must be an int, got {type(layer).__name__}")
        if not 0 <= layer < len(self._layers):
            raise ValueError(f"layer {layer} is out of range: the cache holds layers 0..{len(self._layers) - 1}")
        return self._layers[layer]

    def _group_configs(self, layer: int, kv_heads: int, head_dim: int) -> list[tuple[list[int], GroupConfig]]:
        if self.plan is not None:
            kb, vb = self.plan.layer_bits(layer, kv_heads)
        else:
            kb, vb = [self.bits] * kv_heads, [self.bits] * kv_heads
        return group_configs(kb, vb, self.group_size, head_dim, self.residual, self.rotate, self.fp_sinks)

    def _check_kv(self, layer: int, keys, values) -> tuple[Backend, str]:
        be = self._resolve_backend(keys)
        for name, x in (("keys", keys), ("values", values)):
            if not be.is_array(x):
                raise TypeError(f"{name} must be a {be.name} array like the rest of the cache, got {type(x).__name__}")
            if len(x.shape) != 4:
                raise ValueError(f"{name} must have shape [batch, kv_heads, new_tokens, head_dim], "
                                 f"got {tuple(x.shape)}")
        if tuple(keys.shape) != tuple(values.shape):
            raise ValueError(f"keys and values must have the same shape, "
                             f"got {tuple(keys.shape)} and {tuple(values.shape)}")
        dtype = be.dtype_name(keys)
        if be.dtype_name(values) != dtype:
            raise TypeError(f"keys and values must have the same dtype, got {dtype} and {be.dtype_name(values)}")
        if dtype not in ("float16", "bfloat16", "float32"):
            raise TypeError(f"keys must be float16, bfloat16 or float32, got {dtype}")
        b, h, t, d = keys.shape
        if min(b, h, t, d) < 1:
            raise ValueError(f"keys must have no empty dimension, got shape {tuple(keys.shape)}")
        if isinstance(layer, bool) or not isinstance(layer, int):
            raise TypeError(f"layer must be an int, got {type(layer).__name__}")
        if not 0 <= layer <= len(self._layers):
            raise ValueError(f"layer {layer} is out of range: layers are first updated in order, "
                             f"the next new layer is {len(self._layers)}")
        if self._layers and b != self._layers[0].batch:
            raise ValueError(f"batch size {b} differs from the cache's batch size {self._layers[0].batch}")
        if layer < len(self._layers):
            ly = self._layers[layer]
            if (h, d) != (ly.kv_heads, ly.head_dim):
                raise ValueError(f"layer {layer} holds {ly.kv_heads} KV heads of head_dim {ly.head_dim}, "
                                 f"got {h} heads of head_dim {d}")
            if dtype != ly.dtype:
                raise TypeError(f"layer {layer} holds {ly.dtype} KV, got {dtype}")
        return be, dtype

    # ------------------------------------------------------------------ public API
    def set_prompt(self, token_ids) -> int:
        """Start a sequence whose prompt is ``token_ids``; return how many tokens the store has.

        With ``store=``, the longest stored prefix of the prompt (whole chunks, leaving at
        least one token for the model to compute) is read now and loaded into every layer on
        the first ``update``; the caller runs the model on ``token_ids[n:]`` only and passes
        those tokens' K/V to ``update``. Without a store, returns 0. The cache must be empty.
        After the model has run, ``store.put(token_ids, cache)`` saves the new chunks.
        """
        if self._layers:
            raise ValueError(f"set_prompt needs an empty cache, this one holds {self.seq_len(0)} tokens "
                             f"(call reset() first)")
        self._prefix = None
        if self.store is None:
            return 0
        from .store import token_array

        ids = token_array(token_ids)
        n, pending = self.store.fetch_prefix(ids, self, max_tokens=len(ids) - 1)
        if n:
            self._prefix = pending
        return n

    def update(self, layer: int, keys, values):
        """Append new tokens to ``layer`` and return the layer's whole K and V.

        ``keys``/``values``: ``[batch, kv_heads, new_tokens, head_dim]``, float16, bfloat16
        or float32, of one framework. Returns ``(k, v)``, each
        ``[batch, kv_heads, seq_len, head_dim]`` of the input's type, dtype and device,
        dequantized where quantized. On error the cache is left as it was.
        """
        be, dtype = self._check_kv(layer, keys, values)
        if self._prefix is not None and not self._layers:
            self._load_prefix(keys)  # only for valid input, then checked again against the loaded layers
            be, dtype = self._check_kv(layer, keys, values)
        b, h, t, d = keys.shape
        if layer == len(self._layers):
            groups = [HeadGroupKV(be, heads, cfg, dtype) for heads, cfg in self._group_configs(layer, h, d)]
            ly = _Layer(b, h, d, dtype, be.device_of(keys), groups)
        else:
            ly = self._layers[layer]
        whole = len(ly.groups) == 1
        groups, stats, dropped = ly.groups, ly.stats, 0
        if self._evictor is not None:
            groups, stats, dropped = self._evictor.before_append(be, groups, stats)
        parts = [(keys, values)] if whole else [(be.take(keys, g.heads, 1), be.take(values, g.heads, 1))
                                                 for g in groups]
        new_groups = [g.appended(k, v) for g, (k, v) in zip(groups, parts)]
        if self._evictor is not None:
            stats = self._evictor.after_append(be, groups, stats, [k for k, _ in parts])
        ly.groups, ly.stats = new_groups, stats
        ly.evicted += dropped
        ly.last_added = t
        if layer == len(self._layers):
            self._layers.append(ly)
        return whole_kv(self._be, ly.groups)

    def _load_prefix(self, keys) -> None:
        """Build every layer from the chunks ``set_prompt`` fetched (on the first array's backend)."""
        pending, self._prefix = self._prefix, None
        layout = pending[0]
        be = self._resolve_backend(keys)
        if be.is_array(keys) and be.dtype_name(keys) != layout["dtype"]:
            raise TypeError(f"the stored prefix holds {layout['dtype']} KV but keys are {be.dtype_name(keys)}")
        self.store.load_pending(self, pending, be)

    def attend(self, layer: int, queries, scale: float | None = None):
        """Attention of the newest ``q_len`` tokens' queries over the layer's compressed cache.

        ``queries``: ``[batch, q_heads, q_len, head_dim]`` with ``q_heads`` a multiple of the
        layer's KV heads (query head ``i`` reads KV head ``i // (q_heads // kv_heads)``) and
        ``q_len`` at most the tokens the last ``update`` of this layer added. Causal: query
        ``i`` sees every kept token up to its own position. ``scale`` defaults to
        ``1/sqrt(head_dim)``. Returns ``[batch, q_heads, q_len, head_dim]`` in the queries' dtype.
        """
        ly, scale, rep = self._check_queries(layer, queries, scale)
        be = self._be
        if self._evictor is not None:
            return self._attend_evicting(ly, queries, scale, rep)
        if len(ly.groups) == 1:
            return be.attend(queries, ly.groups[0].view(), float(scale))
        outs, order = [], []
        for g in ly.groups:
            qh = [h * rep + r for h in g.heads for r in range(rep)]
            outs.append(be.attend(be.take(queries, qh, 1), g.view(), float(scale)))
            order += qh
        inverse = sorted(range(len(order)), key=order.__getitem__)
        return be.take(be.concat(outs, 1), inverse, 1)

    def _check_queries(self, layer: int, queries, scale):
        """Validate ``attend``/``observe`` arguments; returns ``(layer state, scale, query heads per KV head)``."""
        ly = self._layer(layer)
        be = self._be
        if not be.is_array(queries):
            raise TypeError(f"queries must be a {be.name} array, got {type(queries).__name__}")
        if len(queries.shape) != 4:
            raise ValueError(f"queries must have shape [batch, q_heads, q_len, head_dim], got {tuple(queries.shape)}")
        b, hq, L, d = queries.shape
        if b != ly.batch or d != ly.head_dim:
            raise ValueError(f"queries of batch {b} and head_dim {d} do not match layer {layer} "
                             f"(batch {ly.batch}, head_dim {ly.head_dim})")
        if hq < 1 or hq % ly.kv_heads:
            raise ValueError(f"q_heads must be a multiple of the layer's {ly.kv_heads} KV heads, got {hq}")
        if not 1 <= L <= ly.last_added:
            raise ValueError(f"q_len must be between 1 and the {ly.last_added} tokens the last update added, got {L}")
        if be.dtype_name(queries) not in ("float16", "bfloat16", "float32"):
            raise TypeError(f"queries must be float16, bfloat16 or float32, got {be.dtype_name(queries)}")
        if scale is None:
            scale = be.default_scale(d)
        elif isinstance(scale, bool) or not isinstance(scale, (int, float)) or not scale > 0:
            raise ValueError(f"scale must be a positive number or None, got {scale!r}")
        return ly, float(scale), hq // ly.kv_heads

    def observe(self, layer: int, queries, scale: float | None = None) -> None:
        """Feed the eviction policy the attention of ``queries`` without computing the output.

        For integrations whose model computes attention itself over the K/V ``update``
        returned (transformers' SDPA or flash kernels): the arguments are those of ``attend``
        (the newest ``q_len`` tokens' queries); a policy that learns from attention (``h2o``,
        ``snapkv``) gets its statistics (SnapKV only reads its observation window, the last
        queries), and the layer is evicted if it is due, as ``attend`` would. Costs a second
        pass over the cache; ``attend`` gets the same statistics from its own pass. Without
        ``policy=`` this does nothing.
        """
        ly, scale, rep = self._check_queries(layer, queries, scale)
        if self._evictor is not None:
            self._attend_evicting(ly, queries, scale, rep, output=False)

    def _attend_evicting(self, ly: _Layer, queries, scale: float, rep: int, output: bool = True):
        """``attend`` with eviction: statistics from the same pass, then evict above the threshold.

        ``output=False`` (``observe``): only the statistics, no output (returns ``None``).
        """
        be, ev = self._be, self._evictor
        whole = len(ly.groups) == 1
        outs, order, stats = [], [], []
        for g, st in zip(ly.groups, ly.stats):
            qh = [h * rep + r for h in g.heads for r in range(rep)]
            out, st = ev.attend(be, queries if whole else be.take(queries, qh, 1), g, st, scale, output)
            outs.append(out)
            stats.append(st)
            order += qh
        groups, stats, dropped = ev.after_attend(be, ly.groups, stats)
        ly.groups, ly.stats = groups, stats
        if dropped:
            ly.evicted += dropped
            ly.last_added = min(ly.last_added, ev.policy.window)  # the newest tokens still held
        if not output:
            return None
        if whole:
            return outs[0]
        inverse = sorted(range(len(order)), key=order.__getitem__)
        return be.take(be.concat(outs, 1), inverse, 1)

    def seq_len(self, layer: int = 0) -> int:
        """Tokens held by ``layer`` (0 for a layer not updated yet)."""
        if isinstance(layer, int) and not isinstance(layer, bool) and layer == len(self._layers):
            return 0
        return self._layer(layer).seq_len

    def seen_tokens(self, layer: int = 0) -> int:
        """Tokens ever appended to ``layer``, evicted or not: the position of the next token."""
        if isinstance(layer, int) and not isinstance(layer, bool) and layer == len(self._layers):
            return 0
        ly = self._layer(layer)
        return ly.seq_len + ly.evicted

    @property
    def num_layers(self) -> int:
        return len(self._layers)

    @property
    def nbytes(self) -> int:
        """The bytes the cache holds: packed codes, scales, offsets and the full-precision residual."""
        return sum(g.nbytes for ly in self._layers for g in ly.groups)

    def dense_nbytes(self) -> int:
        """What the same tokens take uncompressed, in the input dtype (for compression ratios)."""
        total = 0
        for ly in self._layers:
            itemsize = 2 if ly.dtype in ("float16", "bfloat16") else 4
            total += 2 * ly.batch * ly.kv_heads * ly.seq_len * ly.head_dim * itemsize
        return total

    def stats(self) -> dict:
        """Counters: layers, tokens (quantized / residual), bytes held, dense bytes, ratio, backend."""
        quant = sum(ly.groups[0].n_quant for ly in self._layers)
        res = sum(ly.groups[0].n_res for ly in self._layers)
        dense = self.dense_nbytes()
        held = self.nbytes
        return {
            "backend": None if self._be is None else self._be.name,
            "kernel_path": None if self._be is None else self._be.kernel_path(),
            "layers": len(self._layers),
            "seq_len": self._layers[0].seq_len if self._layers else 0,
            "tokens_quantized": quant,
            "tokens_residual": res,
            "nbytes": held,
            "dense_nbytes": dense,
            "compression": (dense / held) if held else 1.0,
            "bits": self.bits if self.plan is None else "plan",
            "group_size": self.group_size,
            "residual": self.residual,
            "policy": None if self._evictor is None else self._evictor.policy.name,
            "budget": self.budget,
            "tokens_evicted": sum(ly.evicted for ly in self._layers),
        }

    def reset(self) -> None:
        """Drop every layer's KV; settings and backend are kept."""
        self._layers = []
        self._prefix = None

    def __repr__(self) -> str:
        s = self.stats()
        return (f"lmcache.Cache(backend={s['backend']}, bits={s['bits']}, layers={s['layers']}, "
                f"seq_len={s['seq_len']}, nbytes={s['nbytes']})")
