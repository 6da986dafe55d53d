"""The Metal kernels of the MLX backend.

Three layers of checking, so that what cannot run here is still exercised here:

* unmarked: the launch parameters (plain functions) and the cached builders, everywhere;
* unmarked: the Metal kernel *sources* compiled by the host C++ compiler against a small
  shim of the Metal standard library (``device``/``constant`` dropped, ``half`` as
  ``_Float16``, a bfloat16 struct, ``simd_sum`` across 32 OS threads in lock step) and run
  over the same grid and threadgroups the launchers compute, against the numpy reference.
  This checks the kernels' indexing, packing, rounding and online softmax; it cannot check
  Metal's compiler or its math library;
* ``@pytest.mark.metal``: the kernels through ``mx.fast.metal_kernel`` on an Apple GPU
  (``nox -s tests-metal``), against the same reference.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import shutil
import subprocess
import tempfile

import numpy as np
import pytest
from conftest import REQUIRE_ALL, TEST_DEVICE, require

mx = require("mlx.core")

from lmcache.backends import get_backend  # noqa: E402
from lmcache.backends.mlx import metal, ops  # noqa: E402
from lmcache.backends.mlx.metal import decode_attention as mda  # noqa: E402
from lmcache.backends.mlx.metal import dequantize as md  # noqa: E402
from lmcache.backends.mlx.metal import quantize as mq  # noqa: E402
from lmcache.backends.mlx.metal import threadgroup_for  # noqa: E402
from lmcache.quant import QuantSpec  # noqa: E402


# ---------------------------------------------------------------------- launch parameters
@pytest.mark.parametrize("grid", [(1, 1, 1), (7, 3, 2), (300, 5, 1), (32, 40, 9), (2, 1000, 3)])
def test_threadgroup_fits_grid_and_limit(grid):
    tg = threadgroup_for(grid)
    assert all(1 <= t <= g for t, g in zip(tg, grid))
    assert tg[0] * tg[1] * tg[2] <= metal.MAX_THREADS
    if grid[0] >= metal.MAX_THREADS:
        assert tg == (metal.MAX_THREADS, 1, 1)  # x is filled first


def test_threadgroup_rejects_bad_grids():
    with pytest.raises(ValueError, match="grid must be three positive sizes"):
        threadgroup_for((0, 1, 1))
    with pytest.raises(ValueError, match="grid must be three positive sizes"):
        threadgroup_for((4, 4))


def test_quantize_launch_covers_every_work_item():
    # values (axis -1): one thread per token row
    grid, tg = mq.launch_params((2, 3, 15, 12), QuantSpec(4, 3, -1))
    assert grid == (2 * 3 * 15, 1, 1) and tg == (90, 1, 1)
    # keys (axis -2): one thread per (byte column, token group, row)
    grid, tg = mq.launch_params((2, 3, 15, 12), QuantSpec(2, 5, -2))
    assert grid == (12 // 4, 15 // 5, 6) and tg == (3, 3, 6)
    grid, _ = mq.launch_params((4, 64, 128), QuantSpec(8, 64, -2))
    assert grid == (128, 1, 4)


def test_dequantize_launch_is_one_thread_per_element():
    grid, tg = md.launch_params((2, 3, 15, 12))
    assert grid == (12, 15, 6) and tg == (12, 15, 1)
    grid, tg = md.launch_params((1, 8, 4096, 128))
    assert grid == (128, 4096, 8) and tg == (128, 2, 1)


def test_decode_launch_splits_tokens_into_chunks():
    grid, tg, n = mda.launch_params(batch=2, q_heads=6, n_tokens=300, chunk=128)
    assert n == 3 and grid == (32, 6, 2 * 3) and tg == (32, 1, 1)
    assert mda.launch_params(1, 1, 1)[2] == 1 and mda.launch_params(1, 1, mda.CHUNK + 1)[2] == 2
    with pytest.raises(ValueError, match="must be positive"):
        mda.launch_params(1, 4, 0)


def test_builders_are_cached():
    assert mq.kernel(-1) is mq.kernel(-1) and mq.kernel(-2) is mq.kernel(-2) and mq.kernel(-1) is not mq.kernel(-2)
    assert md.kernel() is md.kernel() and mda.kernel() is mda.kernel()
    with pytest.raises(ValueError, match="axis must be -1 or -2"):
        mq.kernel(0)


# ---------------------------------------------------------------------- host emulation
# A shim of what the kernels use from the Metal standard library, for a C++20 compiler.
_SHIM = r"""
#include <barrier>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <algorithm>
#include <thread>
#include <vector>
#define device
#define constant
typedef unsigned int uint;
typedef _Float16 float16_t;
typedef _Float16 half;
struct uint3 { uint x, y, z; };
struct bfloat16_t {  // round-to-nearest-even from float, as Metal's bfloat
  uint16_t bits;
  bfloat16_t() = default;
  bfloat16_t(float f) { uint32_t u; std::memcpy(&u, &f, 4); u += 0x7FFF + ((u >> 16) & 1); bits = u >> 16; }
  operator float() const { uint32_t u = uint32_t(bits) << 16; float f; std::memcpy(&f, &u, 4); return f; }
};
struct Simd { std::barrier<> *bar; float buf[32]; };
static thread_local int tl_lane = 0;
static thread_local Simd *tl_simd = nullptr;
#include <limits>
namespace metal {
  using std::numeric_limits;
  template <class T> T min(T a, T b) { return a < b ? a : b; }
  template <class T> T max(T a, T b) { return a > b ? a : b; }
  inline float clamp(float x, float lo, float hi) { return std::min(std::max(x, lo), hi); }
  inline float rint(float x) { return std::nearbyint(x); }  // default mode: half to even
  inline float exp(float x) { return std::exp(x); }
  namespace precise { inline float divide(float a, float b) { return a / b; } }
  inline float simd_sum(float v) {  // all 32 lanes meet, each sums in the same order
    tl_simd->buf[tl_lane] = v;
    tl_simd->bar->arrive_and_wait();
    float s = 0.0f;
    for (int i = 0; i < 32; ++i) s += tl_simd->buf[i];
    tl_simd->bar->arrive_and_wait();
    return s;
  }
}
"""

_CTYPE = {"float32": "float", "float16": "float16_t", "bfloat16": "bfloat16_t", "uint8": "uint8_t",
          "int32": "int32_t"}
_ATTRS = ("thread_position_in_grid", "thread_position_in_threadgroup")


def _cxx():
    cxx = shutil.which("g++") or shutil.which("c++") or shutil.which("clang++")
    if cxx is None:
        if REQUIRE_ALL:
            pytest.fail("no C++ compiler to run the Metal sources on the host (LMCACHE_REQUIRE_ALL=1)")
        pytest.skip("no C++ compiler to run the Metal sources on the host")
    return cxx


def _signature(source, name, inputs, outputs, template, simd):
    """The hashable description of one kernel instantiation, as MLX would generate it.

    ``inputs``: ``(name, numpy array | int | float)`` (a Python scalar becomes a 0-d input,
    int32 or float32, as MLX passes it); ``outputs``: ``(name, shape, dtype name)``;
    ``template``: ``(name, int | dtype name)``.
    """
    ins = []
    for n, a in inputs:
        if isinstance(a, (int, float)):
            ins.append((n, "int32_t" if isinstance(a, int) else "float", True))
        else:
            ins.append((n, _CTYPE[str(np.asarray(a).dtype)], False))
    outs = tuple((n, _CTYPE[dt], False) for n, _, dt in outputs)
    tmpl = tuple((k, _CTYPE[v] if isinstance(v, str) else v) for k, v in template)
    return source, name, tuple(ins), outs, tmpl, simd


def _instantiation(sig, fn_name: str) -> str:
    """C++ for one instantiation: the kernel body wrapped as MLX wraps it, and a grid loop."""
    source, name, in_types, out_types, template, simd = sig
    params = [f"const {t}{'&' if scalar else '*'} {n}" for n, t, scalar in in_types]
    params += [f"{t}* {n}" for n, t, _ in out_types]
    params += [f"uint3 {a}" for a in _ATTRS]
    tparams = ", ".join(("int " if isinstance(v, int) else "typename ") + k for k, v in template)
    targs = ", ".join(str(v) for _, v in template)
    casts = [f"*(const {t}*)args[{i}]" if scalar else f"(const {t}*)args[{i}]" for i, (_, t, scalar) in
             enumerate(in_types)]
    casts += [f"({t}*)args[{len(in_types) + i}]" for i, (_, t, _) in enumerate(out_types)]
    call = f"k_{fn_name}<{targs}>({', '.join(casts)}, uint3{{gx_, gy_, gz_}}, uint3{{lx, ly, lz}})"
    if simd:  # one OS thread per lane of the (single) SIMD group of each threadgroup
        loops = f"""
    for (uint bz = 0; bz < uint(gz); ++bz) for (uint by = 0; by < uint(gy); ++by)
      for (uint bx = 0; bx < uint(gx) / uint(tx); ++bx) {{
        std::barrier<> bar(tx);
        Simd simd{{&bar, {{}}}};
        std::vector<std::thread> lanes;
        for (uint lx = 0; lx < uint(tx); ++lx)
          lanes.emplace_back([&, lx] {{
            tl_lane = lx; tl_simd = &simd;
            uint ly = 0, lz = 0, gx_ = bx * tx + lx, gy_ = by, gz_ = bz;
            {call};
          }});
        for (std::thread& th : lanes) th.join();
      }}"""
    else:
        loops = f"""
    for (uint gz_ = 0; gz_ < uint(gz); ++gz_) for (uint gy_ = 0; gy_ < uint(gy); ++gy_)
      for (uint gx_ = 0; gx_ < uint(gx); ++gx_) {{
        uint lx = gx_ % tx, ly = gy_ % ty, lz = gz_ % tz;
        {call};
      }}"""
    return (f"template <{tparams}>\nvoid k_{fn_name}({', '.join(params)}) {{\n{source}\n}}\n"
            f'extern "C" void {fn_name}(void** args, int gx, int gy, int gz, int tx, int ty, int tz) {{{loops}\n}}\n')


@functools.cache
def _library(sigs: tuple):
    """Compile every instantiation in ``sigs`` into one host library (cached on disk by content)."""
    code = _SHIM + "".join(_instantiation(sig, f"launch_{i}") for i, sig in enumerate(sigs))
    digest = hashlib.sha1(code.encode()).hexdigest()[:16]
    d = os.path.join(tempfile.gettempdir(), "lmcache-metal-emu")
    os.makedirs(d, exist_ok=True)
    src, lib = os.path.join(d, f"{sigs[0][1]}-{digest}.cpp"), os.path.join(d, f"{sigs[0][1]}-{digest}.so")
    if not os.path.exists(lib):
        with open(src, "w") as f:
            f.write(code)
        tmp = lib + f".{os.getpid()}"
        # -ffp-contract=off: products and sums rounded separately, as the sources intend.
        r = subprocess.run([_cxx(), "-std=c++20", "-O0", "-shared", "-fPIC", "-pthread", "-ffp-contract=off",
                            "-o", tmp, src], capture_output=True, text=True)
        if r.returncode:
            raise AssertionError(f"the {sigs[0][1]} Metal source does not compile on the host:\n{r.stderr[:4000]}")
        os.replace(tmp, lib)
    return ctypes.CDLL(lib), {sig: i for i, sig in enumerate(sigs)}


def _emulate(lib, call):
    """Run one kernel call (see ``_signature``) on the host, as ``mx.fast.metal_kernel`` would run it."""
    cdll, index = lib
    source, name, inputs, outputs, template, grid, tg, simd = call
    fn = getattr(cdll, f"launch_{index[_signature(source, name, inputs, outputs, template, simd)]}")
    fn.argtypes = [ctypes.POINTER(ctypes.c_void_p)] + [ctypes.c_int] * 6
    keep = []
    for _, a in inputs:
        if isinstance(a, (int, float)):
            a = np.array(a, np.int32 if isinstance(a, int) else np.float32)
        keep.append(np.ascontiguousarray(a))
    outs = [np.zeros(shape, _np_dtype(dt)) for _, shape, dt in outputs]
    args = (ctypes.c_void_p * (len(keep) + len(outs)))(*[a.ctypes.data for a in keep + outs])
    fn(args, *grid, *tg)
    return outs


def _build(calls):
    """One library for every call in ``calls`` (the test cases of one kernel)."""
    _cxx()
    sigs = tuple(dict.fromkeys(_signature(c[0], c[1], c[2], c[3], c[4], c[7]) for c in calls))
    return _library(sigs)


def _np_dtype(name):
    if name == "bfloat16":
        return np.dtype(require("ml_dtypes").bfloat16)
    return np.dtype(name)


def _x(rng, shape, dtype):
    x = (rng.standard_normal(shape) * 2 + rng.standard_normal(shape[-1:])).astype(np.float32)
    return x.astype(_np_dtype(dtype))


def _quantize_call(x, spec, dtype):
    *lead, n, d = x.shape
    rows = int(np.prod(lead))
    sdt = "float32" if dtype == "float32" else "float16"
    grid, tg = mq.launch_params(x.shape, spec)
    template = (("T", dtype), ("S", sdt), ("D", d), ("G", spec.group_size), ("BITS", spec.bits))
    g = spec.group_size
    if spec.axis == -1:
        src, name, ins, sshape = mq.SOURCE_CHANNELS, "q_channels", [("x", x), ("n_rows", rows * n)], (*lead, n, d // g)
    else:
        src, name, ins, sshape = mq.SOURCE_TOKENS, "q_tokens", [("x", x), ("n_rows", rows), ("n_groups", n // g)], \
            (*lead, n // g, d)
    outs = [("codes", (*lead, n, d // spec.per_byte), "uint8"), ("scale", sshape, sdt), ("lo", sshape, sdt)]
    return src, name, ins, outs, template, grid, tg, False


def _dequantize_call(ref, shape, dtype):
    spec = ref.spec
    grid, tg = md.launch_params(shape)
    template = (("O", dtype), ("D", shape[-1]), ("G", spec.group_size), ("BITS", spec.bits),
                ("AXIS", 1 if spec.axis == -1 else 2))
    ins = [("codes", ref.codes), ("scale", ref.scale), ("lo", ref.lo), ("n_rows", int(np.prod(shape[:-2]))),
           ("n_tokens", shape[-2])]
    return md.SOURCE, "dequantize", ins, [("out", shape, dtype)], template, grid, tg, False


SPECS = [QuantSpec(b, g, a) for b in (2, 4, 8) for g, a in ((5, -2), (3, -1), (4, -1), (15, -2))]


DTYPES = ["float32", "float16", "bfloat16"]
SHAPE = (2, 3, 15, 12)  # odd: 15 tokens, groups of 3 and 5 that do not line up with the bytes


@pytest.fixture(scope="module")
def quant_lib():
    """Every quantize and dequantize instantiation of the tests, compiled once."""
    nb = get_backend("numpy")
    calls = []
    for dtype in DTYPES:
        x = np.zeros(SHAPE, _np_dtype(dtype))
        for spec in SPECS:
            calls.append(_quantize_call(x, spec, dtype))
            calls.append(_dequantize_call(nb.quantize(x, spec), SHAPE, dtype))
    return _build(calls)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("spec", SPECS, ids=lambda s: f"b{s.bits}g{s.group_size}ax{s.axis}")
def test_emulated_quantize_and_dequantize_kernels_match_numpy(rng, quant_lib, dtype, spec):
    nb = get_backend("numpy")
    x = _x(rng, SHAPE, dtype)
    ref = nb.quantize(x, spec)
    codes, scale, lo = _emulate(quant_lib, _quantize_call(x, spec, dtype))
    np.testing.assert_array_equal(codes, ref.codes)
    np.testing.assert_array_equal(scale, ref.scale)
    np.testing.assert_array_equal(lo, ref.lo)
    (out,) = _emulate(quant_lib, _dequantize_call(ref, SHAPE, dtype))
    np.testing.assert_array_equal(out.astype(np.float32), nb.to_numpy(nb.dequantize(ref, dtype)))


DECODE_CASES = [(4, 2, 12), (8, 4, 40), (2, 8, 8)]  # odd head_dim 12, 40: lanes without a channel
B, HQ, HKV, T, KG, VG, CHUNK = 2, 6, 2, 20, 4, 4, 8  # GQA 6/2; chunks of 8, 8 and 4 tokens


def _decode_inputs(rng, dtype, kbits, vbits, d):
    nb = get_backend("numpy")
    k, v = _x(rng, (B, HKV, T, d), dtype), _x(rng, (B, HKV, T, d), dtype)
    q = rng.standard_normal((B, HQ, d)).astype(np.float32)
    return q, nb.quantize(k, QuantSpec(kbits, KG, -2)), nb.quantize(v, QuantSpec(vbits, VG, -1))


def _decode_call(q, kq, vq, dtype):
    d = q.shape[-1]
    grid, tg, n_chunks = mda.launch_params(B, HQ, T, CHUNK)
    template = (("T", dtype), ("D", d), ("KBITS", kq.spec.bits), ("KG", KG), ("VBITS", vq.spec.bits), ("VG", VG))
    ins = [("q", q), ("k_codes", kq.codes), ("k_scale", kq.scale), ("k_lo", kq.lo), ("v_codes", vq.codes),
           ("v_scale", vq.scale), ("v_lo", vq.lo), ("n_q_heads", HQ), ("n_kv_heads", HKV), ("n_tokens", T),
           ("chunk", CHUNK), ("n_chunks", n_chunks), ("sm_scale", 0.3)]
    outs = [("o", (B, HQ, n_chunks, d), "float32"), ("m", (B, HQ, n_chunks), "float32"),
            ("l", (B, HQ, n_chunks), "float32")]
    return mda.SOURCE, "decode", ins, outs, template, grid, tg, True


@pytest.fixture(scope="module")
def decode_lib():
    rng = np.random.default_rng(0)
    return _build([_decode_call(*_decode_inputs(rng, dt, *case), dt) for dt in ("float32", "float16")
                   for case in DECODE_CASES])


@pytest.mark.parametrize("dtype", ["float32", "float16"])
@pytest.mark.parametrize("kbits,vbits,d", DECODE_CASES)
def test_emulated_decode_attention_matches_reference(rng, decode_lib, dtype, kbits, vbits, d):
    nb = get_backend("numpy")
    q, kq, vq = _decode_inputs(rng, dtype, kbits, vbits, d)
    o, m, l_ = _emulate(decode_lib, _decode_call(q, kq, vq, dtype))
    w = np.exp(m - m.max(-1, keepdims=True))  # the chunk merge of decode_partial, in numpy
    got = (o * w[..., None]).sum(-2) / (l_ * w).sum(-1)[..., None]
    kd, vd = nb.dequantize(kq, dtype), nb.dequantize(vq, dtype)
    ref = nb.attention(q[:, :, None], kd.astype(np.float32), vd.astype(np.float32), 0.3)[:, :, 0]
    np.testing.assert_allclose(got, ref, atol=2e-5, rtol=2e-5)


# ---------------------------------------------------------------------- on an Apple GPU
def _need_metal():
    if not metal.available():
        if TEST_DEVICE == "metal":
            pytest.fail("LMCACHE_TEST_DEVICE=metal but MLX sees no Metal GPU", pytrace=False)
        pytest.skip("needs a Metal GPU (Apple silicon): run nox -s tests-metal on a Mac")


@pytest.mark.metal
@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
@pytest.mark.parametrize("spec", SPECS, ids=lambda s: f"b{s.bits}g{s.group_size}ax{s.axis}")
def test_metal_quantize_and_dequantize_match_numpy(rng, dtype, spec):
    _need_metal()
    nb, mb = get_backend("numpy"), get_backend("mlx")
    x = _x(rng, (2, 3, 15, 12), dtype)
    ref = nb.quantize(x, spec)
    with mx.stream(mx.gpu):
        codes, scale, lo = mq.quantize(mb.from_numpy(x), spec)
        back = md.dequantize(codes, scale, lo, spec, ops.mx_dtype(dtype))
    np.testing.assert_array_equal(np.array(codes), ref.codes)
    np.testing.assert_array_equal(mb.to_numpy(scale), ref.scale)
    np.testing.assert_array_equal(mb.to_numpy(lo), ref.lo)
    # bit-identical: HEADER turns off multiply-add contraction, as numpy rounds each step
    np.testing.assert_array_equal(mb.to_numpy(back), nb.to_numpy(nb.dequantize(ref, dtype)))


@pytest.mark.metal
@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
def test_metal_decode_attention_matches_ops(rng, dtype):
    _need_metal()
    nb, mb = get_backend("numpy"), get_backend("mlx")
    b, hq, hkv, t, d = 2, 6, 2, 300, 40
    k, v = _x(rng, (b, hkv, t, d), dtype), _x(rng, (b, hkv, t, d), dtype)
    ks, vs = QuantSpec(4, 4, -2), QuantSpec(2, 8, -1)
    kq, vq = nb.quantize(k, ks), nb.quantize(v, vs)
    to = lambda blk: tuple(mb.from_numpy(a) for a in (blk.codes, blk.scale, blk.lo))  # noqa: E731
    q = mx.array(rng.standard_normal((b, hq, d)).astype(np.float32))
    dt = ops.mx_dtype(dtype)
    with mx.stream(mx.gpu):
        got = ops.combine([mda.decode_partial(q, to(kq), ks, to(vq), vs, 0.3, dt)])
    want = ops.combine([ops.decode_partial_quantized(q, to(kq), ks, to(vq), vs, 0.3, dt)])
    np.testing.assert_allclose(np.array(got), np.array(want), atol=1e-4, rtol=1e-4)


@pytest.mark.metal
def test_metal_backend_uses_the_kernels():
    _need_metal()
    mb = get_backend("mlx")
    assert mb.kernel_path() == "metal" and mb.use_metal and mb.has_accelerator()
