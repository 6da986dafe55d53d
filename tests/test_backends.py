"""The backend registry: names, auto selection, detection by type, install hints."""

from __future__ import annotations

import numpy as np
import pytest

import lmcache.backends as backends
from lmcache.backends import backend_of, framework_of, get_backend


def test_numpy_is_always_available():
    assert "numpy" in backends.available()
    assert set(backends.available()) <= set(backends.registered())
    be = get_backend("numpy")
    assert be is get_backend("numpy")  # one instance per name and device
    assert be.devices() == ["cpu"] and "numpy" in be.kernel_path()


def test_unknown_name_says_what_is_accepted():
    with pytest.raises(ValueError, match="backend must be one of auto, numpy"):
        get_backend("tensorflow")


def test_missing_framework_says_what_to_install(monkeypatch):
    monkeypatch.setitem(backends._REGISTRY, "fakefw", ("lmcache.backends.numpy", "NumpyBackend",
                                                       "no_such_framework_xyz", "fakefw"))
    with pytest.raises(ImportError, match=r"pip install 'lmcache\[fakefw\]'"):
        get_backend("fakefw")
    assert "fakefw" not in backends.available()


def test_environment_variable_picks_the_backend(monkeypatch):
    monkeypatch.setenv("LMCACHE_BACKEND", "numpy")
    assert get_backend("auto").name == "numpy"
    monkeypatch.setenv("LMCACHE_BACKEND", "nonsense")
    with pytest.raises(ValueError, match="got 'nonsense'"):
        get_backend("auto")


def test_backend_of_by_type():
    assert backend_of(np.zeros(3)).name == "numpy"
    assert backend_of([1.0, 2.0]).name == "numpy"
    assert framework_of(object()) is None
    with pytest.raises(TypeError, match="expected an array of numpy, torch, jax or mlx"):
        backend_of(object())


def test_numpy_device_is_cpu_only():
    with pytest.raises(ValueError, match="device='cuda' is not available on the numpy backend"):
        get_backend("numpy", device="cuda")


def test_numpy_topk_and_gather():
    be = get_backend("numpy")
    x = np.array([[0.1, 0.9, 0.5, 0.9, 0.2]])
    idx = be.topk(x, 2)
    assert idx.tolist() == [[1, 3]]  # ties to the lower index, ascending
    assert be.topk(np.array([[3.0, 3.0, 3.0]]), 2).tolist() == [[0, 1]]
    np.testing.assert_array_equal(be.gather(x, idx, -1), [[0.9, 0.9]])
