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

from typing import Optional

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


def final_norm_replacement(layer_norm_impl: type) -> Optional[type]:
    """Our `Norm` when Megatron's choice of final norm cannot serve every config, else None.

    megatron-core's `TransformerBlock` picks the final norm of a model built from a *layer*
    spec at import time (`transformer_block.LayerNormImpl`): TE's `TENorm` when Transformer
    Engine imports (fine), else Apex's `FusedLayerNorm` when `apex` imports (asserts
    `normalization == "LayerNorm"`, so every RMSNorm model fails), else `WrappedTorchNorm`
    (asserts `not sequence_parallel`). The last two are replaced.
    """
    from megatron.core.fusions.fused_layer_norm import FusedLayerNorm
    from megatron.core.transformer.torch_norm import WrappedTorchNorm

    from megatron_infini.layers.norms import Norm

    return Norm if layer_norm_impl in (WrappedTorchNorm, FusedLayerNorm) else None


def ensure_sequence_parallel_final_norm() -> bool:
    """Let `GPTModel(transformer_layer_spec=<a layer spec>)` build with RMSNorm and sequence
    parallelism when Transformer Engine is not installed (Apex or not).

    No spec can change Megatron's choice of final norm (see `final_norm_replacement`), so we
    point it at our `Norm` (same math, Apex's fused kernels when importable, plus RMSNorm and
    sequence-parallel support). With TE nothing changes. Idempotent; returns True if our
    `Norm` is the final norm. Called by `get_gpt_layer_infini_spec()`; tested in
    tests/test_gpu_path.py and tests/test_megatron_layer.py.
    """
    from megatron.core.transformer import transformer_block

    from megatron_infini.layers.norms import Norm

    replacement = final_norm_replacement(transformer_block.LayerNormImpl)
    if replacement is not None:
        transformer_block.LayerNormImpl = replacement
    return transformer_block.LayerNormImpl is Norm
