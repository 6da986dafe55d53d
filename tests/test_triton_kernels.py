"""The Triton kernels against the numpy reference, at odd sizes.

On CPU they run under ``TRITON_INTERPRET=1`` (the noxfile sets it; tiny shapes, the
interpreter is slow); with ``LMCACHE_TEST_DEVICE=cuda`` the same tests run compiled on the GPU.
"""

from __future__ import annotations

import os

import numpy as np
import pytest
from conftest import TEST_DEVICE, require

torch = require("torch")
require("triton")

DEVICE = "cuda" if TEST_DEVICE == "cuda" else "cpu"
if DEVICE == "cuda" and not torch.cuda.is_available():
    pytest.skip("LMCACHE_TEST_DEVICE=cuda but torch sees no GPU", allow_module_level=True)
if DEVICE == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("Triton kernels run on CPU only under TRITON_INTERPRET=1 (nox -s tests-cpu sets it)",
                allow_module_level=True)

from lmcache.backends import get_backend  # noqa: E402
from lmcache.backends.base import QuantBlock  # noqa: E402
from lmcache.backends.torch import ops  # noqa: E402
from lmcache.backends.torch.triton import decode_attention as da  # noqa: E402
from lmcache.backends.torch.triton import decode_mma  # noqa: E402
from lmcache.backends.torch.triton.dequantize import dequantize  # noqa: E402
from lmcache.backends.torch.triton.quantize import quantize, supported  # noqa: E402
from lmcache.quant import QuantSpec  # noqa: E402

NB = get_backend("numpy")
TOL = {torch.float32: 1e-4, torch.float16: 5e-3, torch.bfloat16: 2e-2}


def _np(x: torch.Tensor) -> np.ndarray:
    """Host copy in numpy with the same dtype (bfloat16 through ml_dtypes)."""
    if x.dtype == torch.bfloat16:
        ml = require("ml_dtypes")
        return x.float().cpu().numpy().astype(ml.bfloat16)
    return x.cpu().numpy()


def _f32(a) -> np.ndarray:
    return np.asarray(a).astype(np.float32)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32], ids=str)
@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("axis,tokens,d", [(-2, 48, 64), (-1, 37, 64), (-1, 5, 128)])
def test_quantize_dequantize_exact(rng, dtype, bits, axis, tokens, d):
    g = 16
    spec = QuantSpec(bits, g, axis)
    x = torch.from_numpy(rng.standard_normal((1, 3, tokens, d)).astype(np.float32) * 4).to(dtype).to(DEVICE)
    x[0, 1, :, 7] = 0.5  # constant column and group: scale 0 becomes 1
    codes, scale, lo = quantize(x, spec)
    ref = NB.quantize(_np(x), spec)
    np.testing.assert_array_equal(codes.cpu().numpy(), ref.codes)
    np.testing.assert_array_equal(_f32(scale.cpu()), _f32(ref.scale))
    np.testing.assert_array_equal(_f32(lo.cpu()), _f32(ref.lo))
    out = dequantize(codes, scale, lo, spec, dtype)
    np.testing.assert_array_equal(out.float().cpu().numpy(), _f32(NB.dequantize(ref, str(dtype)[6:])))


@pytest.mark.parametrize("settings", [{"values_tokens": 64, "values_warps": 8},
                                      {"values_tokens": 16, "values_warps": 2, "keys_channels": 32}], ids=str)
@pytest.mark.parametrize("axis,tokens", [(-2, 64), (-1, 37)])
def test_quantize_launch_settings_give_the_same_codes(rng, monkeypatch, settings, axis, tokens):
    """Every setting the benchmark may pick (``quantize.CONFIG``) writes the reference's bytes."""
    from lmcache.backends.torch.triton import quantize as qz

    for key, value in settings.items():
        monkeypatch.setitem(qz.CONFIG, key, value)
    spec = QuantSpec(4, 32, axis)
    x = torch.from_numpy(rng.standard_normal((2, 3, tokens, 128)).astype(np.float32)).half().to(DEVICE)
    codes, scale, lo = quantize(x, spec)
    ref = NB.quantize(_np(x), spec)
    np.testing.assert_array_equal(codes.cpu().numpy(), ref.codes)
    np.testing.assert_array_equal(_f32(scale.cpu()), _f32(ref.scale))
    np.testing.assert_array_equal(_f32(lo.cpu()), _f32(ref.lo))


def test_quantize_rejects_unsupported_shapes():
    assert not supported((2, 48, 96), QuantSpec(4, 16, -2))  # head_dim not a power of two
    assert not supported((2, 40, 64), QuantSpec(4, 16, -2))  # tokens not whole groups
    with pytest.raises(ValueError, match="does not take"):
        quantize(torch.zeros(1, 40, 96, device=DEVICE), QuantSpec(4, 16, -2))


