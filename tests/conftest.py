"""Shared test helpers.

``require(module)`` skips a test whose component is not installed, except when
``LMCACHE_REQUIRE_ALL=1`` (set by ``.ci/run``): then a missing component fails the test.
``LMCACHE_TEST_BACKENDS`` (set by the noxfile) lists the backends to run the shared
backend tests on; ``LMCACHE_TEST_DEVICE`` (``cpu`` by default) the device.
"""

from __future__ import annotations

import contextlib
import importlib
import os

import numpy as np
import pytest

REQUIRE_ALL = os.environ.get("LMCACHE_REQUIRE_ALL") == "1"
TEST_DEVICE = os.environ.get("LMCACHE_TEST_DEVICE", "cpu")


def require(module: str, why: str = ""):
    """Import and return ``module``; skip the test if it is missing (fail under LMCACHE_REQUIRE_ALL)."""
    try:
        return importlib.import_module(module)
    except ImportError as e:
        msg = f"{module} is not installed{': ' + why if why else ''} ({e})"
        if REQUIRE_ALL:
            pytest.fail(msg + " and LMCACHE_REQUIRE_ALL=1 forbids skipping", pytrace=False)
        pytest.skip(msg, allow_module_level=True)


def need_jax_gpu() -> None:
    """Skip the test unless jax sees a GPU (fail under LMCACHE_REQUIRE_ALL)."""
    import jax

    try:
        gpu = any(d.platform == "gpu" for d in jax.devices())
    except RuntimeError:
        gpu = False
    if not gpu:
        if REQUIRE_ALL:
            pytest.fail("no GPU visible to jax, and LMCACHE_REQUIRE_ALL=1 forbids skipping", pytrace=False)
        pytest.skip("no GPU visible to jax")


def pallas_interpret_device(request, on_default_device=()):
    """Where a Pallas test runs: the CPU device for interpret mode (on a GPU host the default device
    would be XLA:GPU, whose float32 division is not correctly rounded, so exact-code checks would
    differ), the default device for tests marked ``cuda`` and those named in ``on_default_device``
    (lowering for CUDA asks for a GPU where there is one). A context manager."""
    import jax

    if request.node.get_closest_marker("cuda") is not None or request.node.name in on_default_device:
        return contextlib.nullcontext()
    return jax.default_device(jax.devices("cpu")[0])


def test_backends() -> list[str]:
    env = os.environ.get("LMCACHE_TEST_BACKENDS")
    return [b for b in env.split(",") if b] if env else ["numpy"]


test_backends.__test__ = False  # not a test itself


@pytest.fixture
def rng():
    return np.random.default_rng(1234)
