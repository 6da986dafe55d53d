"""Backend registry: ``get_backend(name | "auto")``, ``backend_of(array)``, ``available()``.

Nothing here imports a framework. A backend's module is imported only when that backend is
asked for, and ``backend_of`` recognises an array by its type's module name, the way einops
does, so ``import lmcache`` stays cheap and framework-free.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
from typing import Any

from .base import Backend, KVView, QuantBlock

__all__ = ["Backend", "KVView", "QuantBlock", "available", "backend_of", "get_backend", "registered"]

# name -> (module holding the class, class name, framework module, pip extra)
_REGISTRY: dict[str, tuple[str, str, str, str]] = {
    "numpy": ("lmcache.backends.numpy", "NumpyBackend", "numpy", ""),
    "torch": ("lmcache.backends.torch", "TorchBackend", "torch", "torch"),
    "jax": ("lmcache.backends.jax", "JaxBackend", "jax", "jax"),
    "mlx": ("lmcache.backends.mlx", "MlxBackend", "mlx", "mlx"),
}
# Top-level module of an array's type -> backend name.
_TYPE_MODULES = {"numpy": "numpy", "torch": "torch", "jax": "jax", "jaxlib": "jax", "mlx": "mlx"}
# Preference when nothing else decides: accelerator frameworks first.
_AUTO_ORDER = ("torch", "jax", "mlx")

_instances: dict[tuple[str, str | None], Backend] = {}
_type_cache: dict[type, str | None] = {}


def registered() -> list[str]:
    """Every backend name lmcache knows, installed or not."""
    return list(_REGISTRY)


def _module_present(mod: str, backend: str) -> bool:
    if importlib.util.find_spec(mod) is None:
        return False
    return importlib.util.find_spec(_REGISTRY[backend][0]) is not None


def available() -> list[str]:
    """Names of the backends whose framework is installed (found without importing it)."""
    return [name for name, (_, _, mod, _) in _REGISTRY.items() if _module_present(mod, name)]


def _install_hint(name: str) -> str:
    extra = _REGISTRY[name][3]
    return f"pip install 'lmcache[{extra}]'" if extra else "pip install lmcache"


def get_backend(name: str | Backend | None = "auto", device: str | None = None) -> Backend:
    """Return the backend called ``name`` (one instance per name and device).

    ``name``: ``"numpy"``, ``"torch"``, ``"jax"``, ``"mlx"``, a ``Backend`` instance (returned
    as is), or ``"auto"``/``None``: the ``LMCACHE_BACKEND`` environment variable if set, else
    the first installed accelerator framework that has a device, else numpy.
    Raises ``ValueError`` for an unknown name and ``ImportError`` (saying what to install)
    for a backend whose framework is missing.
    """
    if isinstance(name, Backend):
        return name
    if name is None or name == "auto":
        env = os.environ.get("LMCACHE_BACKEND", "").strip()
        name = env if env and env != "auto" else _auto_name()
    if not isinstance(name, str) or name not in _REGISTRY:
        raise ValueError(f"backend must be one of {', '.join(['auto', *_REGISTRY])}, got {name!r}")
    key = (name, device)
    if key not in _instances:
        mod_name, cls_name, framework, _ = _REGISTRY[name]
        if not _module_present(framework, name):
            raise ImportError(f"the {name} backend needs {framework}, which is not installed: {_install_hint(name)}")
        cls = getattr(importlib.import_module(mod_name), cls_name)
        _instances[key] = cls(device)
    return _instances[key]


def _auto_name() -> str:
    """The best installed accelerator backend, else numpy (imports candidate frameworks)."""
    for name in _AUTO_ORDER:
        if name in available():
            try:
                if get_backend(name).has_accelerator():
                    return name
            except Exception:  # a framework that is installed but broken is passed over
                continue
    return "numpy"


def framework_of(x: Any) -> str | None:
    """The backend name for ``x``'s type, or ``None``; decided by module name, imports nothing."""
    t = type(x)
    if t not in _type_cache:
        _type_cache[t] = _TYPE_MODULES.get(t.__module__.split(".")[0])
    return _type_cache[t]


def backend_of(x: Any, device: str | None = None) -> Backend:
    """The backend for array ``x`` (numpy for plain Python sequences).

    Raises ``TypeError`` when ``x`` is of no known array type.
    """
    name = framework_of(x)
    if name is None:
        if isinstance(x, (list, tuple, int, float)):
            return get_backend("numpy")
        raise TypeError(f"expected an array of numpy, torch, jax or mlx, got {type(x).__module__}.{type(x).__name__}")
    return get_backend(name, device)
