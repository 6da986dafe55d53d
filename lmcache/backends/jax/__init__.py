"""The JAX backend: jax arrays, a jnp path (``ops``) and Pallas kernels (``pallas``) for GPUs.

``JaxBackend`` implements the Backend contract; ``functional`` is a jit-friendly cache for
people who write JAX models: a fixed-capacity pytree state with pure ``update``/``attend``.
Importing this package imports jax.
"""

from .backend import JaxBackend

__all__ = ["JaxBackend"]
