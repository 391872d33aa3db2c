"""InfiniTransformerConfig: defaults, validation (ValueError naming the fields), lazy exports."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch.nn.functional as F

BASE = dict(num_layers=2, hidden_size=64, num_attention_heads=4, num_query_groups=2)


def test_defaults_and_llama_config():
    from megatron_infini import InfiniTransformerConfig, llama_config

    cfg = InfiniTransformerConfig(**BASE)
    assert (cfg.segment_length, cfg.memory_update, cfg.gate_init) == (2048, "linear", 0.0)
    assert (cfg.checkpoint_segments, cfg.memory_enabled, cfg.attention_dropout) == (0, True, 0.0)
    assert cfg.kv_channels == 16  # Megatron's resolution still runs
    llama = llama_config(**BASE, segment_length=16, memory_update="delta")
    assert llama.normalization == "RMSNorm" and llama.gated_linear_unit and llama.activation_func is F.silu
    assert not llama.add_bias_linear
    gpt2 = llama_config(**BASE, normalization="LayerNorm", gated_linear_unit=False, activation_func=F.gelu)
    assert gpt2.normalization == "LayerNorm" and not gpt2.gated_linear_unit


@pytest.mark.parametrize(
    "fields, names",
    [
        (dict(segment_length=0), ["segment_length"]),
        (dict(segment_length=2.5), ["segment_length"]),
        (dict(segment_length=True), ["segment_length"]),
        (dict(memory_update="sum"), ["memory_update"]),
        (dict(gate_init=-100.0), ["gate_init"]),
        (dict(gate_init=float("nan")), ["gate_init"]),
        (dict(checkpoint_segments=-1), ["checkpoint_segments"]),
        (dict(memory_enabled="no"), ["memory_enabled"]),
        (dict(attention_dropout=0.1), ["attention_dropout"]),
        (dict(tensor_model_parallel_size=3), ["num_attention_heads", "tensor_model_parallel_size"]),
        (dict(tensor_model_parallel_size=4), ["num_query_groups", "tensor_model_parallel_size"]),
        (dict(pipeline_model_parallel_size=2), ["pipeline_model_parallel_size"]),
        (dict(context_parallel_size=0), ["context_parallel_size"]),
        (dict(context_parallel_size=2, cp_comm_type="p2p"), ["cp_comm_type"]),
        (dict(context_parallel_size=2, memory_update="delta", recompute_granularity="full",
              recompute_method="uniform", recompute_num_layers=1), ["recompute_granularity", "checkpoint_segments"]),
        (dict(attention_output_gate=True), ["attention_output_gate"]),
    ],
)
def test_invalid_fields_raise_value_error_naming_them(fields, names):
    from megatron_infini import InfiniTransformerConfig

    with pytest.raises(ValueError) as err:
        InfiniTransformerConfig(**{**BASE, **fields})
    for name in names:
        assert name in str(err.value)


def test_import_is_cheap_and_silent():
    code = (
        "import sys, megatron_infini as m; "
        "assert 'torch' not in sys.modules and 'megatron' not in sys.modules, 'heavy import'; "
        "assert 'InfiniTransformerConfig' in dir(m)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout == "" and out.stderr == ""
