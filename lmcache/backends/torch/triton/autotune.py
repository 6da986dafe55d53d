"""Launch settings chosen by timing them on the device, once per class of problem.

The same kernel at the same settings ranks differently on different cards of one model: on the
lent H200s, decode_imma at 4 bits with two tiles per step and the L2 bulk prefetch took
0.759-0.766 ms at batch 16 / 32K tokens on two cards where the shared-memory stages took
0.770-0.777, and 0.804-0.820 on two others where the stages took 0.775-0.777. So, as Triton's
``autotune`` does, the first large call of a class times each candidate on the device at hand and
keeps the fastest.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Sequence
from typing import Any

import torch

_CHOSEN: dict = {}


def choose(key: Hashable, candidates: Sequence[Any], run: Callable[[Any], Any], device: torch.device,
           reps: int = 5) -> Any:
    """The candidate under which ``run(candidate)`` takes the least GPU time, remembered under ``key``.

    ``run`` must be repeatable (no state changes); each candidate runs twice unmeasured (compiling
    its kernels), then ``reps`` times between two CUDA events on the current stream of the CUDA
    ``device``. A single candidate is returned without running anything. Returns the chosen
    element of ``candidates``.
    """
    if key in _CHOSEN:
        return _CHOSEN[key]
    if len(candidates) == 1:
        return candidates[0]
    times = []
    with torch.cuda.device(device):
        for cand in candidates:
            for _ in range(2):
                run(cand)
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(reps):
                run(cand)
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / reps)
    best = candidates[min(range(len(candidates)), key=times.__getitem__)]
    _CHOSEN[key] = best
    return best


def chosen(key: Hashable, default: Any = None) -> Any:
    """The candidate chosen under ``key`` so far, or ``default``."""
    return _CHOSEN.get(key, default)


def choices() -> dict:
    """Every choice so far, ``{key: candidate}`` (a copy)."""
    return dict(_CHOSEN)
