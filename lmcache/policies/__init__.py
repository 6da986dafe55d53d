"""Policies: token eviction (window, sink, h2o, snapkv, knorm, keydiff) and tier placement.

Modules are imported on demand (``from lmcache.policies.placement import RecencyFrequency``);
nothing is imported here so that ``import lmcache`` stays cheap.
"""

# Eviction names, resolved on first use (PEP 562) so that importing the package stays free.
_LAZY = {
    "Policy": "lmcache.policies.base", "get_policy": "lmcache.policies.base", "available": "lmcache.policies.base",
    "Window": "lmcache.policies.window", "Sink": "lmcache.policies.sink", "H2O": "lmcache.policies.h2o",
    "SnapKV": "lmcache.policies.snapkv", "KNorm": "lmcache.policies.knorm",
    "KeyDiff": "lmcache.policies.keydiff",
}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'lmcache.policies' has no attribute {name!r}")
