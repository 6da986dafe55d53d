"""mlx-lm integration: a compressed per-layer KV cache that mlx-lm's generation loop accepts.

One line swaps it in::

    from lmcache.integrations.mlx_lm import make_prompt_cache
    cache = make_prompt_cache(model, bits=4)          # instead of mlx_lm's make_prompt_cache
    for tok, _ in generate_step(prompt, model, prompt_cache=cache): ...

Each layer's ``LMCacheKV`` keeps its keys and values as lmcache quantized blocks (keys per
channel over ``group_size`` tokens, values per token, the DESIGN.md format) plus a
full-precision residual of the newest tokens, and hands mlx-lm's attention the dequantized
K/V of that layer on every ``update_and_fetch``. It has no ``bits`` attribute on purpose:
mlx-lm routes caches that have one to its own quantized attention.

``save_prompt_cache`` / ``load_prompt_cache`` write and read the same safetensors layout as
mlx-lm's functions of those names (class names and scalars in the metadata), so a file may
mix our layers with mlx-lm's own cache classes.
"""

from __future__ import annotations

import json
from typing import Any

import mlx.core as mx

from ..backends import get_backend
from ..backends.base import QuantBlock
from ..kvblocks import ROTATE, GroupConfig, HeadGroupKV, group_configs, whole_kv
from ..plan import QuantPlan
from ..quant import check_bits

__all__ = ["LMCacheKV", "load_prompt_cache", "make_prompt_cache", "save_prompt_cache"]

_FORMAT = "lmcache.LMCacheKV/1"


