"""The paged layout: page accounting, writes through the block table, and attention over it.

The fused kernel runs under ``TRITON_INTERPRET=1`` on CPU (skipped otherwise) and compiled
with ``LMCACHE_TEST_DEVICE=cuda``; the torch-only path always runs.
"""

from __future__ import annotations

import os

import numpy as np
import pytest
from conftest import TEST_DEVICE, require

torch = require("torch")

from lmcache.backends.torch import ops  # noqa: E402
from lmcache.backends.torch.paged import PagedKVPool, block_table, paged_attention  # noqa: E402

DEVICE = "cuda" if TEST_DEVICE == "cuda" and torch.cuda.is_available() else "cpu"
KERNEL = DEVICE == "cuda" or os.environ.get("TRITON_INTERPRET") == "1"


def _rand(rng, *shape, dtype=torch.float16):
    return torch.from_numpy(rng.standard_normal(shape).astype(np.float32)).to(dtype).to(DEVICE)


def _pool(**kw):
    args = dict(num_pages=12, kv_heads=2, head_dim=64, page_size=32, k_bits=4, v_bits=4, group_size=16,
                dtype=torch.float16, device=DEVICE)
    args.update(kw)
    return PagedKVPool(**args)


def test_allocate_share_free():
    pool = _pool(num_pages=4)
    a = pool.allocate(3)
    assert pool.num_free == 1 and all(pool.refcount[p] == 1 for p in a)
    pool.share(a[:2])
    pool.free(a)
    assert pool.num_free == 2  # the two shared pages are still held once
    pool.free(a[:2])
    assert pool.num_free == 4
    with pytest.raises(MemoryError, match="free pages"):
        pool.allocate(5)
    with pytest.raises(ValueError, match="not allocated"):
        pool.free([0])


def test_bad_arguments_are_rejected():
    with pytest.raises(ValueError, match="page_size"):
        _pool(page_size=24)
    with pytest.raises(ValueError, match="num_pages"):
        _pool(num_pages=0)
    pool = _pool()
    with pytest.raises(ValueError, match="whole key groups"):
        pool.append([], 0, torch.zeros(2, 10, 64), torch.zeros(2, 10, 64))
    assert pool.num_free == pool.num_pages  # nothing was allocated by the failed call


def test_append_reads_back_what_quantize_gives(rng):
    pool = _pool()
    k, v = _rand(rng, 2, 80, 64), _rand(rng, 2, 80, 64)
    pages: list[int] = []
    n = pool.append(pages, 0, k[:, :48], v[:, :48])
    n = pool.append(pages, n, k[:, 48:], v[:, 48:])  # starts inside a partly filled page
    assert n == 80 and len(pages) == 3
    kd, vd = pool.dequantize_sequence(pages, n)
    np.testing.assert_array_equal(kd.cpu().numpy(),
                                  ops.dequantize(*ops.quantize(k, pool.k_spec), pool.k_spec, torch.float16).cpu())
    np.testing.assert_array_equal(vd.cpu().numpy(),
                                  ops.dequantize(*ops.quantize(v, pool.v_spec), pool.v_spec, torch.float16).cpu())


def test_writing_into_a_shared_page_is_refused(rng):
    pool = _pool()
    a: list[int] = []
    pool.append(a, 0, _rand(rng, 2, 16, 64), _rand(rng, 2, 16, 64))
    b = pool.share(a)
    free, refs = pool.num_free, list(pool.refcount)
    with pytest.raises(ValueError, match="shared"):
        pool.append(b, 16, _rand(rng, 2, 48, 64), _rand(rng, 2, 48, 64))  # would also need new pages
    assert pool.num_free == free and list(pool.refcount) == refs and b == a  # nothing allocated or grown


def test_double_free_and_bad_import_are_refused():
    pool = _pool(num_pages=4)
    a = pool.allocate(1)
    with pytest.raises(ValueError, match="double free"):
        pool.free([a[0], a[0]])
    assert pool.refcount[a[0]] == 1 and pool.num_free == 3
    with pytest.raises(ValueError, match="k_codes"):
        pool.import_pages({})


def test_empty_sequence_attends_to_its_residual(rng):
    pool = _pool()
    q = _rand(rng, 1, 2, 1, 64)
    kr, vr = _rand(rng, 1, 2, 5, 64), _rand(rng, 1, 2, 5, 64)
    out = paged_attention(q, pool, block_table([[]], DEVICE), torch.tensor([0], device=DEVICE), 0.125, kr, vr,
                          use_triton=False)
    expect = ops.attention(q.float(), kr.float(), vr.float(), 0.125)
    torch.testing.assert_close(out.float(), expect, atol=2e-3, rtol=2e-3)


