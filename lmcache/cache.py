"""Cache: one batch of sequences' KV across layers, quantized blocks plus a full-precision tail."""

from __future__ import annotations

from typing import Any

from .backends import backend_of, framework_of, get_backend
from .backends.base import Backend
from .kvblocks import GroupConfig, HeadGroupKV
from .plan import QuantPlan, heads_by_bits
from .quant import check_bits, hadamard

_ROTATE = {False: (False, False), True: (True, True), "k": (True, False), "v": (False, True),
           "kv": (True, True), None: (False, False)}


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
    eviction; ``store``: a ``Store`` to reuse cached prefixes from.
    """

    def __init__(self, backend: Any = "auto", device: str | None = None, bits: int | None = 4,
                 group_size: int = 64, residual: int = 128, plan: QuantPlan | None = None, policy: Any = None,
                 budget: int | None = None, sinks: int = 4, store: Any = None, rotate: Any = False):
        if bits is not None:
            check_bits(bits)
        _check_int("group_size", group_size, 1)
        _check_int("residual", residual, 0)
        _check_int("sinks", sinks, 0)
        if plan is not None and not isinstance(plan, QuantPlan):
            raise TypeError(f"plan must be a lmcache.QuantPlan or None, got {type(plan).__name__}")
        if rotate not in _ROTATE:
            raise ValueError(f"rotate must be False, True, 'k', 'v' or 'kv', got {rotate!r}")
        if policy is not None or budget is not None:
            raise NotImplementedError("token eviction (policy=, budget=) is not implemented yet")
        if store is not None:
            raise NotImplementedError("store= is not implemented yet")
        if isinstance(backend, str) and backend != "auto":
            backend = get_backend(backend, device)  # unknown / missing backends fail here, early
        elif not (backend == "auto" or isinstance(backend, Backend)):
            raise ValueError(f"backend must be 'auto', a backend name or a Backend, got {backend!r}")
        self._backend_arg = backend
        self._be: Backend | None = backend if isinstance(backend, Backend) else None
        self.device = device
        self.bits, self.group_size, self.residual, self.plan = bits, group_size, residual, plan
        self.rotate = rotate
        self.policy, self.budget, self.sinks, self.store = policy, budget, sinks, store
        self._layers: list[_Layer] = []

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
        rk, rv = _ROTATE[self.rotate]
        out = []
        for (k_bits, v_bits), heads in heads_by_bits(kb, vb).items():
            cfg = GroupConfig(k_bits, v_bits, self.group_size, head_dim, self.residual,
                              rk and k_bits is not None, rv and v_bits is not None)
            for bits, spec in ((k_bits, cfg.k_spec), (v_bits, cfg.v_spec)):
                if bits is None:
                    continue
                if head_dim % spec.per_byte:
                    raise ValueError(f"head_dim {head_dim} must be a multiple of {spec.per_byte} for {bits}-bit codes")
                if spec.axis == -1 and head_dim % spec.group_size:
                    raise ValueError(f"group_size={self.group_size} must divide head_dim {head_dim} "
                                     f"(values are grouped over min(group_size, head_dim) channels)")
            if cfg.rotate_k or cfg.rotate_v:
                hadamard(head_dim)
            out.append((heads, cfg))
        return out

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
    def update(self, layer: int, keys, values):
        """Append new tokens to ``layer`` and return the layer's whole K and V.

        ``keys``/``values``: ``[batch, kv_heads, new_tokens, head_dim]``, float16, bfloat16
        or float32, of one framework. Returns ``(k, v)``, each
        ``[batch, kv_heads, seq_len, head_dim]`` of the input's type, dtype and device,
        dequantized where quantized. On error the cache is left as it was.
        """
        be, dtype = self._check_kv(layer, keys, values)
        b, h, t, d = keys.shape
        if layer == len(self._layers):
            groups = [HeadGroupKV(be, heads, cfg, dtype) for heads, cfg in self._group_configs(layer, h, d)]
            ly = _Layer(b, h, d, dtype, be.device_of(keys), groups)
        else:
            ly = self._layers[layer]
        whole = len(ly.groups) == 1
        new_groups = [g.appended(keys if whole else be.take(keys, g.heads, 1),
                                 values if whole else be.take(values, g.heads, 1)) for g in ly.groups]
        ly.groups = new_groups
        ly.last_added = t
        if layer == len(self._layers):
            self._layers.append(ly)
        return self._whole_kv(ly)

    def _whole_kv(self, ly: _Layer):
        be = self._be
        parts = [be.dequantize_view(g.view()) for g in ly.groups]
        if len(parts) == 1:
            return parts[0]
        order = [h for g in ly.groups for h in g.heads]
        inverse = sorted(range(len(order)), key=order.__getitem__)
        k = be.take(be.concat([p[0] for p in parts], 1), inverse, 1)
        v = be.take(be.concat([p[1] for p in parts], 1), inverse, 1)
        return k, v

    def attend(self, layer: int, queries, scale: float | None = None):
        """Attention of the newest ``q_len`` tokens' queries over the layer's compressed cache.

        ``queries``: ``[batch, q_heads, q_len, head_dim]`` with ``q_heads`` a multiple of the
        layer's KV heads (query head ``i`` reads KV head ``i // (q_heads // kv_heads)``) and
        ``q_len`` at most the tokens the last ``update`` of this layer added. Causal: query
        ``i`` sees every kept token up to its own position. ``scale`` defaults to
        ``1/sqrt(head_dim)``. Returns ``[batch, q_heads, q_len, head_dim]`` in the queries' dtype.
        """
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
        rep = hq // ly.kv_heads
        if len(ly.groups) == 1:
            return be.attend(queries, ly.groups[0].view(), float(scale))
        outs, order = [], []
        for g in ly.groups:
            qh = [h * rep + r for h in g.heads for r in range(rep)]
            outs.append(be.attend(be.take(queries, qh, 1), g.view(), float(scale)))
            order += qh
        inverse = sorted(range(len(order)), key=order.__getitem__)
        return be.take(be.concat(outs, 1), inverse, 1)

    def seq_len(self, layer: int = 0) -> int:
        """Tokens held by ``layer`` (0 for a layer not updated yet)."""
        if isinstance(layer, int) and not isinstance(layer, bool) and layer == len(self._layers):
            return 0
        return self._layer(layer).seq_len

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
        }

    def reset(self) -> None:
        """Drop every layer's KV; settings and backend are kept."""
        self._layers = []

    def __repr__(self) -> str:
        s = self.stats()
        return (f"lmcache.Cache(backend={s['backend']}, bits={s['bits']}, layers={s['layers']}, "
                f"seq_len={s['seq_len']}, nbytes={s['nbytes']})")
