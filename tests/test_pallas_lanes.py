"""The lane-explicit Pallas decode kernel (``pallas/decode_lanes.py``) against the jnp reference:
interpreted on the CPU (inline PTX through its numpy emulations), lowered to Triton IR for CUDA at
the benchmark's shape, compiled on a GPU; and the check that its asm operands keep their rows on
the lanes (``pallas/layout_check.py``), on sample TTGIR and on XLA's own."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest
from conftest import need_jax_gpu, pallas_interpret_device, require

jax = require("jax")
jnp = jax.numpy
pl_da = require("lmcache.backends.jax.pallas.decode_attention")
pl_lanes = require("lmcache.backends.jax.pallas.decode_lanes")
layout_check = require("lmcache.backends.jax.pallas.layout_check")
from test_pallas_int8 import _quantized  # noqa: E402

_ON_DEFAULT_DEVICE = {"test_lanes_kernel_lowers_to_triton_for_cuda"}


@pytest.fixture(autouse=True)
def _interpret_on_cpu(request):
    with pallas_interpret_device(request, _ON_DEFAULT_DEVICE):
        yield


# 4-bit K/V, head_dim 128; lengths that end inside a tile and inside a split; 2 query heads per
# KV head; key groups of 32, 64 and 128; float16 and bfloat16 scales (float32 ones: decode_int8's
# kernel); the default slices; the value side loaded in its own step (value_ahead=False).
@pytest.mark.parametrize("hkv,gk,length,splits,dtype,ahead", [
    (1, 64, 256, 1, "float16", True), (2, 64, 200, 2, "float16", True), (1, 32, 37, 1, "float16", True),
    (1, 64, 0, 2, "float16", True), (2, 128, 130, 2, "bfloat16", True), (1, 64, 100, None, "float16", True),
    (1, 64, 100, None, "float32", True), (2, 64, 200, 2, "float16", False)])
def test_lanes_kernel_matches_the_reference(rng, hkv, gk, length, splits, dtype, ahead):
    b, rep, t, d = 1, 2, 256, 128
    args = _quantized(rng, b, hkv, t, d, 4, 4, gk, 64, dtype=dtype)
    q = jnp.asarray(rng.standard_normal((b, hkv * rep, d)), jnp.float16)
    ref_out, ref_lse = pl_da.decode_attention_reference(q, *args, k_bits=4, v_bits=4, scale=0.3, length=length)
    out, lse = pl_lanes.decode_attention(q, *args, k_bits=4, v_bits=4, scale=0.3, length=length, splits=splits,
                                         value_ahead=ahead, interpret=True)
    np.testing.assert_allclose(np.asarray(out), np.asarray(ref_out), rtol=2e-4, atol=5e-5)
    np.testing.assert_allclose(np.asarray(lse), np.asarray(ref_lse), rtol=1e-5, atol=1e-5)


def test_lanes_kernel_rejects_what_it_does_not_take(rng):
    q = jnp.zeros((1, 1, 128), jnp.float16)
    with pytest.raises(ValueError, match="4-bit K and V"):
        pl_lanes.decode_attention(q, *_quantized(rng, 1, 1, 64, 128, 8, 8, 64, 64), k_bits=8, v_bits=8,
                                  interpret=True)
    with pytest.raises(ValueError, match="splits"):
        pl_lanes.decode_attention(q, *_quantized(rng, 1, 1, 128, 128, 4, 4, 64, 64), k_bits=4, v_bits=4, splits=3,
                                  interpret=True)


def test_lanes_kernel_lowers_to_triton_for_cuda():
    """Pallas lowers the kernel (with its multi-output inline PTX) to Triton IR for CUDA at batch 16,
    40 heads, 32K tokens."""
    chk = [jax.export.DisabledSafetyCheck.custom_call("__gpu$xla.gpu.triton")]
    s = jax.ShapeDtypeStruct
    b, h, t, d = 16, 40, 32640, 128
    avals = [s((b, h, d), jnp.float16), s((b, h, t, 64), jnp.uint8), s((b, h, t // 64, d), jnp.float16),
             s((b, h, t // 64, d), jnp.float16), s((b, h, t, 64), jnp.uint8), s((b, h, t, 2), jnp.float16),
             s((b, h, t, 2), jnp.float16)]
    fn = lambda q, *a: pl_lanes.decode_attention(q, *a, k_bits=4, v_bits=4, splits=17)
    text = jax.export.export(jax.jit(fn), platforms=["cuda"], disabled_checks=chk)(*avals).mlir_module()
    assert "__gpu$xla.gpu.triton" in text


# ---------------------------------------------------------------------------- compiled, on a GPU
@pytest.mark.cuda
def test_compiled_lanes_kernel_on_gpu_matches_the_reference(rng):
    need_jax_gpu()
    b, h, t, d = 2, 4, 1024, 128
    args = _quantized(rng, b, h, t, d, 4, 4, 64, 64)
    q = jnp.asarray(rng.standard_normal((b, 2 * h, d)), jnp.float16)
    for length, splits in ((t, None), (700, 2), (33, 1), (0, 4)):
        out, lse = pl_lanes.decode_attention(q, *args, k_bits=4, v_bits=4, length=length, splits=splits)
        ref_out, ref_lse = pl_da.decode_attention_reference(q, *args, k_bits=4, v_bits=4, length=length)
        np.testing.assert_allclose(np.asarray(out), np.asarray(ref_out), rtol=1e-4, atol=1e-4)
        np.testing.assert_allclose(np.asarray(lse), np.asarray(ref_lse), rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------- layout check
def _blocked(name, tpw):
    return (f"{name} = #ttg.blocked<{{sizePerThread = [1, 1], threadsPerWarp = {tpw}, warpsPerCTA = [1, 1], "
            f"order = [1, 0]}}>")


def _linear(name, lane0):
    return (f"{name} = #ttg.linear<{{register = [[0, 1]], lane = [{lane0}, [2, 0], [4, 0], [8, 0], [16, 0]], "
            f"warp = [], block = []}}>")


def _asm(ty):
    return (f'  %1 = "tt.elementwise_inline_asm"(%0) <{{asm_string = "shfl", constraints = "=r,r", '
            f"packed_element = 1 : i32, pure = false}}> : ({ty}) -> {ty}")


_LAYOUTS = [_blocked("#blocked", "[16, 2]"), _blocked("#blocked1", "[32, 1]"), _linear("#linear", "[1, 0]"),
            _linear("#linear1", "[0, 1]")]
_GOOD = [_asm("tensor<32x4xi32, #blocked1>"), _asm("tensor<32x2xi32, #linear>"),
         _asm("tensor<32xi32, #ttg.slice<{dim = 1, parent = #blocked1}>>")]


@pytest.mark.parametrize("bad", [None, "tensor<32x2xi32, #blocked>", "tensor<32x2xi32, #linear1>",
                                 "tensor<32xi32, #ttg.slice<{dim = 0, parent = #blocked1}>>"])
def test_layout_check_finds_asm_operands_whose_lanes_leave_dimension_0(bad):
    """Lanes on dimension 0 (blocked, linear, a slice of another dimension) pass; 16 x 2 lanes, a
    linear lane basis on dimension 1, and a slice of the lanes' own dimension are reported; in a
    TTGIR file and in a pass log (the module before the LLVM lowering)."""
    ttgir = "\n".join(_LAYOUTS + _GOOD + ([_asm(bad)] if bad else [])) + "\n"
    dump = "// -----// IR Dump Before {} //----- //\n"
    log = dump.format("X") + "old\n" + dump.format("ConvertTritonGPUToLLVM (x)") + ttgir + dump.format("Y")
    for text in (ttgir, log):
        found = layout_check.final_ttgir(text)
        assert found.count("tt.elementwise_inline_asm") == 3 + bool(bad)
        assert len(layout_check.bad_asm_operands(found)) == bool(bad)


@pytest.mark.cuda
def test_compiled_lanes_kernel_keeps_every_asm_operand_on_the_lanes(tmp_path):
    """XLA's Triton (whose layout passes differ from pip Triton's, and once cloned an mma into a
    16 x 2-lane layout) lays out every inline-asm operand with its rows on the lanes: its TTGIR,
    dumped by a child process, read by ``layout_check``."""
    need_jax_gpu()
    code = ("import jax, jax.numpy as jnp\n"
            "from lmcache.backends.jax.pallas import decode_lanes as dl\n"
            "b, h, t, d = 1, 2, 1024, 128\n"
            "u8 = lambda *s: jnp.zeros(s, jnp.uint8); f16 = lambda *s: jnp.full(s, 0.01, jnp.float16)\n"
            "args = (f16(b, h, d), u8(b, h, t, 64), f16(b, h, t // 64, d), f16(b, h, t // 64, d), u8(b, h, t, 64),"
            " f16(b, h, t, 2), f16(b, h, t, 2))\n"
            "jax.block_until_ready(dl.decode_attention(*args, k_bits=4, v_bits=4))\n")
    env = dict(os.environ, XLA_FLAGS=f"--xla_dump_to={tmp_path} --xla_dump_emitter_re=triton-to-llvm")
    subprocess.run([sys.executable, "-c", code], env=env, check=True, timeout=300)
    logs = list(tmp_path.glob("*lmcache_decode_lanes*triton-to-llvm*"))
    assert logs, sorted(p.name for p in tmp_path.iterdir())[:20]
    ttgir = layout_check.final_ttgir(logs[0].read_text(errors="replace"))
    assert ttgir.count("tt.elementwise_inline_asm") >= 10
    assert layout_check.bad_asm_operands(ttgir) == []
