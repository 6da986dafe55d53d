"""Pallas kernels for the JAX backend: quantize+pack, unpack+dequantize, fused decode attention.

One module per kernel (``quantize``, ``dequantize``, ``decode_attention``), each holding
the kernel, a wrapper that validates its inputs, and a pure-``jnp`` reference with the same
signature. ``interpret=True`` runs a kernel's logic on any backend (the CPU in CI);
compiled, they target GPUs through Pallas' Triton lowering. Import the modules themselves:
their functions share their names.
"""
