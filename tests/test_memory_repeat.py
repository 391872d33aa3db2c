"""model.memory_repeat_max: segments written as if repeated m times (a training augmentation).

Independent reference: the same op / model run on an input in which each segment really is
repeated m times in a row. With the linear update the memory after the repeats equals the
memory with the writes multiplied by m, so every segment's first copy reads what the
augmented segment reads. Also: the multipliers' law, training only, TP=2 equals TP=1 (the
ranks draw the same multipliers), config errors.
"""

from __future__ import annotations

import math

import pytest
import torch
from _dist import TOL, run_distributed
from _dist import full_logits as logits
from test_megatron_layer import B, S, VOCAB, build, data
from test_ops import _close, _inputs
from torch.testing import assert_close

from megatron_infini.layers.attention import repeat_multipliers
from megatron_infini.ops import infini_attention, infini_attention_naive


def repeat_segments(x: torch.Tensor, mult: torch.Tensor, n: int):
    """x [s, ...] with segment j (tokens j*n ...) repeated mult[j] times -> (x', index of each
    segment's first copy in x' as a [s] tensor)."""
    parts, first, at = [], [], 0
    for j, m in enumerate(mult.tolist()):
        seg = x[j * n:(j + 1) * n]
        parts.extend([seg] * int(m))
        first.append(torch.arange(at, at + seg.shape[0]))
        at += seg.shape[0] * int(m)
    return torch.cat(parts), torch.cat(first)


@pytest.mark.parametrize("impl", [infini_attention, infini_attention_naive], ids=["fast", "naive"])
@pytest.mark.parametrize("strengths", [False, True], ids=["no-gate", "write-gate"])
def test_multiplied_writes_equal_repeated_segments(impl, strengths):
    s, b, hq, hkv, dk, dv, n = 28, 1, 4, 2, 6, 5, 8  # segments of 8, 8, 8, 4 tokens
    q, k, v, gate, memory = _inputs(s, b, hq, hkv, dk, dv)
    mult = torch.tensor([3.0, 1.0, 5.0, 2.0])
    w = torch.rand(s, b, hkv, generator=torch.Generator().manual_seed(0)) if strengths else torch.ones(s, b, hkv)
    per_token = mult.repeat_interleave(n)[:s].view(s, 1, 1)
    out, (M, z) = impl(q, k, v, gate, segment_length=n, memory=memory, write=w * per_token)
    (q2, k2, v2, w2), first = zip(*(repeat_segments(t, mult, n) for t in (q, k, v, w)))
    out2, (M2, z2) = impl(q2, k2, v2, gate, segment_length=n, memory=memory, write=w2)
    _close(out, out2[first[0]], 1e-5, 1e-5, "out at each segment's first copy")
    _close(M, M2, 1e-4, 1e-5, "M")
    _close(z, z2, 1e-4, 1e-5, "z")


def test_multipliers_law():
    torch.manual_seed(0)
    s, b, n, r = 1000 * 16 + 5, 4, 16, 16
    m = repeat_multipliers(s, b, n, r, torch.device("cpu"))  # [s, b, 1]
    assert m.shape == (s, b, 1) and m.dtype == torch.float32
    assert torch.equal(m, m.round()) and m.min() >= 1 and m.max() <= r
    per_seg = m[::n, :, 0]  # [segments, b]
    assert torch.equal(m[:, :, 0], per_seg.repeat_interleave(n, dim=0)[:s])  # constant within a segment
    for value in (1, 2, r):  # P(m) = log((m + 1) / m) / log(r + 1); 4004 draws, ~4 sigma tolerance
        p = math.log((value + 1) / value) / math.log(r + 1)
        got = (per_seg == value).float().mean().item()
        assert abs(got - p) < 4 * math.sqrt(p * (1 - p) / per_seg.numel()), (value, got, p)
    assert torch.equal(repeat_multipliers(5, 2, 4, 1, torch.device("cpu")), torch.ones(5, 2, 1))


