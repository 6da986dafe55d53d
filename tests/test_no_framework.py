"""``import lmcache`` and a numpy Cache pull in no array framework (array-api-compat's habit)."""

from __future__ import annotations

import subprocess
import sys

CODE = """
import sys
import numpy as np
import lmcache
cache = lmcache.Cache(backend="numpy", bits=4, group_size=8, residual=4)
k = np.random.default_rng(0).standard_normal((1, 2, 32, 16)).astype(np.float32)
cache.update(0, k, k)
cache.attend(0, k[:, :, -1:])
lmcache.dequantize(lmcache.quantize(k, 4, 8, axis=-2))
auto = lmcache.Cache()
auto.update(0, k, k)
bad = [m for m in ("torch", "jax", "jaxlib", "mlx", "triton", "redis", "cryptography") if m in sys.modules]
print(",".join(bad))
"""


def test_no_framework_is_imported():
    out = subprocess.run([sys.executable, "-c", CODE], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "", f"imported: {out.stdout.strip()}"
