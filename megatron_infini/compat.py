"""The one place that works around megatron-core's CUDA assumptions, for CPU-only machines.

megatron-core 0.16 calls a few CUDA functions unconditionally on paths that are otherwise
device-agnostic:

- `torch.cuda.current_device()` as the device of new tensors: sequence-parallel collectives,
  tensor-parallel linear layers, the global memory buffer, the dist_checkpointing saver.
  On CPU it must yield the CPU device.
- `torch.cuda.synchronize()` inside the dist_checkpointing torch_dist strategy. On CPU there
  is nothing to wait for.
- the CUDA RNG tracker, forked around dropout when sequence_parallel is on. On CPU we install
  Megatron's own inference tracker, whose `fork()` is a no-op (dropout then draws from the
  CPU generator; masks are not decorrelated across tensor-parallel ranks).

`ensure_cpu_compat()` applies these patches only when CUDA is absent, is idempotent, and is
called explicitly by our code (layer construction, test helpers), never at import time.
"""

from __future__ import annotations

import torch

_APPLIED = False


def _cpu_current_device() -> torch.device:
    return torch.device("cpu")


def _cpu_synchronize(device=None) -> None:
    return None


def ensure_cpu_compat() -> bool:
    """Patch megatron-core's CUDA assumptions when CUDA is absent; no-op otherwise.

    Returns True when the CPU patches are in place, False on a CUDA machine.
    """
    global _APPLIED
    if torch.cuda.is_available():
        return False
    if not _APPLIED:
        torch.cuda.current_device = _cpu_current_device
        torch.cuda.synchronize = _cpu_synchronize
        _APPLIED = True
    _ensure_noop_rng_tracker()
    return True


def _ensure_noop_rng_tracker() -> None:
    """Install Megatron's inference RNG tracker (no-op fork) unless one is already there."""
    from megatron.core.tensor_parallel import random as mrandom

    tracker = getattr(mrandom, "_CUDA_RNG_STATE_TRACKER", None)
    if tracker is not None and type(tracker).__name__ == "InferenceCudaRNGStatesTracker":
        return
    mrandom.initialize_rng_tracker(inference_rng_tracker=True, force_reset=True)


def param_device(config) -> torch.device:
    """Where Megatron creates parameters: CPU with `use_cpu_initialization` or without CUDA,
    else the current CUDA device (as Megatron's own layers do)."""
    if config.use_cpu_initialization or not torch.cuda.is_available():
        return torch.device("cpu")
    return torch.device("cuda", torch.cuda.current_device())


def ensure_sequence_parallel_final_norm() -> bool:
    """Let `GPTModel(transformer_layer_spec=<a layer spec>)` build with sequence parallelism
    when neither Transformer Engine nor Apex is installed.

    Why: given a *layer* spec, megatron-core's `TransformerBlock` picks the decoder's final norm
    itself (`transformer_block.LayerNormImpl`); without TE/Apex that is `WrappedTorchNorm`, which
    asserts `not config.sequence_parallel`. No spec can change that choice, so we point the
    fallback at our `Norm` (same math, plus sequence-parallel support). Only the fallback is
    replaced: with TE or Apex present nothing changes. Idempotent; returns True if patched.
    Called by `get_gpt_layer_infini_spec()`; tested in tests/test_megatron_layer.py.
    """
    from megatron.core.transformer import transformer_block
    from megatron.core.transformer.torch_norm import WrappedTorchNorm

    from megatron_infini.layers.norms import Norm

    if transformer_block.LayerNormImpl is WrappedTorchNorm:
        transformer_block.LayerNormImpl = Norm
    return transformer_block.LayerNormImpl is Norm
