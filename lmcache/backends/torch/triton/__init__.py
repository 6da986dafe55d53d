"""Triton kernels of the torch backend, one file per kernel (CUDA and ROCm alike).

Each file holds the private ``@triton.jit`` kernel and a plain launcher that checks its
inputs, computes the grid and launches. ``TRITON_INTERPRET=1`` runs them on CPU tensors
(the tests do); the backend itself sends only GPU tensors here.
"""

import functools


def is_pow2(n: int) -> bool:
    """Whether the int ``n`` is a positive power of two (Triton's tile sizes must be)."""
    return n >= 1 and n & (n - 1) == 0


@functools.lru_cache(maxsize=16)
def _capability_of(index: int) -> tuple[int, int]:
    import torch

    return torch.cuda.get_device_capability(index)


def capability(device) -> tuple[int, int]:
    """``(major, minor)`` compute capability of the CUDA ``torch.device`` ``device``, queried once per
    device (torch's query costs more host time than a decode launch can spare at batch 1)."""
    import torch

    return _capability_of(device.index if device.index is not None else torch.cuda.current_device())
