"""Integrations with model libraries, one module each, imported only when asked for.

``lmcache.integrations.mlx_lm`` (mlx-lm), ``lmcache.integrations.hf`` (transformers). Nothing
is imported here, so ``import lmcache.integrations`` pulls in no framework.
"""
