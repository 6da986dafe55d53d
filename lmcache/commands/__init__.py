"""Sub-commands of the ``lmcache`` console script (see ``lmcache.cli``)."""
