"""Pure tensor functions of Infini-attention.

`infini_attention` (fast, default) and `infini_attention_naive` (the paper's segment loop)
share one contract; see `fast.infini_attention` for shapes and dtypes.
"""

from ._common import EPS, UPDATE_RULES, empty_memory, pack_memory, sigma, unpack_memory
from .context import infini_attention_deferred, memory_delta
from .fast import infini_attention, local_attention
from .naive import infini_attention_naive

__all__ = [
    "EPS",
    "UPDATE_RULES",
    "empty_memory",
    "infini_attention",
    "infini_attention_deferred",
    "infini_attention_naive",
    "local_attention",
    "memory_delta",
    "pack_memory",
    "sigma",
    "unpack_memory",
]
