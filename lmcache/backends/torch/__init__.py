"""The torch backend: torch tensors on CPU, CUDA and ROCm, with Triton kernels on GPUs.

``ops`` is the torch-only path, ``triton/`` one file per kernel, ``paged`` the paged
layout (a page pool reached through a block table).
"""

from .backend import TorchBackend, triton_available

__all__ = ["TorchBackend", "triton_available"]
