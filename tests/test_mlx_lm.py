"""lmcache's LMCacheKV inside mlx-lm's own generation loop, on a tiny random-weight Llama.

The model is built from a config (no download). Its weights are drawn at twice the usual
scale so that greedy decoding is not stuck on one token and depends on the context.
"""

from __future__ import annotations

import numpy as np
import pytest
from conftest import require

mx = require("mlx.core")
require("mlx_lm", "the mlx-lm integration tests need mlx-lm")

from mlx.utils import tree_flatten, tree_unflatten  # noqa: E402
from mlx_lm.generate import generate_step  # noqa: E402
from mlx_lm.models import llama  # noqa: E402
from mlx_lm.models.cache import KVCache, RotatingKVCache, can_trim_prompt_cache, trim_prompt_cache  # noqa: E402
from mlx_lm.models.cache import save_prompt_cache as mlx_lm_save  # noqa: E402

from lmcache import QuantPlan  # noqa: E402
from lmcache.integrations.mlx_lm import (  # noqa: E402
    LMCacheKV,
    load_prompt_cache,
    make_prompt_cache,
    save_prompt_cache,
)

N_TOKENS = 32
# 8-bit KV against mlx-lm's full-precision KVCache, teacher-forced over the prompt and the
# 32 reference tokens: the largest logit difference stays below this fraction of the
# reference logits' standard deviation. Measured 0.10 on Linux CPU (4 bits: 1.6, so the bound
# separates the two); the rest is margin for other platforms' summation order.
LOGIT_TOL_8BIT = 0.25
ARGS = dict(model_type="llama", hidden_size=128, num_hidden_layers=2, intermediate_size=256, num_attention_heads=4,
            num_key_value_heads=2, rms_norm_eps=1e-5, vocab_size=97, tie_word_embeddings=True)
KW = dict(group_size=16, residual=8)  # small, so the 40-token prompt is mostly quantized


def _tiny_llama(dtype=mx.float32, **extra):
    model = llama.Model(llama.ModelArgs(**{**ARGS, **extra}))
    params = []
    for i, (name, p) in enumerate(tree_flatten(model.parameters())):
        if p.ndim == 2:
            p = mx.random.normal(p.shape, key=mx.random.key(i)) * (2.0 / np.sqrt(p.shape[-1]))
        params.append((name, p.astype(dtype)))
    model.update(tree_unflatten(params))
    mx.eval(model.parameters())
    return model


@pytest.fixture(scope="module")
def model():
    return _tiny_llama()


@pytest.fixture(scope="module")
def prompt():
    return mx.array(np.random.default_rng(0).integers(0, ARGS["vocab_size"], 40))


def _generate(model, prompt, cache, n=N_TOKENS):
    toks, logprobs = [], []
    for tok, lp in generate_step(prompt, model, max_tokens=n, prompt_cache=cache):
        toks.append(int(tok))
        logprobs.append(lp)
    return toks, mx.stack(logprobs)


def _forced_logits(model, prompt, cache, tokens):
    """Logits after the prompt and after each of ``tokens[:-1]``, fed one at a time."""
    out = [model(prompt[None], cache=cache)[0, -1]]
    for t in tokens[:-1]:
        out.append(model(mx.array([[t]]), cache=cache)[0, -1])
    return mx.stack(out).astype(mx.float32)


@pytest.mark.parametrize("dtype", [mx.float32, mx.bfloat16], ids=["float32", "bfloat16"])
def test_full_precision_generates_the_same_32_tokens(dtype, prompt):
    model = _tiny_llama(dtype)
    ref_toks, ref_lp = _generate(model, prompt, [KVCache() for _ in model.layers])
    cache = make_prompt_cache(model, bits=None, **KW)
    toks, lp = _generate(model, prompt, cache)
    assert toks == ref_toks
    assert len(set(ref_toks)) > 8  # the test model does depend on its context
    assert bool(mx.array_equal(lp, ref_lp))  # not only the argmax: the same log-probabilities
    assert cache[0].offset >= len(prompt) + N_TOKENS - 1 and cache[0].stats()["tokens_quantized"] > 0


def test_8bit_logits_stay_within_tolerance(model, prompt):
    ref_toks, _ = _generate(model, prompt, [KVCache() for _ in model.layers])
    ref = _forced_logits(model, prompt, [KVCache() for _ in model.layers], ref_toks)
    cache = make_prompt_cache(model, bits=8, **KW)
    got = _forced_logits(model, prompt, cache, ref_toks)
    err = float(mx.abs(got - ref).max())
    assert err <= LOGIT_TOL_8BIT * float(ref.std()), f"max |logit difference| {err:.4f}"
    assert int((got.argmax(-1) == ref.argmax(-1)).sum()) >= N_TOKENS - 4  # measured: 31 of 32
    st = cache[0].stats()
    assert st["tokens_quantized"] == 48 and st["nbytes"] < 0.6 * st["dense_nbytes"]


