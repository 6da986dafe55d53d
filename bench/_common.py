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


def write_results(out_dir: str, stem: str, device: str, res: dict) -> str:
    """Write ``res`` as JSON to ``<out_dir>/<stem>-<device>.json`` (the device name with runs of
    other characters than letters and digits as ``-``); print and return the path."""
    import json
    import os

    os.makedirs(out_dir, exist_ok=True)
    card = "".join(ch if ch.isalnum() else "-" for ch in device).strip("-")
    path = os.path.join(out_dir, f"{stem}-{card}.json")
    with open(path, "w") as f:
        json.dump(res, f, indent=1)
    print(f"wrote {path}")
    return path
