"""What differs between the supported megatron-core versions (0.16.1 and 0.19.x, docs/versions.md):
the Megatron attention options our attention modules refuse, the q/k norm agreement of spec and
config, and the async-save implementation a background checkpoint uses."""

from __future__ import annotations

import importlib.util
import inspect

import pytest
from _dist import run_distributed

TINY = dict(num_layers=1, hidden_size=64, num_attention_heads=4, num_query_groups=2,
            ffn_hidden_size=128, segment_length=16, use_cpu_initialization=True)

#: Megatron attention options that our forward would drop: (config field, value in use).
#: A field this megatron-core lacks is skipped (the option does not exist there).
UNSUPPORTED = [
    ("attention_output_gate", True),
    ("qk_l2_norm", True),
    ("fused_single_qkv_rope", True),
    ("window_size", (64, 0)),
    ("softmax_type", "off-by-one"),
    ("qk_clip", True),
]


def _config(**fields):
    from megatron_infini import llama_config

    return llama_config(**{**TINY, **fields})


@pytest.mark.parametrize("field,value", UNSUPPORTED)
def test_each_unsupported_option_is_named(field, value):
    from megatron_infini.compat import unsupported_attention_options
    from megatron_infini.spec import get_gpt_layer_infini_spec

    cfg = _config()
    attention = get_gpt_layer_infini_spec(transformer_impl="local").submodules.self_attention.submodules
    assert unsupported_attention_options(cfg, attention) == []  # the default config is fully supported
    if not hasattr(cfg, field):
        pytest.skip(f"this megatron-core has no {field}")
    setattr(cfg, field, value)
    problems = unsupported_attention_options(cfg, attention)
    assert len(problems) == 1 and field in problems[0], problems


def test_offloading_attention_activations_is_refused():
    from megatron_infini.compat import unsupported_attention_options

    cfg = _config()
    if not hasattr(cfg, "fine_grained_activation_offloading"):
        pytest.skip("this megatron-core has no fine-grained activation offloading")
    cfg.fine_grained_activation_offloading, cfg.offload_modules = True, ["core_attn", "mlp_norm"]
    assert unsupported_attention_options(cfg) == ["fine_grained_activation_offloading of ['core_attn']"]
    cfg.offload_modules = ["mlp_norm"]  # outside the attention: Megatron's layer handles it
    assert unsupported_attention_options(cfg) == []


def test_block_spec_takes_qk_layernorm_from_the_config():
    from megatron.core.transformer.identity_op import IdentityOp

    from megatron_infini.spec import get_gpt_block_infini_spec

    for qk in (False, True):
        cfg = _config(qk_layernorm=qk)
        attention = get_gpt_block_infini_spec(cfg, transformer_impl="local").submodules.layer_specs[0] \
            .submodules.self_attention.submodules
        assert (attention.q_layernorm is not IdentityOp) == qk
        assert (attention.k_layernorm is not IdentityOp) == qk
        with pytest.raises(ValueError, match="qk_layernorm=.* must agree"):
            get_gpt_block_infini_spec(cfg, qk_layernorm=not qk, transformer_impl="local")


def _construction_refusals(rank, world_size):
    """Build a transformer layer from our spec with each unsupported option (and each q/k norm
    mismatch): every one must fail in our constructor with a ValueError naming the option."""
    from megatron.core.transformer.transformer_layer import TransformerLayer

    from megatron_infini.spec import get_gpt_layer_infini_spec

    messages = {}
    cases = [(memory_type, qk_spec, {"qk_layernorm": not qk_spec})
             for memory_type in ("infini", "compressive") for qk_spec in (False, True)]
    cfg = _config()
    cases += [("infini", False, {field: value}) for field, value in UNSUPPORTED[:1] if hasattr(cfg, field)]
    for memory_type, qk_spec, fields in cases:
        cfg = _config(memory_type=memory_type)
        for field, value in fields.items():
            setattr(cfg, field, value)
        spec = get_gpt_layer_infini_spec(qk_layernorm=qk_spec, memory_type=memory_type, transformer_impl="local")
        try:
            TransformerLayer(cfg, spec.submodules, layer_number=1)
            messages[(memory_type, qk_spec, *fields)] = None
        except ValueError as err:
            messages[(memory_type, qk_spec, *fields)] = str(err)
    # and a matching q/k norm builds
    TransformerLayer(_config(qk_layernorm=True), get_gpt_layer_infini_spec(qk_layernorm=True).submodules, 1)
    return messages


def test_layers_refuse_unsupported_options_at_construction():
    messages = run_distributed(_construction_refusals, 1)[0]
    assert len(messages) >= 4
    for (memory_type, _, field), message in messages.items():
        name = "InfiniSelfAttention" if memory_type == "infini" else "CompressiveSelfAttention"
        assert message is not None and name in message and field in message, (memory_type, field, message)


def test_async_save_strategy_follows_the_installed_versions(monkeypatch):
    from megatron.core.dist_checkpointing import serialization

    from megatron_infini import compat

    has_argument = "async_strategy" in inspect.signature(serialization.save).parameters
    strategy = compat.async_save_strategy()
    if not has_argument:  # megatron-core 0.16: its own async save, no choice to make
        assert strategy is None
    elif importlib.util.find_spec("nvidia_resiliency_ext") is None:
        assert strategy == "mcore"
    else:
        assert strategy in ("nvrx", "mcore")  # "mcore" when older than Megatron's minimum
    results, calls_queue = compat.async_save_machinery(strategy)
    assert hasattr(results, "_results_queue") and hasattr(calls_queue, "schedule_async_request")
    if has_argument:  # an NVRx older than Megatron's minimum (its check asserts) falls back
        from megatron.core.dist_checkpointing.strategies import nvrx

        def too_old():
            raise AssertionError("Minimum required nvidia-resiliency-ext package version is 0.6.0.")

        monkeypatch.setattr(nvrx, "has_nvrx_async_support", too_old)
        assert compat.async_save_strategy() == "mcore"
        monkeypatch.setattr(nvrx, "has_nvrx_async_support", lambda: True)
        assert compat.async_save_strategy() == "nvrx"
