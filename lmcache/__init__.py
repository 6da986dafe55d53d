"""lmcache: a small, fast and durable KV cache for transformers, in any array framework.

Public API only; see ``lmcache.Cache``, ``lmcache.quantize``, ``lmcache.calibrate``,
``lmcache.QuantPlan`` and ``lmcache.Store``.
Importing lmcache imports no array framework besides numpy.
"""

from .cache import Cache
from .calibrate import calibrate
from .plan import QuantPlan
from .quant import QuantizedTensor, QuantSpec, dequantize, quantize
from .store import Store

__version__ = "0.1.0"

__all__ = ["Cache", "QuantPlan", "QuantSpec", "QuantizedTensor", "Store", "__version__", "calibrate", "dequantize",
           "quantize"]
