"""The ``lmcache`` command, run as a user would."""

from __future__ import annotations

import re
import subprocess
import sys


def run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "lmcache.cli", *args], capture_output=True, text=True, timeout=300)


def test_info_lists_every_backend():
    out = run("info")
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("lmcache ")
    for name in ("numpy", "torch", "jax", "mlx"):
        assert re.search(rf"^\s+{name}\s", out.stdout, re.M), out.stdout


def test_demo_prints_measured_rows():
    out = run("demo", "--tokens", "300", "--layers", "1")
    assert out.returncode == 0, out.stderr
    rows = {m.group(1): (int(m.group(2).replace(",", "")), float(m.group(3)))
            for m in re.finditer(r"^\s*(fp16|8|4|2)\s+([\d,]+)\s+\S+\s+\S+\s+(\S+)", out.stdout, re.M)}
    assert set(rows) == {"fp16", "8", "4", "2"}, out.stdout
    assert rows["fp16"][0] > rows["8"][0] > rows["4"][0] > rows["2"][0]
    assert rows["fp16"][1] < rows["8"][1] < rows["4"][1] < rows["2"][1]


def test_no_command_prints_help():
    out = run()
    assert out.returncode == 2 and "demo" in out.stdout
