"""Triton kernels of the torch backend, one file per kernel (CUDA and ROCm alike).

Each file holds the private ``@triton.jit`` kernel and a plain launcher that checks its
inputs, computes the grid and launches. ``TRITON_INTERPRET=1`` runs them on CPU tensors
(the tests do); the backend itself sends only GPU tensors here.
"""


def is_pow2(n: int) -> bool:
    """Whether the int ``n`` is a positive power of two (Triton's tile sizes must be)."""
    return n >= 1 and n & (n - 1) == 0