def _check_model_repeats(rank, world_size):
    """Memory in layer 2 over a segment-local layer 1 (the passkey recipe's model): the
    augmented training forward equals the plain model on the repeated input at first copies."""
    from megatron_infini.layers.attention import InfiniCoreAttention

    n, r = 16, 4
    ids, _ = data()
    kw = dict(memory_layers=(2,), memory_write_gate="hard", memory_write_init=0.3)
    aug, plain = build(memory_repeat_max=r, **kw), build(**kw)  # same seed: same parameters
    with torch.no_grad():  # learned, token-dependent strengths (not a constant)
        for name, p in aug.named_parameters():
            if "write_weight" in name:
                full = torch.randn(p.shape[0] * world_size, p.shape[1], generator=torch.Generator().manual_seed(7))
                p.copy_(full[rank * p.shape[0]:(rank + 1) * p.shape[0]] * 0.3)  # this rank's key/value groups
    plain.load_state_dict(aug.state_dict())
    torch.manual_seed(11)
    want_m = repeat_multipliers(S, B, n, r, torch.device("cpu"))[::n, :, 0]  # what the layer will draw
    torch.manual_seed(11)
    got = logits(aug.train(), ids)  # training forward: augmented
    assert sum(isinstance(m, InfiniCoreAttention) and m.gate is not None for m in aug.modules()) == 1
    firsts = []
    for i in range(B):  # one sequence at a time: each has its own multipliers
        rep, first = repeat_segments(ids[i], want_m[:, i], n)
        firsts.append(logits(plain.train(), rep[None])[0, first])
    assert_close(got, torch.stack(firsts), **TOL)
    assert_close(logits(aug.eval(), ids), logits(plain.eval(), ids), **TOL)  # evaluation: unchanged
    assert not torch.allclose(got, logits(plain.train(), ids), **TOL)  # the draw mattered
    return got


def test_model_augmentation_equals_repeated_segments_tp1_and_tp2():
    one = run_distributed(_check_model_repeats, 1)[0]
    two = run_distributed(_check_model_repeats, 2, tp=2)
    assert_close(two[0], one, **TOL)  # both TP ranks drew what one rank draws
    assert_close(two[1], one, **TOL)


def test_config_errors():
    from megatron_infini import llama_config
    from megatron_infini.training.config_checks import ConfigError
    from megatron_infini.training.model_config import ModelConfig

    base = dict(num_layers=2, hidden_size=64, num_attention_heads=4, segment_length=16)
    for bad in (0, 2.5, True):
        with pytest.raises(ValueError, match="memory_repeat_max must be an integer"):
            llama_config(**base, memory_repeat_max=bad)
    with pytest.raises(ValueError, match="linear update only|for the linear update"):
        llama_config(**base, memory_repeat_max=4, memory_update="delta")
    with pytest.raises(ValueError, match="context_parallel_size"):
        llama_config(**base, memory_repeat_max=4, context_parallel_size=2)
    with pytest.raises(ValueError, match="leave it at 1"):
        llama_config(**base, memory_repeat_max=4, memory_type="xl")
    with pytest.raises(ConfigError, match="memory_update=linear"):
        ModelConfig(memory_repeat_max=4, memory_update="delta").validate()
    with pytest.raises(ConfigError, match=">= 1"):
        ModelConfig(memory_repeat_max=0).validate()


def test_trainer_starts_the_augmentation_at_its_step(tmp_path):
    """model.memory_repeat_start: the first update (step 0) is plain in both runs; from step 1
    on the augmented forward gives another loss."""
    from train_utils import train

    base = ["train.steps=2", "model.memory_update=linear", "model.memory_repeat_max=16"]
    late = train(tmp_path / "late", *base, "model.memory_repeat_start=100", nproc=0)
    early = train(tmp_path / "early", *base, "model.memory_repeat_start=1", nproc=0)
    assert late.returncode == 0 and early.returncode == 0, (late.output[-2000:], early.output[-2000:])
    assert early.losses[0] == late.losses[0]
    assert early.losses[1] != late.losses[1]
