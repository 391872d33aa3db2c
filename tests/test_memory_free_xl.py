"""model.memory_free_attention="xl": the layers without memory are Transformer-XL layers.

Independent reference: Megatron's local spec with a plain SDPA core attention under the mask
"causal, and no further back than W tokens before the query's segment" (full causal attention
when W >= the input). Also: streaming equals one call with the XL window and the Infini
memory carried together, Megatron dist_checkpointing round trip, TP=2 equals TP=1, the
trainer's config checks and resume signature.
"""

from __future__ import annotations

import pytest
import torch
from _dist import TOL, gather_full, run_distributed
from _dist import full_logits as logits
from test_megatron_layer import S, TINY, VOCAB, SDPACoreAttention, build, data
from torch.testing import assert_close

N = TINY["segment_length"]


def window_mask(s: int, segment: int, window: int) -> torch.Tensor:
    """[s, s] bool: query i may read key j when j <= i and j >= (start of i's segment) - window."""
    i = torch.arange(s)[:, None]
    j = torch.arange(s)[None, :]
    return (j <= i) & (j >= (i // segment) * segment - window)


class WindowCoreAttention(SDPACoreAttention):
    """Softmax attention over the whole sequence under `window_mask` (Megatron core-attention API)."""

    window = N

    def mask(self, s: int) -> torch.Tensor:
        return window_mask(s, N, self.window)


def reference(window: int):
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.transformer.transformer_config import TransformerConfig

    from megatron_infini.config import LLAMA_DEFAULTS

    core = type("Core", (WindowCoreAttention,), {"window": window})
    spec = get_gpt_layer_local_spec(normalization="RMSNorm")
    spec.submodules.self_attention.submodules.core_attention = core
    fields = {k: v for k, v in TINY.items() if k != "segment_length"}
    return GPTModel(config=TransformerConfig(**LLAMA_DEFAULTS, **fields, attention_dropout=0.0),
                    transformer_layer_spec=spec, vocab_size=VOCAB, max_sequence_length=S,
                    position_embedding_type="rope", share_embeddings_and_output_weights=False)


def _check_xl_equals_windowed_attention(rank, world_size):
    from megatron_infini.layers.compressive import CompressiveCoreAttention
    from megatron_infini.streaming import infini_cores, set_memory_carry

    ids, _ = data()
    for window in (4, N, S):  # S: every earlier token, i.e. ordinary causal attention
        model = build(memory_enabled=False, memory_free_attention="xl", xl_memory_length=window)
        cores = list(infini_cores(model))
        assert all(isinstance(c, CompressiveCoreAttention) and c.window == window for c in cores)
        ref = reference(window)
        ref.load_state_dict(model.state_dict(), strict=True)  # same parameters, same names
        want = logits(ref, ids)
        assert_close(logits(model, ids), want, **TOL, msg=lambda m: f"window {window}\n{m}")
        set_memory_carry(model, True)  # a stream cut at a segment boundary: the same logits
        assert_close(torch.cat([logits(model, ids[:, :N]), logits(model, ids[:, N:])], dim=1), want, **TOL)
    # the paper's segment-local attention does not see the previous segment: it differs
    seg = build(memory_enabled=False)
    assert not torch.allclose(logits(seg, ids)[:, N:], want[:, N:], **TOL)
    # one layer spec for every layer cannot hold both kinds: refused, pointing at the block spec
    with pytest.raises(ValueError, match="get_gpt_block_infini_spec"):
        build(layer_spec=True, memory_layers=(2,), memory_free_attention="xl")
    return True


def _check_xl_below_the_memory(rank, world_size):
    """memory_layers=(2,): layer 1 Transformer-XL, layer 2 Infini-attention, at this TP size."""
    import tempfile

    from megatron.core import dist_checkpointing

    from megatron_infini.layers.attention import InfiniCoreAttention
    from megatron_infini.layers.compressive import CompressiveCoreAttention
    from megatron_infini.streaming import infini_cores, set_memory_carry

    ids, _ = data()
    fields = dict(memory_layers=(2,), memory_write_gate="hard", memory_write_init=0.1)
    model = build(**fields, memory_free_attention="xl")
    xl, infini = infini_cores(model)
    assert isinstance(xl, CompressiveCoreAttention) and xl.window == N and xl.compressed_length == 0
    assert isinstance(infini, InfiniCoreAttention) and infini.gate is not None
    whole = logits(model, ids)
    segment = build(**fields)  # same seed, same parameters: only layer 1's attention differs
    assert not torch.allclose(whole, logits(segment, ids), **TOL)
    assert_close(whole[:, :N], logits(segment, ids)[:, :N], **TOL)  # the first segment has no past
    set_memory_carry(model, True)  # both kinds of state carried across calls
    assert_close(torch.cat([logits(model, ids[:, :N]), logits(model, ids[:, N:])], dim=1), whole, **TOL)
    assert xl.memory is not None and infini.memory is not None
    set_memory_carry(model, False)
    with tempfile.TemporaryDirectory() as d:  # Megatron dist_checkpointing round trip
        d = [d]
        if torch.distributed.get_world_size() > 1:
            torch.distributed.broadcast_object_list(d, src=0)
        dist_checkpointing.save(model.sharded_state_dict(), d[0])
        other = build(seed=5, **fields, memory_free_attention="xl")
        other.load_state_dict(dist_checkpointing.load(other.sharded_state_dict(), d[0]))
        torch.distributed.barrier()
    assert_close(logits(other, ids), whole, **TOL)
    return {"logits": whole, "params": {n: gather_full(p, p) for n, p in model.named_parameters()}}


def test_xl_layers_equal_attention_over_the_window():
    assert run_distributed(_check_xl_equals_windowed_attention, 1) == [True]


def test_xl_below_the_memory_streams_checkpoints_and_splits_by_tp():
    one = run_distributed(_check_xl_below_the_memory, 1)[0]
    two = run_distributed(_check_xl_below_the_memory, 2, tp=2)
    for res in two:
        assert_close(res["logits"], one["logits"], **TOL)


def test_config_checks():
    from megatron_infini import llama_config
    from megatron_infini.training.config import ConfigError, load_config

    base = dict(TINY, use_cpu_initialization=True)
    with pytest.raises(ValueError, match="has no effect"):
        llama_config(**base, memory_free_attention="xl")
    with pytest.raises(ValueError, match="memory_free_attention must be one of"):
        llama_config(**base, memory_layers=(2,), memory_free_attention="window")
    with pytest.raises(ValueError, match="applies to memory_type='infini'"):
        llama_config(**base, memory_type="xl", memory_free_attention="xl")
    cfg = llama_config(**base, memory_layers=(2,), memory_free_attention="xl")
    assert cfg.xl_memory_length == N and cfg.memory_free_xl(1) and not cfg.memory_free_xl(2)
    from train_utils import DEBUG_CONFIG

    with pytest.raises(ConfigError, match="memory_free_attention"):
        load_config(DEBUG_CONFIG, ["model.memory_free_attention=xl"])
    with pytest.raises(ConfigError, match="memory_free_attention"):
        load_config(DEBUG_CONFIG, ["model.memory_free_attention=sliding"])


def test_trainer_resume_keeps_the_attention_kind(tmp_path):
    """Trained with xl below the memory; resuming it with segment attention is refused."""
    from train_utils import read_metrics, train

    run = tmp_path / "run"
    base = ["train.steps=2", "model.memory_layers=[2]", "checkpoint.save_interval=2"]
    first = train(run, *base, "model.memory_free_attention=xl", nproc=0)
    assert first.returncode == 0, first.output[-3000:]
    assert [r["step"] for r in read_metrics(str(run)) if "loss" in r][-1] == 2
    again = train(run, *base, "train.steps=3", nproc=0)
    assert again.returncode != 0 and "memory_free_attention" in again.output, again.output[-3000:]


def test_flops_count_the_window():
    """Model FLOPs of XL layers: 2 (dk + dv) FLOPs per (query, key) pair the mask allows."""
    from megatron_infini.flops import causal_attention_flops, gpt_model_flops_per_step, window_attention_flops

    b, hq, d = 2, 4, 8
    for s, n, w in ((40, 16, 4), (40, 16, 16), (64, 16, 40), (40, 16, 100), (16, 16, 8)):
        pairs = window_mask(s, n, w).sum().item()
        assert window_attention_flops(s, b, hq, d, d, n, w) == pytest.approx(2.0 * b * hq * pairs * 2 * d)
    assert window_attention_flops(40, b, hq, d, d, 16, 40) == pytest.approx(causal_attention_flops(40, b, hq, d, d))
    shape = dict(num_layers=2, hidden_size=32, ffn_hidden_size=64, num_attention_heads=4, num_query_groups=4,
                 vocab_size=100, seq_length=40, batch=b, segment_length=16, memory_layers=1)
    extra = gpt_model_flops_per_step(**shape, memory_free_window=4) - gpt_model_flops_per_step(**shape)
    assert extra == pytest.approx(3 * (window_attention_flops(40, b, hq, d, d, 16, 4)
                                       - causal_attention_flops(40, b, hq, d, d, 16)))