def _sequences(rng, pool):
    """Two sequences of 96 and 48 quantized tokens sharing their first page (32 tokens)."""
    k0, v0 = _rand(rng, 2, 96, 64), _rand(rng, 2, 96, 64)
    s0: list[int] = []
    pool.append(s0, 0, k0, v0)
    s1 = pool.share(s0[:1])
    pool.append(s1, 32, _rand(rng, 2, 16, 64), _rand(rng, 2, 16, 64))
    return [s0, s1], torch.tensor([96, 48], device=DEVICE)


def _dense_reference(q, pool, seqs, lens, kr, vr):
    outs = []
    for i, s in enumerate(seqs):
        k, v = pool.dequantize_sequence(s, int(lens[i]))
        k = torch.cat([k[None].float(), kr[i:i + 1].float()], 2)
        v = torch.cat([v[None].float(), vr[i:i + 1].float()], 2)
        outs.append(ops.attention(q[i:i + 1].float(), k, v, 0.125))
    return torch.cat(outs).cpu().numpy()


@pytest.mark.parametrize("use_triton", [False, True])
@pytest.mark.parametrize("L", [1, 7])
def test_paged_attention_matches_dense(rng, use_triton, L):
    if use_triton and not KERNEL:
        pytest.skip("the kernel needs a GPU or TRITON_INTERPRET=1")
    if use_triton:
        require("triton")
    pool = _pool()
    seqs, lens = _sequences(rng, pool)
    q = _rand(rng, 2, 6, L, 64)
    kr, vr = _rand(rng, 2, 2, 9, 64), _rand(rng, 2, 2, 9, 64)
    out = paged_attention(q, pool, block_table(seqs, DEVICE), lens, 0.125, kr, vr, use_triton=use_triton)
    np.testing.assert_allclose(out.float().cpu().numpy(), _dense_reference(q, pool, seqs, lens, kr, vr),
                               atol=5e-3, rtol=5e-3)


def test_pages_move_between_tiers(rng):
    """Export a sequence's pages to host arrays, free them, import them again elsewhere in the pool."""
    pool = _pool()
    seqs, lens = _sequences(rng, pool)
    q = _rand(rng, 2, 2, 1, 64)
    kr, vr = _rand(rng, 2, 2, 3, 64), _rand(rng, 2, 2, 3, 64)
    before = paged_attention(q, pool, block_table(seqs, DEVICE), lens, 0.125, kr, vr, use_triton=False)
    host = pool.export_pages(seqs[0])
    pool.free(seqs[0])
    pool.allocate(2)  # someone else takes the freed pages
    seqs[0] = pool.import_pages(host)
    after = paged_attention(q, pool, block_table(seqs, DEVICE), lens, 0.125, kr, vr, use_triton=False)
    torch.testing.assert_close(before, after, atol=0, rtol=0)


@pytest.mark.parametrize("step,l2,stages", [(1, 0, 0), (2, 0, 0), (2, 1, 0), (2, 0, 3)])
def test_paged_imma_matches_dense(rng, monkeypatch, step, l2, stages):
    """The integer matrix-unit kernel through a block table (head dim 128, pages of 64 tokens,
    a shared first page), one or two tiles per loop step, with the L2 bulk prefetch of the next
    step's tiles through the block table (``l2``) or the tiles copied into shared-memory stages
    through it (``stages``)."""
    if not KERNEL:
        pytest.skip("the kernel needs a GPU or TRITON_INTERPRET=1")
    require("triton")
    from lmcache.backends.torch.triton import decode_attention as da
    from lmcache.backends.torch.triton import decode_imma

    for key, value in {"rows_max": 1 << 20, "imma": True,
                       "imma_step": {4: step, 8: step}, "programs_per_sm": 1,
                       "imma_l2_ahead": {4: l2, 8: l2}, "imma_stages": {4: stages, 8: stages},
                       "rows": {**da.CONFIG["rows"], "qrows": True}}.items():
        monkeypatch.setitem(da.CONFIG, key, value)
    calls = []
    launch = decode_imma.launch
    monkeypatch.setattr(decode_imma, "launch", lambda *a, **k: calls.append(1) or launch(*a, **k))
    pool = _pool(head_dim=128, page_size=64, group_size=64)
    s0: list[int] = []
    pool.append(s0, 0, _rand(rng, 2, 192, 128), _rand(rng, 2, 192, 128))
    s1 = pool.share(s0[:1])
    pool.append(s1, 64, _rand(rng, 2, 64, 128), _rand(rng, 2, 64, 128))
    seqs, lens = [s0, s1], torch.tensor([192, 128], device=DEVICE)
    q = _rand(rng, 2, 6, 1, 128)
    kr, vr = _rand(rng, 2, 2, 9, 128), _rand(rng, 2, 2, 9, 128)
    out = paged_attention(q, pool, block_table(seqs, DEVICE), lens, 0.125, kr, vr, use_triton=True)
    assert calls
    np.testing.assert_allclose(out.float().cpu().numpy(), _dense_reference(q, pool, seqs, lens, kr, vr),
                               atol=5e-3, rtol=5e-3)
