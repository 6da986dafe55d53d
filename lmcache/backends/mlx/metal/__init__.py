"""Metal kernels for the MLX backend, built through ``mx.fast.metal_kernel``.

One module per kernel: the Metal source string, a builder that creates the kernel once
(``functools.cache``), a plain function that computes the launch grid and threadgroup (so it
is testable where Metal is not), and a launcher. Each kernel is mirrored by the pure-MLX
path in ``lmcache.backends.mlx.ops``; the kernels run only where ``available()`` is true.
"""

from __future__ import annotations

import functools


@functools.cache
def available() -> bool:
    """Whether MLX sees a Metal GPU (Apple silicon); false on Linux and on CPU-only builds."""
    import mlx.core as mx

    try:
        return bool(mx.metal.is_available())
    except Exception:  # an MLX without the metal module: no Metal
        return False


#: File-scope header of every kernel: no fused multiply-add, so ``code * scale + lo`` and the
#: other products and sums round separately, as in the numpy reference (Metal's default
#: contracts them, even across statements). Divisions use ``precise::divide``.
HEADER = "#pragma METAL fp contract(off)\n"

#: Threads per threadgroup. 256 is a multiple of the 32-wide SIMD group, fits every Apple GPU
#: (the limit is 1024) and leaves registers for the per-thread arrays of the kernels.
MAX_THREADS = 256


def threadgroup_for(grid: tuple[int, int, int], limit: int = MAX_THREADS) -> tuple[int, int, int]:
    """A threadgroup for a ``dispatchThreads`` ``grid``: filled along x, then y, then z.

    Each side is at most the grid's, the product at most ``limit``, and every side at least 1.
    """
    if len(grid) != 3 or any(int(g) < 1 for g in grid):
        raise ValueError(f"grid must be three positive sizes, got {grid!r}")
    x = min(int(grid[0]), limit)
    y = min(int(grid[1]), max(1, limit // x))
    z = min(int(grid[2]), max(1, limit // (x * y)))
    return x, y, z