def _check_int(name: str, value: Any, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return value


def _check_row(name: str, row: Any) -> list:
    if row is None:
        return None
    if not isinstance(row, (list, tuple)) or not row:
        raise ValueError(f"{name} must be a non-empty list of bits per KV head (2, 4, 8 or None), got {row!r}")
    return [None if b is None else check_bits(b) for b in row]


class LMCacheKV:
    """One layer's compressed KV cache, in mlx-lm's cache protocol.

    ``kv_bits``: 2, 4, 8 or ``None`` (full precision) for every KV head, unless
    ``k_bits``/``v_bits`` (one entry per KV head, e.g. a ``QuantPlan`` row) say otherwise.
    ``group_size``: tokens per key group and channels per value group (capped at head_dim).
    ``residual``: newest tokens kept in full precision. ``rotate``: ``False``, ``True``/``"kv"``,
    ``"k"`` or ``"v"`` (Hadamard rotation before quantizing, head_dim a power of two).

    mlx-lm reads ``offset`` (tokens held), calls ``update_and_fetch(keys, values)`` with
    ``[B, kv_heads, new_tokens, head_dim]`` arrays and gets the layer's whole K and V back,
    evaluates ``state``, and may ``trim`` tokens from the end.
    """

    def __init__(self, kv_bits: int | None = 4, group_size: int = 64, residual: int = 128,
                 k_bits: list | None = None, v_bits: list | None = None, rotate: Any = False):
        if kv_bits is not None:
            check_bits(kv_bits)
        _check_int("group_size", group_size, 1)
        _check_int("residual", residual, 0)
        k_bits, v_bits = _check_row("k_bits", k_bits), _check_row("v_bits", v_bits)
        if (k_bits is None) != (v_bits is None) or (k_bits is not None and len(k_bits) != len(v_bits)):
            raise ValueError(f"k_bits and v_bits must both be given, with one entry per KV head each, "
                             f"got {k_bits!r} and {v_bits!r}")
        if rotate not in ROTATE:
            raise ValueError(f"rotate must be False, True, 'k', 'v' or 'kv', got {rotate!r}")
        self.kv_bits, self.group_size, self.residual = kv_bits, group_size, residual
        self.k_bits, self.v_bits, self.rotate = k_bits, v_bits, rotate
        self.groups: list[HeadGroupKV] | None = None  # built on the first update
        self.dtype: str | None = None
        self._batch = 0

    # ------------------------------------------------------------------ mlx-lm protocol
    @property
    def offset(self) -> int:
        """Tokens held (mlx-lm's position of the next token)."""
        return 0 if self.groups is None else self.groups[0].seq_len

    def size(self) -> int:
        return self.offset

    def empty(self) -> bool:
        return self.groups is None

    def is_trimmable(self) -> bool:
        return True

    def _configs(self, kv_heads: int, head_dim: int) -> list[tuple[list[int], GroupConfig]]:
        kb = self.k_bits if self.k_bits is not None else [self.kv_bits] * kv_heads
        vb = self.v_bits if self.v_bits is not None else [self.kv_bits] * kv_heads
        if len(kb) != kv_heads:
            raise ValueError(f"k_bits/v_bits list {len(kb)} KV heads, the layer has {kv_heads}")
        return group_configs(kb, vb, self.group_size, head_dim, self.residual, self.rotate)

    def update_and_fetch(self, keys: mx.array, values: mx.array) -> tuple[mx.array, mx.array]:
        """Append ``keys``/``values`` ``[B, kv_heads, new_tokens, head_dim]``; return the whole K, V.

        The result is ``[B, kv_heads, offset, head_dim]`` in the input dtype, dequantized where
        quantized. On error the cache is left as it was.
        """
        be = get_backend("mlx")
        if not (isinstance(keys, mx.array) and isinstance(values, mx.array)):
            raise TypeError(f"keys and values must be mlx arrays, got {type(keys).__name__} and "
                            f"{type(values).__name__}")
        if keys.ndim != 4 or keys.shape[:3] != values.shape[:3] or keys.shape[3] != values.shape[3]:
            raise ValueError(f"keys and values must both be [batch, kv_heads, new_tokens, head_dim], "
                             f"got {tuple(keys.shape)} and {tuple(values.shape)}")
        dtype = be.dtype_name(keys)
        if dtype not in ("float16", "bfloat16", "float32") or be.dtype_name(values) != dtype:
            raise TypeError(f"keys and values must share one of float16, bfloat16, float32, "
                            f"got {dtype} and {be.dtype_name(values)}")
        b, h, _, d = keys.shape
        groups = self.groups
        if groups is None:
            groups = [HeadGroupKV(be, heads, cfg, dtype) for heads, cfg in self._configs(h, d)]
        else:
            held = (self._batch, sum(len(g.heads) for g in groups), groups[0].cfg.head_dim)
            if (b, h, d) != held or dtype != self.dtype:
                raise ValueError(f"this layer holds batch {held[0]}, {held[1]} KV heads of head_dim {held[2]} "
                                 f"in {self.dtype}, got shape {tuple(keys.shape)} in {dtype}")
        whole = len(groups) == 1
        self.groups = [g.appended(keys if whole else be.take(keys, g.heads, 1),
                                  values if whole else be.take(values, g.heads, 1)) for g in groups]
        self.dtype = dtype
        self._batch = b
        return self._whole_kv()

    def _whole_kv(self) -> tuple[mx.array, mx.array]:
        return whole_kv(get_backend("mlx"), self.groups)

    def make_mask(self, N: int, return_array: bool = False, window_size: int | None = None):
        """The attention mask for ``N`` new tokens after ``offset`` (mlx-lm's convention).

        ``None`` for one token, ``"causal"`` for several (the fused attention aligns it to
        the end), else a boolean ``[N, offset + N]`` array. Every token is kept, so a
        sliding-window layer gets its window as a mask.
        """
        if window_size is None and not return_array:
            return None if N == 1 else "causal"
        rinds = mx.arange(self.offset + N)[None]
        linds = mx.arange(self.offset, self.offset + N)[:, None]
        mask = linds >= rinds
        if window_size is not None:
            mask = mask & (linds < rinds + window_size)
        return mask

    def trim(self, n: int) -> int:
        """Drop the newest ``n`` tokens (at most ``offset``); returns how many were dropped.

        Quantized blocks are cut at a key-group boundary, exactly; the tokens between that
        boundary and the new end come back into the full-precision residual as they were
        dequantized, and are quantized again when the residual next fills up.
        """
        _check_int("n", n, 0)
        n = min(self.offset, n)
        if n:
            keep = self.offset - n
            self.groups = [_trimmed(g, keep) for g in self.groups] if keep else None
        return n

    @property
    def nbytes(self) -> int:
        """Bytes held: packed codes, scales, offsets, full-precision blocks and the residual."""
        return 0 if self.groups is None else sum(g.nbytes for g in self.groups)

    def stats(self) -> dict:
        """Tokens held (quantized / residual), bytes held and the bytes the same K/V take dense."""
        if self.groups is None:
            return {"tokens": 0, "tokens_quantized": 0, "nbytes": 0, "dense_nbytes": 0}
        g0 = self.groups[0]
        item = 4 if self.dtype == "float32" else 2
        heads = sum(len(g.heads) for g in self.groups)
        dense = 2 * self._batch * heads * self.offset * self.groups[0].cfg.head_dim * item
        return {"tokens": self.offset, "tokens_quantized": g0.n_quant, "nbytes": self.nbytes, "dense_nbytes": dense}

    # ------------------------------------------------------------------ state
    @property
    def meta_state(self) -> tuple[str]:
        """The settings and block layout as one JSON string (mlx-lm keeps strings here)."""
        meta = {"format": _FORMAT, "kv_bits": self.kv_bits, "group_size": self.group_size,
                "residual": self.residual, "k_bits": self.k_bits, "v_bits": self.v_bits,
                "rotate": self.rotate, "dtype": self.dtype}
        if self.groups is not None:
            meta["groups"] = [{"heads": g.heads, "k_bits": g.cfg.k_bits, "v_bits": g.cfg.v_bits,
                               "head_dim": g.cfg.head_dim, "n_quant": g.n_quant,
                               "k_quant": [isinstance(x, QuantBlock) for x in g.k_blocks],
                               "v_quant": [isinstance(x, QuantBlock) for x in g.v_blocks]}
                              for g in self.groups]
            meta["batch"] = self._batch
        return (json.dumps(meta),)

    @meta_state.setter
    def meta_state(self, v) -> None:
        self._apply_state(None, v)

    @property
    def state(self) -> list:
        """``[meta JSON, arrays per head group]``: what mlx-lm evaluates and saves.

        Per head group: ``{"k": [...], "v": [...], "k_res": ..., "v_res": ...}`` where a
        quantized block is ``{"codes", "scale", "lo"}`` and a full-precision one an array.
        """
        groups = []
        for g in self.groups or []:
            item = {"k": [_block_state(x) for x in g.k_blocks], "v": [_block_state(x) for x in g.v_blocks]}
            if g.k_res is not None:
                item["k_res"], item["v_res"] = g.k_res, g.v_res
            groups.append(item)
        return [self.meta_state[0], groups]

    @state.setter
    def state(self, v) -> None:
        # A file drops an empty group list, so a saved empty cache comes back as [meta].
        if not isinstance(v, (list, tuple)) or len(v) not in (1, 2) or not isinstance(v[0], str):
            raise ValueError("an LMCacheKV state is [meta JSON string, groups], as its state property gives")
        self._apply_state(v[1] if len(v) == 2 else [], (v[0],))

    def _apply_state(self, groups_state, meta_state) -> None:
        try:
            meta = json.loads(meta_state[0])
        except (TypeError, IndexError, json.JSONDecodeError) as e:
            raise ValueError(f"meta_state is not an LMCacheKV meta_state: {e}") from None
        if not isinstance(meta, dict) or meta.get("format") != _FORMAT:
            raise ValueError(f"meta_state is not an LMCacheKV meta_state (expected format {_FORMAT!r})")
        self.__init__(meta["kv_bits"], meta["group_size"], meta["residual"], meta["k_bits"], meta["v_bits"],
                      meta["rotate"])
        self.dtype = meta["dtype"]
        if "groups" not in meta or groups_state is None:
            return
        be = get_backend("mlx")
        rk, rv = ROTATE[self.rotate]
        groups = []
        for gm, gs in zip(meta["groups"], groups_state):
            cfg = GroupConfig(gm["k_bits"], gm["v_bits"], self.group_size, gm["head_dim"], self.residual,
                              rk and gm["k_bits"] is not None, rv and gm["v_bits"] is not None)
            g = HeadGroupKV(be, list(gm["heads"]), cfg, self.dtype)
            g.k_blocks = [_block_from_state(x, cfg.k_spec) for x in gs["k"]]
            g.v_blocks = [_block_from_state(x, cfg.v_spec) for x in gs["v"]]
            g.n_quant = gm["n_quant"]
            g.k_res, g.v_res = gs.get("k_res"), gs.get("v_res")
            groups.append(g)
        if len(groups) != len(meta["groups"]):
            raise ValueError(f"the state holds {len(groups)} head groups, its meta_state {len(meta['groups'])}")
        self.groups = groups
        self._batch = meta["batch"]

    @classmethod
    def from_state(cls, state, meta_state=None) -> LMCacheKV:
        """Rebuild a cache from its ``state`` (and, optionally, a separate ``meta_state``)."""
        obj = cls.__new__(cls)
        if meta_state is not None:  # mlx-lm's older protocol: the arrays and the strings apart
            ours = isinstance(state, (list, tuple)) and len(state) in (1, 2) and isinstance(state[0], str)
            obj._apply_state((state[1] if len(state) == 2 else []) if ours else state, meta_state)
        else:
            obj.state = state
        return obj

    def __repr__(self) -> str:
        return (f"LMCacheKV(kv_bits={self.kv_bits}, group_size={self.group_size}, residual={self.residual}, "
                f"offset={self.offset}, nbytes={self.nbytes})")


def _block_state(x):
    return {"codes": x.codes, "scale": x.scale, "lo": x.lo} if isinstance(x, QuantBlock) else x


def _block_from_state(x, spec):
    return QuantBlock(x["codes"], x["scale"], x["lo"], spec) if isinstance(x, dict) else x


def _cut(block, m: int, axis_groups: int | None):
    """The first ``m`` tokens of a block (``axis_groups``: tokens per key scale row, or None)."""
    if not isinstance(block, QuantBlock):
        return block[:, :, :m]
    ms = m // axis_groups if axis_groups else m
    return QuantBlock(block.codes[:, :, :m], block.scale[:, :, :ms], block.lo[:, :, :ms], block.spec)


def _trimmed(g: HeadGroupKV, keep: int) -> HeadGroupKV:
    """A copy of ``g`` holding its first ``keep`` tokens (``0 < keep <= g.seq_len``)."""
    be, cfg = g.be, g.cfg
    new = HeadGroupKV(be, g.heads, cfg, g.dtype)
    if keep >= g.n_quant:
        r = keep - g.n_quant
        new.k_blocks, new.v_blocks, new.n_quant = list(g.k_blocks), list(g.v_blocks), g.n_quant
        new.k_res, new.v_res = (g.k_res[:, :, :r], g.v_res[:, :, :r]) if r else (None, None)
        return new
    gsz = cfg.group_size
    keep_q = keep // gsz * gsz  # quantized blocks are cut at a key-group boundary, exactly
    start = 0
    tail_k, tail_v = [], []
    for kb, vb in zip(g.k_blocks, g.v_blocks):
        n = kb.codes.shape[2] if isinstance(kb, QuantBlock) else kb.shape[2]
        if start + n <= keep_q:
            new.k_blocks.append(kb)
            new.v_blocks.append(vb)
        else:
            m = keep_q - start
            if m > 0:
                new.k_blocks.append(_cut(kb, m, gsz))
                new.v_blocks.append(_cut(vb, m, None))
            if start < keep:  # tokens keep_q..keep of this block return to the residual
                lo_t, hi_t = max(m, 0), min(n, keep - start)
                kd = be.dequantize(kb, g.dtype) if isinstance(kb, QuantBlock) else kb
                vd = be.dequantize(vb, g.dtype) if isinstance(vb, QuantBlock) else vb
                tail_k.append(kd[:, :, lo_t:hi_t])
                tail_v.append(vd[:, :, lo_t:hi_t])
        start += n
    new.n_quant = keep_q
    if tail_k:
        new.k_res = be.concat(tail_k, 2) if len(tail_k) > 1 else tail_k[0]
        new.v_res = be.concat(tail_v, 2) if len(tail_v) > 1 else tail_v[0]
    return new


def make_prompt_cache(model: Any, bits: int | None = 4, group_size: int = 64, residual: int = 128,
                      plan: QuantPlan | None = None, rotate: Any = False) -> list:
    """mlx-lm's ``make_prompt_cache`` with every full-attention ``KVCache`` layer compressed.

    ``model``: an mlx-lm model (``model.layers``; its own ``make_cache()`` when it has one, so
    sliding-window and recurrent layers keep their mlx-lm caches). ``bits``/``group_size``/
    ``residual``/``rotate``: as ``LMCacheKV``. ``plan``: a ``QuantPlan`` whose layer ``i``
    gives the bits of layer ``i``'s KV heads. Returns one cache per layer.
    """
    if bits is not None:
        check_bits(bits)
    if plan is not None and not isinstance(plan, QuantPlan):
        raise TypeError(f"plan must be a lmcache.QuantPlan or None, got {type(plan).__name__}")
    layers = getattr(model, "layers", None)
    if layers is None:
        raise TypeError(f"model must be an mlx-lm model with a .layers list, got {type(model).__name__}")
    base = model.make_cache() if hasattr(model, "make_cache") else [None] * len(layers)
    if plan is not None and plan.num_layers != len(base):
        raise ValueError(f"the plan has {plan.num_layers} layers, the model has {len(base)}")
    out = []
    for i, c in enumerate(base):
        if c is not None and type(c).__name__ != "KVCache":
            out.append(c)  # a sliding-window, recurrent or other special cache stays as it is
            continue
        kb, vb = (plan.k_bits[i], plan.v_bits[i]) if plan is not None else (None, None)
        out.append(LMCacheKV(bits, group_size, residual, kb, vb, rotate))
    return out


# ---------------------------------------------------------------------- save / load
def save_prompt_cache(file_name: str, cache: list, metadata: dict | None = None) -> None:
    """Save a prompt cache (``LMCacheKV`` and/or mlx-lm cache layers) to a ``.safetensors`` file.

    The layout is mlx-lm's: arrays of each layer's ``state`` under ``"<layer>.<path>"``, and in
    the metadata the user's ``metadata`` (strings), the class name of every layer and which
    entries were scalars. ``load_prompt_cache`` reads it back.
    """
    from mlx.utils import tree_flatten

    if metadata is not None and not all(isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()):
        raise TypeError("metadata must map strings to strings")
    scalars: list = [""]  # never empty, or tree_flatten would drop it

    def as_array(item):
        key, data = item
        if isinstance(data, mx.array):
            return key, data
        if isinstance(data, (bool, int, float)):
            scalars.append((key, "scalar"))
            return key, mx.array(data)
        if isinstance(data, str):
            scalars.append((key, "string"))
            return key, mx.array([ord(ch) for ch in data], dtype=mx.int32)
        if data is None:
            scalars.append((key, "none"))
            return key, mx.array([])
        raise ValueError(f"cache state entry {key} of type {type(data).__name__} cannot be saved")

    arrays = dict(map(as_array, tree_flatten([c.state for c in cache])))
    classes = [type(c).__name__ for c in cache]
    meta = dict(tree_flatten([metadata or {}, classes, scalars]))
    mx.save_safetensors(str(file_name), arrays, meta)


def load_prompt_cache(file_name: str, return_metadata: bool = False):
    """Load a prompt cache written by ``save_prompt_cache`` (or by mlx-lm's function of that name).

    Returns the list of per-layer caches, and the user metadata when ``return_metadata``.
    """
    from mlx.utils import tree_unflatten

    arrays, meta = mx.load(str(file_name), return_metadata=True)
    tree = tree_unflatten(list(meta.items()))
    if len(tree) == 3 and isinstance(tree[1], dict):
        # the older mlx-lm layout: [meta_state per layer, metadata, classes], no scalars
        infos, metadata, classes = tree
        states = _by_layer(tree_unflatten(list(arrays.items())) if arrays else [], len(classes))
        caches = [_cache_class(c).from_state(s, i) for c, s, i in zip(classes, states, infos)]
        return (caches, metadata) if return_metadata else caches
    metadata, classes, scalars = tree
    for key, kind in scalars[1:]:
        a = arrays[key]
        if kind == "scalar":
            arrays[key] = a.item()
        elif kind == "string":
            arrays[key] = "".join(chr(i) for i in a.tolist())
        elif kind == "none":
            arrays[key] = None
        else:
            raise ValueError(f"{file_name}: unknown scalar kind {kind!r} for {key}")
    states = _by_layer(tree_unflatten(list(arrays.items())) if arrays else [], len(classes))
    caches = [_cache_class(c).from_state(s) for c, s in zip(classes, states)]
    return (caches, metadata) if return_metadata else caches


def _by_layer(states, n: int) -> list:
    """One state per layer; layers whose state saved no array come back empty."""
    if isinstance(states, dict):  # tree_unflatten gives a dict when some layer indices are missing
        return [states.get(str(i), []) for i in range(n)]
    return list(states) + [[]] * (n - len(states))


def _cache_class(name: str):
    if name == "LMCacheKV":
        return LMCacheKV
    from mlx_lm.models import cache as mlc

    cls = getattr(mlc, name, None)
    if cls is None:
        raise ValueError(f"unknown prompt cache class {name!r}: neither lmcache's nor mlx-lm's")
    return cls
