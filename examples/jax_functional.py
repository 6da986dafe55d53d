"""A jitted decode loop over lmcache's functional JAX cache (plain JAX, runs on CPU or GPU).

One attention layer with random weights: prefill a prompt, then decode tokens one at a
time. The cache state is a pytree of fixed capacity, so `jax.jit` compiles the decode step
once, however many steps run; the state is donated, so the cache is updated in place.

    python examples/jax_functional.py
"""

import jax
import jax.numpy as jnp

from lmcache.backends.jax import functional as kv

B, HEADS, KV_HEADS, HEAD_DIM, PROMPT, STEPS = 1, 8, 2, 64, 300, 40
D_MODEL = HEADS * HEAD_DIM
k1, k2, k3, k4 = jax.random.split(jax.random.key(0), 4)
w_q = jax.random.normal(k1, (D_MODEL, HEADS * HEAD_DIM), jnp.bfloat16) / D_MODEL ** 0.5
w_kv = jax.random.normal(k2, (D_MODEL, 2 * KV_HEADS * HEAD_DIM), jnp.bfloat16) / D_MODEL ** 0.5


def attention_layer(state, x):
    """x: [B, T, D_MODEL] -> (new state, [B, T, D_MODEL]); attention reads the compressed cache."""
    t = x.shape[1]
    q = (x @ w_q).reshape(B, t, HEADS, HEAD_DIM).transpose(0, 2, 1, 3)
    k, v = jnp.split((x @ w_kv).reshape(B, t, 2 * KV_HEADS, HEAD_DIM).transpose(0, 2, 1, 3), 2, axis=1)
    state, _, _ = kv.update(state, k, v)  # the returned full K/V are unused: jit drops them
    out = kv.attend(state, q)             # [B, HEADS, t, HEAD_DIM], causal over every cached token
    return state, out.transpose(0, 2, 1, 3).reshape(B, t, D_MODEL)


step = jax.jit(attention_layer, donate_argnums=0)

state = kv.init_state(B, KV_HEADS, HEAD_DIM, capacity=PROMPT + STEPS, bits=4, group_size=64, residual=128,
                      dtype=jnp.bfloat16)
prompt = jax.random.normal(k3, (B, PROMPT, D_MODEL), jnp.bfloat16)
state, h = step(state, prompt)                   # compiles for the prompt length
x = h[:, -1:]
for _ in range(STEPS):
    state, x = step(state, x)                   # compiles once, on the first step
print(f"{int(state.length)} tokens cached ({int(state.n_quant)} as 4-bit codes), "
      f"{step._cache_size()} compilations, state {state.nbytes / 2**20:.2f} MiB, output {x.shape} {x.dtype}")
