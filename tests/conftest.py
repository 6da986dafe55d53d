"""Shared test helpers.

``require(module)`` skips a test whose component is not installed, except when
``LMCACHE_REQUIRE_ALL=1`` (set by ``.ci/run``): then a missing component fails the test.
``LMCACHE_TEST_BACKENDS`` (set by the noxfile) lists the backends to run the shared
backend tests on; ``LMCACHE_TEST_DEVICE`` (``cpu`` by default) the device.
"""

from __future__ import annotations

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


def test_backends() -> list[str]:
    env = os.environ.get("LMCACHE_TEST_BACKENDS")
    return [b for b in env.split(",") if b] if env else ["numpy"]


test_backends.__test__ = False  # not a test itself


@pytest.fixture
def rng():
    return np.random.default_rng(1234)
