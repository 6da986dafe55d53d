"""Triton kernels of the torch backend, one file per kernel (CUDA and ROCm alike).

Each file holds the private ``@triton.jit`` kernel and a plain launcher that checks its
inputs, computes the grid and launches. ``TRITON_INTERPRET=1`` runs them on CPU tensors
(the tests do); the backend itself sends only GPU tensors here.
"""
