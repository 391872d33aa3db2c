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


# ----------------------------------------------------------------------------- megatron-core versions
# megatron-core 0.16.1 (the newest release for Python 3.10/3.11) and 0.19.x (Python >= 3.12) are
# both supported (docs/versions.md). What differs between them, for our code, is handled below.


def async_save_strategy() -> Optional[str]:
    """The `async_strategy` to pass to `dist_checkpointing.save(..., async_sharded_save=True)`.

    megatron-core 0.16 has one async implementation (its own) and no `async_strategy`
    argument: None. From 0.17 the argument exists and defaults to "nvrx" (NVIDIA
    resiliency extension), which raises when `nvidia-resiliency-ext` is absent or older than
    Megatron's minimum: "nvrx" only when Megatron's own check accepts the installed package,
    else "mcore" (Megatron's own async save, the 0.16 behaviour).
    """
    import inspect

    from megatron.core.dist_checkpointing import serialization

    if "async_strategy" not in inspect.signature(serialization.save).parameters:
        return None
    try:
        from megatron.core.dist_checkpointing.strategies.nvrx import has_nvrx_async_support

        if has_nvrx_async_support():
            return "nvrx"
    except Exception:  # noqa: BLE001 - absent, or unusable: Megatron's check asserts on a version
        pass          # older than its minimum and raises AttributeError on 0.4 (no __version__)
    return "mcore"


def async_save_machinery(strategy: Optional[str]):
    """(module of the write-results queue, AsyncCallsQueue class) of an `async_save_strategy()`.

    The request `dist_checkpointing.save` returns must be scheduled on the queue class of the
    implementation that made it; its forked writer reports through the module's
    `_results_queue` (see `checkpointing.manager.dist_save`).
    """
    if strategy == "nvrx":
        from nvidia_resiliency_ext.checkpointing.async_ckpt import filesystem_async
        from nvidia_resiliency_ext.checkpointing.async_ckpt.core import AsyncCallsQueue
    else:
        from megatron.core.dist_checkpointing.strategies import filesystem_async
        from megatron.core.dist_checkpointing.strategies.async_utils import AsyncCallsQueue
    return filesystem_async, AsyncCallsQueue


def unsupported_attention_options(config, submodules=None) -> list:
    """The Megatron self-attention options that our attention modules would silently drop.

    `InfiniSelfAttention` and `CompressiveSelfAttention` replace `SelfAttention.forward`
    (the memory needs q/k before RoPE and in-segment positions); Megatron's forward has gained
    options since 0.16 that ours does not implement. Each is listed here by its config field,
    read with `getattr` so that fields absent from an older megatron-core count as off.
    `submodules` (the spec's `SelfAttentionSubmodules`): its q/k norms must agree with
    `config.qk_layernorm` (0.19 refuses a norm the config does not ask for; every version
    silently skips a norm the config asks for and the spec leaves out).
    Returns messages, one per option in use; empty when all is supported.
    """
    from megatron.core.transformer.identity_op import IdentityOp
    from megatron.core.transformer.spec_utils import ModuleSpec

    def has_norm(spec) -> bool:
        module = spec.module if isinstance(spec, ModuleSpec) else spec
        return module not in (None, IdentityOp)

    problems = []

    def on(field, off=(None, False)):
        value = getattr(config, field, None)
        return value not in off

    if on("attention_output_gate"):
        problems.append("attention_output_gate=True (gated attention output)")
    if on("qk_l2_norm"):
        problems.append("qk_l2_norm=True (use qk_layernorm with the spec's q/k norm)")
    if on("fused_single_qkv_rope"):
        problems.append("fused_single_qkv_rope=True (the memory reads q/k before RoPE)")
    offloaded = set(getattr(config, "offload_modules", None) or ()) & {"qkv_linear", "core_attn", "attn_proj"}
    if getattr(config, "fine_grained_activation_offloading", False) and offloaded:
        problems.append(f"fine_grained_activation_offloading of {sorted(offloaded)}")
    if on("window_size"):
        problems.append(f"window_size={config.window_size} (sliding-window attention; use segment_length)")
    if on("softmax_type", off=(None, "vanilla")):
        problems.append(f"softmax_type={config.softmax_type!r} (only 'vanilla')")
    if on("qk_clip"):
        problems.append("qk_clip=True")
    yarn_mscale = 1.0
    try:  # Megatron's YaRN attention factor (multi-latent-attention configs), 1.0 when unused
        from megatron.core.models.common.embeddings.yarn_rotary_pos_embedding import (
            _yarn_get_concentration_factor_from_config,
        )
        yarn_mscale = _yarn_get_concentration_factor_from_config(config)
    except ImportError:
        pass
    if yarn_mscale != 1.0:
        problems.append(f"YaRN attention scaling (mscale {yarn_mscale}); not supported")
    if submodules is not None:
        spec_norm = has_norm(submodules.q_layernorm) or has_norm(submodules.k_layernorm)
        if spec_norm != bool(getattr(config, "qk_layernorm", False)):
            problems.append(f"qk_layernorm={getattr(config, 'qk_layernorm', False)} but the spec "
                            f"{'has' if spec_norm else 'has no'} q/k norm (build the spec with "
                            f"qk_layernorm=config.qk_layernorm)")
    return problems
