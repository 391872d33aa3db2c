"""Parallelism specific to Infini-attention: context parallelism by memory relay
(`context_parallel`): contiguous blocks of whole segments per rank, the memory handed over
instead of keys and values."""

from .context_parallel import (
    CommCounter,
    MemoryRelay,
    contiguous_chunk,
    pack_memory,
    setup_context_parallel,
    split_for_context_parallel,
    unpack_memory,
)

__all__ = [
    "CommCounter",
    "MemoryRelay",
    "contiguous_chunk",
    "pack_memory",
    "setup_context_parallel",
    "split_for_context_parallel",
    "unpack_memory",
]