def _cache(rng, b, hkv, n_quant, n_res, d, kbits, vbits, g, dtype, blocks=1, gv=None):
    """Random KV split as Cache holds it: ``blocks`` quantized blocks then a dense residual
    (key groups of ``g`` tokens, value groups of ``gv`` channels, by default ``min(g, d)``)."""
    k = torch.from_numpy(rng.standard_normal((b, hkv, n_quant + n_res, d)).astype(np.float32)).to(dtype).to(DEVICE)
    v = torch.from_numpy(rng.standard_normal((b, hkv, n_quant + n_res, d)).astype(np.float32)).to(dtype).to(DEVICE)
    ks, vs = QuantSpec(kbits, g, -2), QuantSpec(vbits, gv or min(g, d), -1)
    cuts = np.linspace(0, n_quant // g, blocks + 1).astype(int) * g
    segs = []
    for lo, hi in zip(cuts[:-1], cuts[1:]):
        segs.append((QuantBlock(*quantize(k[:, :, lo:hi], ks), ks), QuantBlock(*quantize(v[:, :, lo:hi], vs), vs)))
    if n_res:
        segs.append((k[:, :, n_quant:], v[:, :, n_quant:]))
    return segs


def _reference(q, segs):
    """numpy: dequantize every block (to the cache dtype, as the reference backend does), then attend."""
    name = str(q.dtype)[6:]
    ks, vs = [], []
    for kb, vb in segs:
        for side, out in ((kb, ks), (vb, vs)):
            if isinstance(side, QuantBlock):
                out.append(NB.dequantize(QuantBlock(*(_np(a) for a in (side.codes, side.scale, side.lo)),
                                                    side.spec), name))
            else:
                out.append(_np(side))
    k, v = np.concatenate(ks, 2), np.concatenate(vs, 2)
    return _f32(NB.attention(_f32(_np(q)), _f32(k), _f32(v), 1 / np.sqrt(q.shape[-1])))


# Kernel variants, forced whatever the number of query rows: the row kernel at two launch
# settings, the qrows kernel with and without prefetch, and the two matrix-unit kernels.
VARIANTS = {"rows": {"rows_max": 1 << 20, "imma": False,
                     "rows": {"num_warps": 1, "num_stages": 2, "block_n": 16, "qrows": False}},
            "rows-slots": {"rows_max": 1 << 20, "imma": False,
                           "rows": {"num_warps": 2, "num_stages": 2, "block_n": 32, "qrows": False}},
            "qrows": {"rows_max": 1 << 20, "imma": False,
                      "rows": {"num_warps": 2, "num_stages": 2, "block_n": 32, "qrows": True},
                      "qrows": {"num_warps": 1, "num_stages": 1, "block_n": 16, "prefetch": True, "mma": False}},
            "qrows-64": {"rows_max": 1 << 20, "imma": False,
                         "rows": {"num_warps": 2, "num_stages": 2, "block_n": 32, "qrows": True},
                         "qrows": {"num_warps": 2, "num_stages": 2, "block_n": 64, "prefetch": False, "mma": False}},
            "imma": {"rows_max": 1 << 20, "imma": True,
                     "rows": {"num_warps": 2, "num_stages": 2, "block_n": 32, "qrows": True}},
            "dot": {"rows_max": 0}}
if DEVICE != "cpu":  # the float16 matrix-unit row kernel (inline PTX) runs compiled only
    VARIANTS["mma"] = {"rows_max": 1 << 20, "imma": False,
                       "rows": {"num_warps": 2, "num_stages": 2, "block_n": 32, "qrows": True},
                       "qrows": {"num_warps": 1, "num_stages": 1, "block_n": 8, "prefetch": True, "mma": True}}


def _use(monkeypatch, name: str) -> None:
    for key, value in VARIANTS[name].items():
        monkeypatch.setitem(da.CONFIG, key, value)


@pytest.fixture(params=list(VARIANTS))
def variant(request, monkeypatch):
    _use(monkeypatch, request.param)
    return request.param


# (KV heads, query tokens, head_dim, key bits, value bits); query heads are 3x the KV heads.
_SHAPES = [(1, 1, 64), (3, 7, 64), (8, 1, 128), (1, 7, 128)]
_BITS = [(4, 4), (8, 2), (2, 8)]
_CASES = [(v, *s, *b) for v in VARIANTS for s in _SHAPES for b in _BITS]
if DEVICE == "cpu":  # the interpreter runs one program at a time: the row kernels on fewer cases
    _CASES = [c for c in _CASES if c[0] == "dot"] + [
        ("rows", 1, 1, 64, 4, 4), ("rows", 1, 1, 64, 8, 2), ("rows", 1, 1, 64, 2, 8),
        ("rows-slots", 1, 1, 64, 4, 4), ("rows-slots", 1, 1, 64, 2, 8),
        ("qrows", 1, 1, 64, 4, 4), ("qrows", 1, 1, 64, 8, 2), ("qrows", 1, 1, 128, 2, 8), ("qrows-64", 1, 1, 64, 4, 4),
        ("imma", 8, 1, 128, 4, 4), ("imma", 1, 7, 128, 4, 4), ("imma", 1, 7, 128, 8, 2)]


@pytest.mark.parametrize("name,hkv,L,d,kbits,vbits", _CASES)
def test_decode_attention_matches_numpy(rng, monkeypatch, name, hkv, L, d, kbits, vbits):
    _use(monkeypatch, name)
    segs = _cache(rng, 2, hkv, 128, 37, d, kbits, vbits, 64, torch.float16)
    q = torch.from_numpy(rng.standard_normal((2, 3 * hkv, L, d)).astype(np.float32)).half().to(DEVICE)
    out = da.decode_attention(q, segs, 1 / np.sqrt(d))
    assert out.shape == q.shape and out.dtype == q.dtype
    np.testing.assert_allclose(out.float().cpu().numpy(), _reference(q, segs), atol=5e-3, rtol=5e-3)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
def test_decode_attention_dtypes(rng, variant, dtype):
    segs = _cache(rng, 1, 2, 96, 5, 64, 4, 4, 32, dtype, blocks=2)
    q = torch.from_numpy(rng.standard_normal((1, 6, 3, 64)).astype(np.float32)).to(dtype).to(DEVICE)
    out = da.decode_attention(q, segs, 0.125)
    np.testing.assert_allclose(out.float().cpu().numpy(), _reference(q, segs) if dtype != torch.float32 else
                               _f32(NB.attention(*(_f32(_np(a)) for a in (q, *_dense(segs))), 0.125)),
                               atol=TOL[dtype], rtol=TOL[dtype])


def _dense(segs):
    ks, vs = [], []
    for kb, vb in segs:
        for side, out in ((kb, ks), (vb, vs)):
            out.append(ops.dequantize(side.codes, side.scale, side.lo, side.spec, torch.float32)
                       if isinstance(side, QuantBlock) else side.float())
    return torch.cat(ks, 2), torch.cat(vs, 2)


def test_decode_attention_causal_inside_quantized_block(rng, variant):
    """No residual: the 7 queries sit inside the last quantized block and must not see later tokens."""
    segs = _cache(rng, 1, 1, 128, 0, 64, 4, 4, 32, torch.float16, blocks=3)
    q = torch.from_numpy(rng.standard_normal((1, 3, 7, 64)).astype(np.float32)).half().to(DEVICE)
    out = da.decode_attention(q, segs, 0.125)
    np.testing.assert_allclose(out.float().cpu().numpy(), _reference(q, segs), atol=5e-3, rtol=5e-3)


def test_decode_attention_declines_unsupported_layouts(rng):
    segs = _cache(rng, 1, 1, 32, 3, 64, 4, 2, 32, torch.float16)  # 2-bit values over 32 channels: 8 bytes
    q = torch.zeros(1, 32, 1, 64, dtype=torch.float16, device=DEVICE)  # 32 query rows: the matrix-unit kernel
    assert da.decode_attention(q, segs, 0.125) is None


@pytest.mark.cuda
@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("side_tokens", [0, 1])
def test_decode_attention_in_a_cuda_graph(monkeypatch, bits, side_tokens):
    """Compiled only: a decode call captured in a CUDA graph (what torch.compile's
    "reduce-overhead" and serving engines do at batch 1) replays with new queries and gives
    the eager result: no host synchronisation, no host-side data in the call. With
    ``side_tokens`` 1 the float16 residual runs on a second stream (forked and joined in the graph)."""
    if not torch.cuda.is_available():
        pytest.skip("needs a GPU")
    monkeypatch.setitem(da.CONFIG, "dense_side_tokens", side_tokens)
    rng = np.random.default_rng(bits)
    segs = _cache(rng, 1, 4, 64 * 33, 77, 128, bits, bits, 64, torch.float16, gv=64)
    q = torch.randn(1, 4, 1, 128, dtype=torch.float16, device="cuda")
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # compile and warm up outside the capture
        da.decode_attention(q, segs, 128 ** -0.5)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = da.decode_attention(q, segs, 128 ** -0.5)
    for _ in range(2):
        q.copy_(torch.randn_like(q))
        graph.replay()
        torch.testing.assert_close(out, da.decode_attention(q, segs, 128 ** -0.5), rtol=0, atol=0)
    monkeypatch.setitem(da.CONFIG, "dense_side_tokens", 1 - side_tokens)  # the other stream layout: same bits
    torch.testing.assert_close(out, da.decode_attention(q, segs, 128 ** -0.5), rtol=0, atol=0)


@pytest.mark.cuda
def test_decode_attention_long_sequence_on_gpu(variant):
    """Compiled only: many splits over a long sequence, 16 query tokens, grouped heads."""
    if not torch.cuda.is_available():
        pytest.skip("needs a GPU")
    rng = np.random.default_rng(0)
    segs = _cache(rng, 2, 4, 8192, 150, 128, 4, 4, 64, torch.float16, blocks=3)
    q = torch.randn(2, 12, 16, 128, dtype=torch.float16, device="cuda")
    k, v = _dense(segs)
    ref = ops.attention(q.float(), k, v, 128 ** -0.5)
    out = da.decode_attention(q, segs, 128 ** -0.5)
    err = (out.float() - ref).norm() / ref.norm()
    assert err < 2e-3, err


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("hkv,L,n_res,blocks", [(3, 1, 37, 2), (1, 2, 5, 1), (2, 7, 0, 3)])
def test_mma_kernel_matches_numpy(rng, monkeypatch, dtype, hkv, L, n_res, blocks):
    """The matrix-unit row kernel at odd sizes: 3 or 1 query heads per KV head, 1/2/7 query
    tokens (7: inside the last block, no residual), residuals that are not a multiple of 16."""
    if DEVICE == "cpu":
        pytest.skip("inline PTX: needs a GPU")
    _use(monkeypatch, "mma")
    calls = []
    launch = decode_mma.launch
    monkeypatch.setattr(decode_mma, "launch", lambda *a: calls.append(1) or launch(*a))
    segs = _cache(rng, 2, hkv, 64 * 11, n_res, 128, 4, 4, 64, dtype, blocks=blocks)
    hq = 3 * hkv if L == 1 else hkv
    q = torch.from_numpy(rng.standard_normal((2, hq, L, 128)).astype(np.float32)).to(dtype).to(DEVICE)
    out = da.decode_attention(q, segs, 1 / np.sqrt(128))
    assert len(calls) == blocks
    np.testing.assert_allclose(out.float().cpu().numpy(), _reference(q, segs), atol=TOL[dtype], rtol=TOL[dtype])


def _imma_calls(monkeypatch) -> list:
    from lmcache.backends.torch.triton import decode_imma

    _use(monkeypatch, "imma")
    calls = []
    launch = decode_imma.launch
    monkeypatch.setattr(decode_imma, "launch", lambda *a: calls.append(a[3:5]) or launch(*a))
    return calls


_IMMA_CASES = [(kb, vb, dt, *shape) for kb, vb in [(4, 4), (8, 8), (4, 8), (8, 4)]
               for dt in (torch.float16, torch.bfloat16)
               for shape in [(3, 1, 37, 2, 64), (1, 2, 5, 1, 32), (2, 7, 0, 3, 128)]]
if DEVICE == "cpu":  # the interpreter: every pairing once, the other shapes and bfloat16 on 4/4 and 8/8
    _IMMA_CASES = [c for c in _IMMA_CASES if (c[2] == torch.float16 and c[3] == 3) or (c[0] == c[1] and c[3] != 3)
                   or (c[:2] == (4, 4) and c[2] == torch.bfloat16 and c[3] == 3)]


@pytest.mark.parametrize("kbits,vbits,dtype,hkv,L,n_res,blocks,g", _IMMA_CASES)
def test_imma_kernel_matches_numpy(rng, monkeypatch, kbits, vbits, dtype, hkv, L, n_res, blocks, g):
    """The integer matrix-unit kernel (emulated PTX under the interpreter) at odd sizes: 3 or 1
    query heads per KV head, 1/2/7 query tokens (7: inside the last block, no residual), residuals
    that are not a multiple of 32, key groups of 32/64/128, every pairing of 4- and 8-bit sides."""
    calls = _imma_calls(monkeypatch)
    segs = _cache(rng, 2, hkv, g * (3 if DEVICE == "cpu" else 11), n_res, 128, kbits, vbits, g, dtype, blocks=blocks,
                  gv=64)
    hq = 3 * hkv if L == 1 else hkv
    q = torch.from_numpy(rng.standard_normal((2, hq, L, 128)).astype(np.float32)).to(dtype).to(DEVICE)
    out = da.decode_attention(q, segs, 1 / np.sqrt(128))
    assert calls == [(kbits, vbits)] * blocks
    np.testing.assert_allclose(out.float().cpu().numpy(), _reference(q, segs), atol=TOL[dtype], rtol=TOL[dtype])


@pytest.mark.parametrize("settings", [{"dense_min_tiles": 1}, {"dense_min_tiles": 2, "dense_side_tokens": 0},
                                      {"imma_scales_query": False}, {"imma_splits_fast": {4: True, 8: True}},
                                      {"imma_splits_fast": {4: False, 8: False}},
                                      {"imma_tail": {4: (40, 3), 8: (40, 3)}, "programs_per_sm": 6}], ids=str)
def test_imma_settings_match_numpy(rng, monkeypatch, settings):
    """Settings the benchmark may pick: splits of the dense residual, the residual on the same
    stream; the query scaled by torch before the kernel (as the kernel of an A/B run takes it);
    the grid's order (a row's splits one after another, or the same split of every row); splits of
    two sizes (on CPU: one of 5 tiles, then of 2, the last one short)."""
    calls = _imma_calls(monkeypatch)
    for key, value in settings.items():
        monkeypatch.setitem(da.CONFIG, key, value)
    segs = _cache(rng, 2, 2, 64 * (5 if DEVICE == "cpu" else 37), 77, 128, 4, 8, 64, torch.float16, gv=64)
    q = torch.from_numpy(rng.standard_normal((2, 6, 1, 128)).astype(np.float32)).half().to(DEVICE)
    out = da.decode_attention(q, segs, 1 / np.sqrt(128))
    assert calls == [(4, 8)]
    np.testing.assert_allclose(out.float().cpu().numpy(), _reference(q, segs), atol=TOL[torch.float16],
                               rtol=TOL[torch.float16])


@pytest.mark.parametrize("n_tiles,n_splits,tail", [(1024, 13, (20, 4)), (1024, 11, (10, 2)), (1021, 27, (15, 3)),
                                                 (10, 2, (40, 3)), (37, 5, (90, 7)), (5, 5, (20, 4)), (8, 1, (20, 4))])
def test_tail_splits_cover_each_tile_once(n_tiles, n_splits, tail):
    """Splits of two sizes (``CONFIG["imma_tail"]``): long ones of the even splits' size, then short
    ones, together covering the row's tiles, none of them empty; none where no long split would
    remain or all would be long."""
    got = da._tail_splits(n_tiles, n_splits, tail)
    each = -(-n_tiles // n_splits)
    long = n_tiles * (100 - tail[0]) // (100 * each)
    if not 1 <= long < n_splits:
        assert got is None
        return
    splits, per, at, small = got
    assert (per, at) == (each, long) and small == max(1, -(-each // tail[1]))
    starts = [s * per if s < at else at * per + (s - at) * small for s in range(splits)]
    ends = [min(a + (per if s < at else small), n_tiles) for s, a in enumerate(starts)]
    assert starts[0] == 0 and ends[-1] == n_tiles and all(a < e for a, e in zip(starts, ends))
    assert all(e == a for e, a in zip(ends, starts[1:]))


def test_imma_blocks_of_two_widths_take_their_own_settings(rng, monkeypatch):
    """Quantized blocks of two widths in one call: each launch takes its own width's defaults,
    splits of two sizes included (here at 4 bits only), and the result is the reference's."""
    calls = _imma_calls(monkeypatch)
    monkeypatch.setitem(da.CONFIG, "imma_tail", {4: (40, 3), 8: 0})
    monkeypatch.setitem(da.CONFIG, "programs_per_sm", 6)
    # the interpreter's split arithmetic on a GPU too (4 SMs, no minimum of tiles per split): its
    # 132 SMs and 8 tiles per split would give these 10-tile rows one split, and no short ones
    splits = da._splits
    monkeypatch.setattr(da, "_num_sms", lambda device: 4)
    monkeypatch.setattr(da, "_splits", lambda n, p, device, min_tiles=1, pps=None: splits(n, p, device, 1, pps))
    tails = []
    tail_splits = da._tail_splits
    monkeypatch.setattr(da, "_tail_splits", lambda *a: tails.append(tail_splits(*a)) or tails[-1])
    narrow = _cache(rng, 1, 2, 64 * 5, 0, 128, 4, 4, 64, torch.float16, gv=64)
    wide = _cache(rng, 1, 2, 64 * 5, 0, 128, 8, 8, 64, torch.float16, gv=64)
    segs = [narrow[0], wide[0]]
    q = torch.from_numpy(rng.standard_normal((1, 6, 1, 128)).astype(np.float32)).half().to(DEVICE)
    out = da.decode_attention(q, segs, 1 / np.sqrt(128))
    assert calls == [(4, 4), (8, 8)] and len(tails) == 1 and tails[0] is not None
    np.testing.assert_allclose(out.float().cpu().numpy(), _reference(q, segs), atol=TOL[torch.float16],
                               rtol=TOL[torch.float16])


def test_imma_settings_untimed_off_gpu(rng, monkeypatch):
    """Off a GPU decode_imma's settings are CONFIG's defaults, with nothing timed; none where no
    segment takes decode_imma or segments of two widths do; a forced setting (what autotune
    imposes while it times) overrides the defaults."""
    from lmcache.backends.torch.triton import autotune

    monkeypatch.setattr(autotune, "_CHOSEN", {})
    alt = {"imma_step": 2, "imma_l2_ahead": 1, "imma_stages": 0, "programs_per_sm": 64}
    monkeypatch.setitem(da.CONFIG, "imma_tune", {4: [alt]})
    monkeypatch.setitem(da.CONFIG, "imma_tune_tokens", 1)
    segs = _cache(rng, 1, 2, 64 * 3, 5, 128, 4, 4, 64, torch.float16, gv=64)
    q = torch.zeros(1, 2, 1, 128, dtype=torch.float16)
    assert da._imma_settings(q, segs, 0.1, [True, False], 192, 1) == da._imma_defaults(4)
    assert da._imma_settings(q, segs, 0.1, [False, False], 192, 1) is None
    wider = _cache(rng, 1, 2, 64 * 3, 5, 128, 8, 8, 64, torch.float16, gv=64)
    mixed = [segs[0], wider[0]]  # blocks of two widths: each launch takes its own defaults
    assert da._imma_settings(q, mixed, 0.1, [True, True], 384, 1) is None
    monkeypatch.setattr(da, "_FORCED", alt)
    assert da._imma_settings(q, segs, 0.1, [True, False], 192, 1) == {**da._imma_defaults(4), **alt}
    assert autotune._CHOSEN == {}


@pytest.mark.cuda
def test_imma_autotune_times_once_and_matches(rng, monkeypatch):
    """Compiled only: the first call of a class of problem with enough quantized tokens times
    (unless ``LMCACHE_AUTOTUNE=0``) the default decode_imma settings against
    ``CONFIG["imma_tune"]``'s alternative, keeps the
    faster for the calls after it (nothing timed again), and a CUDA graph captured for a class
    not timed yet takes the defaults without timing (no synchronisation in a capture). Every
    candidate gives the reference result."""
    if not torch.cuda.is_available():
        pytest.skip("needs a GPU")
    from lmcache.backends.torch.triton import autotune

    monkeypatch.setattr(autotune, "_CHOSEN", {})
    alt = {"imma_step": 2, "imma_l2_ahead": 1, "imma_stages": 0, "programs_per_sm": 64}
    monkeypatch.setitem(da.CONFIG, "imma_tune", {4: [alt]})
    monkeypatch.setitem(da.CONFIG, "imma_tune_tokens", 1)
    stages = _imma_stages(monkeypatch)
    segs = _cache(rng, 2, 2, 64 * 37, 77, 128, 4, 4, 64, torch.float16, gv=64)
    q = torch.from_numpy(rng.standard_normal((2, 2, 1, 128)).astype(np.float32)).half().cuda()
    monkeypatch.setenv("LMCACHE_AUTOTUNE", "0")  # switched off: the defaults, nothing timed
    da.decode_attention(q, segs, 1 / np.sqrt(128))
    assert stages == [3] and autotune.choices() == {}
    monkeypatch.delenv("LMCACHE_AUTOTUNE")
    stages.clear()
    out = da.decode_attention(q, segs, 1 / np.sqrt(128))
    assert set(stages) == {3, 0}  # both timed
    [choice] = autotune._CHOSEN.values()
    assert choice in ({}, alt)
    ref = _reference(q, segs)
    np.testing.assert_allclose(out.float().cpu().numpy(), ref, atol=TOL[torch.float16], rtol=TOL[torch.float16])
    stages.clear()
    again = da.decode_attention(q, segs, 1 / np.sqrt(128))
    assert stages == [0 if choice else 3]
    torch.testing.assert_close(again, out, rtol=0, atol=0)
    for forced in ({}, alt):
        monkeypatch.setattr(da, "_FORCED", forced)
        got = da.decode_attention(q, segs, 1 / np.sqrt(128)).float().cpu().numpy()
        np.testing.assert_allclose(got, ref, atol=TOL[torch.float16], rtol=TOL[torch.float16])
    monkeypatch.setattr(da, "_FORCED", None)
    # a class not timed yet, captured in a graph: the defaults, nothing timed
    q1 = q[:1].clone()
    segs1 = _cache(rng, 1, 2, 64 * 37, 77, 128, 4, 4, 64, torch.float16, gv=64)
    monkeypatch.setitem(da.CONFIG, "dense_side_tokens", 0)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # compile outside the capture, as the defaults
        monkeypatch.setattr(da, "_FORCED", {})
        eager = da.decode_attention(q1, segs1, 1 / np.sqrt(128))
        monkeypatch.setattr(da, "_FORCED", None)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    stages.clear()
    with torch.cuda.graph(graph):
        captured = da.decode_attention(q1, segs1, 1 / np.sqrt(128))
    graph.replay()
    assert stages == [3] and len(autotune._CHOSEN) == 1
    torch.testing.assert_close(captured, eager, rtol=0, atol=0)


def _imma_stages(monkeypatch) -> list:
    """The ``STAGES`` each launch of decode_imma's kernel compiles with, as a list filled by the calls."""
    from lmcache.backends.torch.triton import decode_imma

    seen = []
    kernel = decode_imma._decode_kernel

    class Recorder:
        def __getitem__(self, grid):
            def run(*args, **kwargs):
                seen.append(kwargs["STAGES"])
                return kernel[grid](*args, **kwargs)
            return run

    monkeypatch.setattr(decode_imma, "_decode_kernel", Recorder())
    return seen


_STEP_CASES = [(4, 4, 64, 1), (8, 8, 32, 5), (4, 8, 128, 5), (8, 4, 64, 1)]


@pytest.mark.parametrize("step,l2", [(1, 0), (1, 2), (2, 0), (2, 2)])
@pytest.mark.parametrize("kbits,vbits,g,pps", _STEP_CASES)
def test_imma_steps_and_l2_prefetch(rng, monkeypatch, step, l2, kbits, vbits, g, pps):
    """One or two tiles per loop step (``CONFIG["imma_step"]``; key groups of 32 fall back to
    one): one split per sequence
    (``pps`` 1: group boundaries inside the loop) or several (5: splits that start inside a key
    group, and splits whose tile count is rounded up to a multiple of the step, so that some are empty);
    without and with the L2 bulk prefetch two steps ahead (``CONFIG["imma_l2_ahead"]``, past the
    split's and the sequence's end too)."""
    _check_imma_steps(rng, monkeypatch, step, l2, 0, kbits, vbits, g, pps)


@pytest.mark.parametrize("step,stages", [(1, 3), (2, 2), (2, 4)])
@pytest.mark.parametrize("kbits,vbits,g,pps", _STEP_CASES)
def test_imma_shared_memory_stages(rng, monkeypatch, step, stages, kbits, vbits, g, pps):
    """The tiles read from a ring of shared-memory stages that the TMA unit fills ahead
    (``CONFIG["imma_stages"]``; fewer stages where that many pass 48 KB: two at 8-bit with two tiles
    per step; on sm_90 only) and the L2 prefetch beyond them: the cases of
    ``test_imma_steps_and_l2_prefetch``, stages refilled many times, tiles past the end not copied."""
    _check_imma_steps(rng, monkeypatch, step, 2, stages, kbits, vbits, g, pps)


def _check_imma_steps(rng, monkeypatch, step, l2, stages, kbits, vbits, g, pps):
    from lmcache.backends.torch.triton import decode_imma

    calls = _imma_calls(monkeypatch)
    compiled = _imma_stages(monkeypatch)
    monkeypatch.setitem(da.CONFIG, "imma_l2_ahead", {4: l2, 8: l2})
    monkeypatch.setitem(da.CONFIG, "imma_step", {4: step, 8: step})
    monkeypatch.setitem(da.CONFIG, "imma_stages", {4: stages, 8: stages})
    monkeypatch.setitem(da.CONFIG, "programs_per_sm", pps)
    blocks = 2 if pps == 1 else 1
    segs = _cache(rng, 2, 2, g * (3 if DEVICE == "cpu" else 13), 37, 128, kbits, vbits, g, torch.float16,
                  blocks=blocks, gv=64)
    q = torch.from_numpy(rng.standard_normal((2, 6, 1, 128)).astype(np.float32)).half().to(DEVICE)
    out = da.decode_attention(q, segs, 1 / np.sqrt(128))
    assert calls == [(kbits, vbits)] * blocks
    per_step = (2 if g >= 64 else 1) * decode_imma._tile_stage_bytes(kbits, vbits) + 8
    ready = DEVICE == "cpu" or torch.cuda.get_device_capability()[0] >= 9
    assert compiled == [min(stages, 48 * 1024 // per_step) if ready else 0] * blocks
    np.testing.assert_allclose(out.float().cpu().numpy(), _reference(q, segs), atol=TOL[torch.float16],
                               rtol=TOL[torch.float16])


def _in_bigger_buffer(x: torch.Tensor, layout: str) -> torch.Tensor:
    """``x`` [B, H, T, n], same values, as a view of a larger buffer: ``capacity`` (more tokens
    allocated than held), ``token_major`` ([B, T, H, n] seen as [B, H, T, n]), ``every_other_head``."""
    b, h, t, n = x.shape
    if layout == "capacity":
        buf = torch.zeros((b, h, t + 64, n), dtype=x.dtype, device=x.device)
        buf[:, :, :t] = x
        return buf[:, :, :t]
    if layout == "token_major":
        return x.permute(0, 2, 1, 3).contiguous().permute(0, 2, 1, 3)
    buf = torch.zeros((b, 2 * h, t, n), dtype=x.dtype, device=x.device)
    buf[:, ::2] = x
    return buf[:, ::2]


@pytest.mark.parametrize("layout", ["capacity", "token_major", "every_other_head"])
@pytest.mark.parametrize("which,kbits,vbits", [("codes", 4, 4), ("scales", 4, 4), ("both", 8, 8), ("both", 8, 4)])
def test_imma_strided_layouts(rng, monkeypatch, layout, which, kbits, vbits):
    """Codes and/or scales and offsets as views of larger buffers (a cache with spare capacity,
    token-major storage, every other head): strides the kernel must follow, the value scales'
    per-token loads when their tokens are not adjacent, the L2 prefetch off where code rows are not
    contiguous along the tokens."""
    calls = _imma_calls(monkeypatch)
    segs = _cache(rng, 2, 2, 64 * (2 if DEVICE == "cpu" else 13), 5, 128, kbits, vbits, 64, torch.float16, gv=64)

    def relaid(x: QuantBlock) -> QuantBlock:
        c = _in_bigger_buffer(x.codes, layout) if which in ("codes", "both") else x.codes
        s, lo = ((_in_bigger_buffer(x.scale, layout), _in_bigger_buffer(x.lo, layout)) if which in ("scales", "both")
                 else (x.scale, x.lo))
        return QuantBlock(c, s, lo, x.spec)

    segs = [(relaid(segs[0][0]), relaid(segs[0][1])), segs[1]]
    q = torch.from_numpy(rng.standard_normal((2, 6, 1, 128)).astype(np.float32)).half().to(DEVICE)
    out = da.decode_attention(q, segs, 1 / np.sqrt(128))
    assert calls == [(kbits, vbits)]
    np.testing.assert_allclose(out.float().cpu().numpy(), _reference(q, segs), atol=TOL[torch.float16],
                               rtol=TOL[torch.float16])


@pytest.mark.parametrize("flush_tiles", [1024, 2])
@pytest.mark.parametrize("step", [1, 2])
def test_imma_kernel_moving_reference(rng, monkeypatch, flush_tiles, step):
    """Scores that climb along the sequence (the softmax reference moves and the integer value
    sums fold many times), a few tokens far above the rest, value scales that differ by 1000x
    between tokens; and, with 2, the fold forced every second tile (the overflow guard's path:
    with two tiles per step, at every step). One tile per step (key groups of 32) or two (64)."""
    import triton.language as tl

    from lmcache.backends.torch.triton import decode_imma

    calls = _imma_calls(monkeypatch)
    if flush_tiles != 1024:
        if DEVICE != "cpu":
            pytest.skip("the fold interval is a compile-time constant: patched under the interpreter only")
        monkeypatch.setattr(decode_imma, "_FLUSH_TILES", tl.constexpr(flush_tiles))
    monkeypatch.setitem(da.CONFIG, "imma_step", {4: step, 8: step})
    n = 352 if step == 1 else 384
    q = torch.from_numpy(rng.standard_normal((1, 2, 1, 128)).astype(np.float32))
    k = torch.from_numpy(rng.standard_normal((1, 2, n + 3, 128)).astype(np.float32))
    k += torch.linspace(0, 6, n + 3)[None, None, :, None] * q[:, :, :, :] / q.norm(dim=-1, keepdim=True)
    k[:, :, 200] += 4 * q[:, :, 0]
    v = torch.from_numpy(rng.standard_normal((1, 2, n + 3, 128)).astype(np.float32))
    v[:, :, ::7] *= 1000.0
    ks, vs = QuantSpec(4, 32 if step == 1 else 64, -2), QuantSpec(8, 64, -1)
    kh, vh = k.half().to(DEVICE), v.half().to(DEVICE)
    segs = [(QuantBlock(*quantize(kh[:, :, :n], ks), ks), QuantBlock(*quantize(vh[:, :, :n], vs), vs)),
            (kh[:, :, n:], vh[:, :, n:])]
    qh = q.half().to(DEVICE)
    out = da.decode_attention(qh, segs, 1 / np.sqrt(128))
    assert calls == [(4, 8)]
    ref = _reference(qh, segs)
    np.testing.assert_allclose(out.float().cpu().numpy(), ref, atol=5e-3 * np.abs(ref).max(), rtol=5e-3)


@pytest.mark.parametrize("n_splits,d", [(5, 64), (64, 64), (65, 16), (300, 64), (5000, 64), (30, 128)])
def test_split_combine_matches_torch(n_splits, d):
    """The merge of split partials: one program per row up to 64 splits, above it chunks of 32
    merged first (one level at 65 and 300, two at 5000); programs over 32 dimensions each, or all
    of them for a head dim below 32."""
    g = torch.Generator().manual_seed(n_splits)
    part = da._Partials(n_splits, 3, 2, d, DEVICE)
    part.o.copy_(torch.randn(part.o.shape, generator=g))
    part.m.copy_(torch.randn(part.m.shape, generator=g) * 4)
    part.m[0, 0, 0] = -1.0e30  # a split that saw no token
    part.l.copy_(torch.rand(part.l.shape, generator=g) + 0.5)
    w = torch.exp2(part.m - part.m.amax(0))
    ref = (part.o * w[..., None]).sum(0) / (part.l * w).sum(0)[..., None]
    out = part.combine(torch.float16)
    assert out.dtype == torch.float16 and out.shape == (3, 2, d)
    np.testing.assert_allclose(out.float().cpu().numpy(), ref.cpu().numpy(), atol=2e-3, rtol=2e-3)
