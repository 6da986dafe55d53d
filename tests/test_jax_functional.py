"""The functional JAX cache: a pytree state, pure update/attend, one compilation per shape."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import need_jax_gpu, require

jax = require("jax")
jnp = jax.numpy
require("ml_dtypes")  # bfloat16 on the host (host_dtype)

import lmcache  # noqa: E402
from lmcache.backends.base import host_dtype  # noqa: E402
from lmcache.backends.jax import functional as F  # noqa: E402


def _close(actual, expected, tol, step):
    """``assert_allclose``, except that on a GPU a few codes may sit one quantization step away.

    XLA:GPU's float32 division is not correctly rounded, so a quotient within an ulp of a
    rounding boundary can round the other way (DESIGN.md allows such one-step flips); on the
    CPU every element must match.
    """
    actual, expected = np.asarray(actual, np.float32), np.asarray(expected, np.float32)
    if jax.default_backend() == "cpu":
        np.testing.assert_allclose(actual, expected, **tol)
        return
    off = ~np.isclose(actual, expected, **tol)
    assert off.mean() < 1e-2, f"{off.sum()} of {off.size} elements differ"
    assert (np.abs(actual - expected)[off] <= step).all()


def _steps(rng, b, h, d, sizes):
    for n in sizes:
        yield (rng.standard_normal((b, h, n, d)).astype(np.float32),
               rng.standard_normal((b, h, n, d)).astype(np.float32))


@pytest.mark.parametrize("dtype,bits,q_heads", [("float32", 4, 6), ("bfloat16", 2, 3), ("float16", 8, 3)])
def test_matches_the_eager_cache(rng, dtype, bits, q_heads):
    b, h, d = 2, 3, 64
    state = F.init_state(b, h, d, capacity=200, bits=bits, group_size=32, residual=32, dtype=dtype)
    cache = lmcache.Cache(backend="numpy", bits=bits, group_size=32, residual=32)
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == "float32" else dict(rtol=2e-2, atol=2e-2)
    step = jax.jit(lambda s, k, v, q: (lambda s2, kk, vv: (s2, kk, vv, F.attend(s2, q)))(*F.update(s, k, v)))
    for k, v in _steps(rng, b, h, d, (70, 1, 1, 33, 1)):
        n = k.shape[2]
        kn, vn = k.astype(host_dtype(dtype)), v.astype(host_dtype(dtype))
        q = rng.standard_normal((b, q_heads, min(n, 3), d)).astype(host_dtype(dtype))
        state, ko, vo, out = step(state, jnp.asarray(kn), jnp.asarray(vn), jnp.asarray(q))
        kr, vr = cache.update(0, kn, vn)
        length = int(state.length)
        assert length == cache.seq_len(0) and ko.shape == (b, h, state.capacity, d)
        assert int(state.n_quant) == cache.stats()["tokens_quantized"]
        qstep = 1.01 * max(np.ptp(kr.astype(np.float32)), np.ptp(vr.astype(np.float32))) / (2 ** bits - 1)
        _close(ko[:, :, :length], kr, tol, qstep)
        _close(vo[:, :, :length], vr, tol, qstep)
        assert not np.asarray(ko[:, :, length:], np.float32).any()  # zeros past the held tokens
        ref = cache.attend(0, q)
        _close(out, ref, tol if jax.default_backend() == "cpu" else dict(rtol=1e-2, atol=1e-2), qstep)


def test_decode_steps_compile_once(rng):
    b, h, d = 1, 2, 32
    traces = []

    def step(state, k, v, q):
        traces.append(k.shape[2])  # runs only while jax traces, i.e. once per compilation
        state, _, _ = F.update(state, k, v)
        return state, F.attend(state, q)

    jstep = jax.jit(step, donate_argnums=0)
    state = F.init_state(b, h, d, capacity=160, bits=4, group_size=16, residual=16, dtype=jnp.float16)
    prompt = jnp.asarray(rng.standard_normal((b, h, 20, d)), jnp.float16)
    state, _ = jstep(state, prompt, prompt, jnp.ones((b, h, 2, d), jnp.float16))
    for _ in range(5):  # crosses key-group flushes at 37 and 53 tokens held... and plain appends
        tok = jnp.asarray(rng.standard_normal((b, h, 1, d)), jnp.float16)
        state, out = jstep(state, tok, tok, tok)
        assert out.shape == (b, h, 1, d) and bool(jnp.isfinite(out).all())
    for _ in range(20):
        state, out = jstep(state, tok, tok, tok)
    assert int(state.length) == 45 and int(state.n_quant) == 16
    assert traces == [20, 1]  # the prompt, then every decode step with one compilation
    assert jstep._cache_size() == 2


def test_state_is_a_pytree_with_static_settings():
    state = F.init_state(2, 4, 64, capacity=300, bits=2, group_size=64, residual=128, dtype=jnp.bfloat16)
    leaves, treedef = jax.tree_util.tree_flatten(state)
    assert len(leaves) == 10 and all(isinstance(x, jax.Array) for x in leaves)
    assert state.capacity >= 300 and state.k_codes.shape == (2, 4, 192, 16) and state.k_res.shape[2] == 191
    assert int(state.length) == 0 and state.nbytes == sum(x.nbytes for x in leaves)
    other = F.init_state(2, 4, 64, capacity=300, bits=4, group_size=64, residual=128, dtype=jnp.bfloat16)
    assert jax.tree_util.tree_structure(other) != treedef  # bits are static: a change recompiles
    moved = jax.tree_util.tree_map(lambda x: x, state)
    assert isinstance(moved, F.KVState) and moved.bits == 2


def test_bad_input_is_refused(rng):
    with pytest.raises(ValueError, match="bits must be 2, 4 or 8"):
        F.init_state(1, 1, 64, 100, bits=3)
    with pytest.raises(ValueError, match="capacity must be an integer >= 1"):
        F.init_state(1, 1, 64, 0)
    with pytest.raises(TypeError, match="dtype must be"):
        F.init_state(1, 1, 64, 100, dtype=jnp.int8)
    with pytest.raises(ValueError, match="value group"):
        F.init_state(1, 1, 48, 100, group_size=32)
    state = F.init_state(1, 2, 16, capacity=40, group_size=16, residual=8, dtype=jnp.float32)
    with pytest.raises(TypeError, match="keys must be float32"):
        F.update(state, jnp.zeros((1, 2, 1, 16), jnp.float16), jnp.zeros((1, 2, 1, 16), jnp.float16))
    with pytest.raises(ValueError, match="keys must be"):
        F.update(state, jnp.zeros((1, 3, 1, 16)), jnp.zeros((1, 3, 1, 16)))
    with pytest.raises(ValueError, match="overflows the state"):
        F.update(state, jnp.zeros((1, 2, 41, 16)), jnp.zeros((1, 2, 41, 16)))
    with pytest.raises(ValueError, match="q must be"):
        F.attend(state, jnp.zeros((1, 3, 1, 16)))
    with pytest.raises(TypeError, match="KVState"):
        F.attend({"k": 1}, jnp.zeros((1, 2, 1, 16)))


def test_attend_before_any_token_is_zero():
    state = F.init_state(1, 1, 16, capacity=64, group_size=16, residual=16, dtype=jnp.float32)
    out = F.attend(state, jnp.ones((1, 2, 1, 16)))
    assert out.shape == (1, 2, 1, 16) and not np.asarray(out).any()


@pytest.mark.cuda
def test_kernel_path_on_gpu_matches_the_jnp_path(rng):
    need_jax_gpu()
    b, h, d = 2, 8, 128
    state = F.init_state(b, h, d, capacity=2048, bits=4, group_size=64, residual=128, dtype=jnp.bfloat16)
    prompt = jnp.asarray(rng.standard_normal((b, h, 1500, d)), jnp.bfloat16)
    state, _, _ = jax.jit(F.update)(state, prompt, prompt)
    q = jnp.asarray(rng.standard_normal((b, 2 * h, 1, d)), jnp.bfloat16)
    fast = jax.jit(lambda s, q: F.attend(s, q, use_kernel=True))(state, q)
    slow = jax.jit(lambda s, q: F.attend(s, q, use_kernel=False))(state, q)
    np.testing.assert_allclose(np.asarray(fast, np.float32), np.asarray(slow, np.float32), rtol=2e-2, atol=2e-2)