def test_4bit_generation_runs_and_saves_memory(model, prompt):
    cache = make_prompt_cache(model, bits=4, **KW)
    toks, _ = _generate(model, prompt, cache)
    assert len(toks) == N_TOKENS and all(0 <= t < ARGS["vocab_size"] for t in toks)
    ref = [KVCache() for _ in model.layers]
    _generate(model, prompt, ref)
    assert sum(c.nbytes for c in cache) < 0.5 * sum(c.nbytes for c in ref)


def test_make_prompt_cache_is_a_one_line_swap(model):
    cache = make_prompt_cache(model, bits=4)
    assert len(cache) == len(model.layers) and all(isinstance(c, LMCacheKV) for c in cache)
    # mlx-lm sends caches with a `bits` attribute to its own quantized attention: ours has none.
    assert not hasattr(cache[0], "bits") and cache[0].kv_bits == 4
    assert cache[0].empty() and cache[0].offset == 0 and cache[0].is_trimmable()
    assert not hasattr(cache[0], "to_quantized")  # mlx-lm's kv_bits option must not replace it


def test_plan_gives_bits_per_head_and_sliding_layers_keep_their_cache(prompt):
    model = _tiny_llama(layer_types=["full_attention", "sliding_attention"], sliding_window=16)
    plan = QuantPlan([[8, 4], [2, 2]], [[4, None], [8, 8]])
    cache = make_prompt_cache(model, plan=plan, **KW)
    assert isinstance(cache[0], LMCacheKV) and isinstance(cache[1], RotatingKVCache)
    assert cache[0].k_bits == [8, 4] and cache[0].v_bits == [4, None]
    toks, _ = _generate(model, prompt, cache, n=8)
    assert len(toks) == 8 and len(cache[0].groups) == 2  # heads grouped by their bits
    with pytest.raises(ValueError, match="the plan has 1 layers, the model has 2"):
        make_prompt_cache(model, plan=QuantPlan([[4, 4]], [[4, 4]]))


def test_save_and_load_continue_identically(model, prompt, tmp_path):
    cache = make_prompt_cache(model, bits=4, **KW)
    toks, _ = _generate(model, prompt, cache, n=12)
    path = tmp_path / "prompt.safetensors"
    save_prompt_cache(path, cache, {"model": "tiny-llama"})
    loaded, meta = load_prompt_cache(path, return_metadata=True)
    assert meta == {"model": "tiny-llama"} and all(isinstance(c, LMCacheKV) for c in loaded)
    assert [c.offset for c in loaded] == [c.offset for c in cache]
    assert loaded[0].nbytes == cache[0].nbytes
    nxt = mx.array([toks[-1]])
    a = _generate(model, nxt, cache, n=6)
    b = _generate(model, nxt, loaded, n=6)
    assert a[0] == b[0] and bool(mx.array_equal(a[1], b[1]))


def test_load_reads_mlx_lm_files_and_mixed_lists(model, prompt, tmp_path):
    ref = [KVCache() for _ in model.layers]
    _generate(model, prompt, ref, n=4)
    path = tmp_path / "mlx_lm.safetensors"
    mlx_lm_save(str(path), ref)
    loaded = load_prompt_cache(path)
    assert all(isinstance(c, KVCache) for c in loaded) and loaded[0].offset == ref[0].offset
    mixed = [make_prompt_cache(model, bits=2, **KW)[0], ref[1]]
    _generate(model, prompt, [mixed[0], KVCache()], n=2)
    save_prompt_cache(tmp_path / "mixed.safetensors", mixed)
    back = load_prompt_cache(tmp_path / "mixed.safetensors")
    assert isinstance(back[0], LMCacheKV) and isinstance(back[1], KVCache)
    empty = load_prompt_cache(_saved(tmp_path, [LMCacheKV(8)]))
    assert empty[0].empty() and empty[0].kv_bits == 8


def test_load_reads_the_older_mlx_lm_layout(rng, tmp_path):
    """Older mlx-lm files: [meta_state per layer, metadata, classes] in the metadata, no scalars."""
    cache = LMCacheKV(4, group_size=4, residual=2, k_bits=[4, 8], v_bits=[2, 4])  # two head groups
    k, _ = _feed(cache, rng, [9, 1])
    path = tmp_path / "old.safetensors"
    mx.save_safetensors(str(path), dict(tree_flatten([cache.state[1]])),
                        dict(tree_flatten([[list(cache.meta_state)], {"m": "x"}, ["LMCacheKV"]])))
    back, meta = load_prompt_cache(path, return_metadata=True)
    assert meta == {"m": "x"} and back[0].offset == 10 and len(back[0].groups) == 2
    assert np.array_equal(np.array(back[0]._whole_kv()[0]), np.array(k))


