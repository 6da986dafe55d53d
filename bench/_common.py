"""Helpers the benchmarks share (run them as ``python bench/NAME.py``, which puts this folder on the path)."""

from __future__ import annotations

import platform


def cpu_name() -> str:
    """The CPU model string (``/proc/cpuinfo``), else ``platform.processor()``."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()
