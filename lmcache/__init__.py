"""lmcache: a small, fast and durable KV cache for transformers, in any array framework.

Public API only; see ``lmcache.Cache``, ``lmcache.quantize`` and ``lmcache.QuantPlan``.
Importing lmcache imports no array framework besides numpy.
"""

from .cache import Cache
from .plan import QuantPlan
from .quant import QuantizedTensor, QuantSpec, dequantize, quantize

__version__ = "0.1.0"

__all__ = ["Cache", "QuantPlan", "QuantSpec", "QuantizedTensor", "__version__", "dequantize", "quantize"]