def _saved(tmp_path, cache):
    p = tmp_path / "x.safetensors"
    save_prompt_cache(p, cache)
    return p


def _feed(cache, rng, sizes, dtype=np.float16):
    for n in sizes:
        k = mx.array(rng.standard_normal((1, 2, n, 8)).astype(dtype))
        v = mx.array(rng.standard_normal((1, 2, n, 8)).astype(dtype))
        out = cache.update_and_fetch(k, v)
    return out


@pytest.mark.parametrize("keep", [25, 22, 19, 13, 9, 3])
def test_trim_keeps_exactly_the_first_tokens(rng, keep):
    cache = LMCacheKV(4, group_size=4, residual=3)
    k, v = _feed(cache, rng, [11, 1, 1, 1, 1, 1, 1, 1, 1, 5, 1, 1])
    assert cache.offset == 26 and cache.groups[0].n_quant == 20
    assert cache.trim(26 - keep) == 26 - keep and cache.offset == keep
    k2, v2 = cache._whole_kv()
    assert np.array_equal(np.array(k2), np.array(k)[:, :, :keep])
    assert np.array_equal(np.array(v2), np.array(v)[:, :, :keep])
    k3, _ = _feed(cache, rng, [7])  # it keeps working after a trim
    assert cache.offset == keep + 7 and k3.shape[2] == keep + 7
    kept_q = min(keep // 4 * 4, 20)  # the quantized blocks below the cut are untouched
    assert np.array_equal(np.array(k3)[:, :, :kept_q], np.array(k)[:, :, :kept_q])


def test_trim_through_mlx_lm_helpers(rng):
    caches = [LMCacheKV(8, group_size=4, residual=2) for _ in range(2)]
    for c in caches:
        _feed(c, rng, [9, 1, 1])
    assert can_trim_prompt_cache(caches)
    assert trim_prompt_cache(caches, 4) == 4 and [c.offset for c in caches] == [7, 7]
    assert caches[0].trim(100) == 7 and caches[0].empty() and caches[0].offset == 0


def test_masks_follow_mlx_lm_conventions(rng):
    cache = LMCacheKV(4, group_size=4, residual=2)
    assert cache.make_mask(1) is None and cache.make_mask(5) == "causal"
    _feed(cache, rng, [3])
    m = np.array(cache.make_mask(2, return_array=True))
    assert m.shape == (2, 5) and m.tolist() == [[True] * 4 + [False], [True] * 5]
    w = np.array(cache.make_mask(1, window_size=2))
    assert w.tolist() == [[False, False, True, True]]


def test_bad_input_is_rejected_and_leaves_the_cache_as_it_was(rng):
    with pytest.raises(ValueError, match="bits must be one of 2, 4 or 8"):
        LMCacheKV(3)
    with pytest.raises(ValueError, match="rotate must be"):
        LMCacheKV(4, rotate="q")
    with pytest.raises(ValueError, match="k_bits and v_bits must both be given"):
        LMCacheKV(4, k_bits=[4, 4])
    cache = LMCacheKV(4, group_size=4, residual=2)
    _feed(cache, rng, [6])
    before = cache.offset, cache.nbytes
    with pytest.raises(ValueError, match="holds batch 1, 2 KV heads of head_dim 8"):
        cache.update_and_fetch(mx.zeros((1, 3, 1, 8), mx.float16), mx.zeros((1, 3, 1, 8), mx.float16))
    with pytest.raises(TypeError, match="must share one of float16"):
        cache.update_and_fetch(mx.zeros((1, 2, 1, 8), mx.int32), mx.zeros((1, 2, 1, 8), mx.int32))
    with pytest.raises(TypeError, match="must be mlx arrays"):
        cache.update_and_fetch(np.zeros((1, 2, 1, 8)), np.zeros((1, 2, 1, 8)))
    assert (cache.offset, cache.nbytes) == before
    with pytest.raises(ValueError, match="n must be an integer"):
        cache.trim(-1)
    with pytest.raises(ValueError, match="not an LMCacheKV meta_state"):
        LMCacheKV.from_state(["{}", []])
    with pytest.raises(ValueError, match="group_size=6 must divide head_dim 8"):
        LMCacheKV(4, group_size=6).update_and_fetch(mx.zeros((1, 1, 1, 8)), mx.zeros((1, 1, 1, 8)))
