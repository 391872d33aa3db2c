"""Document boundaries of a micro batch (data.packing) against a direct per-token reference and
Megatron's own `_get_ltor_masks_and_position_ids`; the trainer's batch building and loss."""

import numpy as np
import pytest
import torch

from megatron_infini.data.packing import pack_batch

EOS = 2


def _reference(window, eos):
    """One window [s + 1] token by token: (document id of each input, position, loss mask)."""
    inputs = window[:-1].tolist()
    doc, pos, mask = [], [], []
    d, p = 0, 0
    for i, t in enumerate(inputs):
        if i > 0 and inputs[i - 1] == eos:
            d, p = d + 1, 0
        doc.append(d)
        pos.append(p)
        mask.append(0.0 if t == eos else 1.0)
        p += 1
    return doc, pos, mask


def _windows(b, s, seed, eos_rate=0.15):
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(3, 50, (b, s + 1), generator=g)
    tokens[torch.rand(b, s + 1, generator=g) < eos_rate] = EOS
    return tokens


@pytest.mark.parametrize("b, s, seed", [(1, 16, 0), (3, 37, 1), (2, 64, 2)])
def test_pack_batch_matches_a_token_by_token_reference(b, s, seed):
    tokens = _windows(b, s, seed)
    tokens[0, s - 1] = EOS  # an EOS as the last input: the boundary coincides with the window edge
    tokens[-1, 0] = EOS  # and as the first input: a one-token document
    out = pack_batch(tokens, EOS, reset_attention_mask=True, reset_position_ids=True, eod_mask_loss=True)
    assert out.inputs.shape == out.labels.shape == out.position_ids.shape == out.loss_mask.shape == (1, b * s)
    assert torch.equal(out.inputs[0], tokens[:, :-1].reshape(-1))
    assert torch.equal(out.labels[0], tokens[:, 1:].reshape(-1))
    doc_of, positions, masks = [], [], []
    for w in range(b):
        doc, pos, mask = _reference(tokens[w], EOS)
        offset = (max(doc_of) + 1) if doc_of else 0
        doc_of += [d + offset for d in doc]
        positions += pos
        masks += mask
    assert out.position_ids[0].tolist() == positions
    assert out.loss_mask[0].tolist() == masks
    cu = out.cu_seqlens
    assert cu.dtype == torch.int32 and cu[0] == 0 and cu[-1] == b * s
    assert (cu[1:] > cu[:-1]).all()  # no empty documents
    lengths = np.bincount(doc_of)
    assert (cu[1:] - cu[:-1]).tolist() == lengths.tolist()
    assert out.max_seqlen == lengths.max()
    assert set(range(0, b * s, s)) <= set(cu.tolist())  # window edges are boundaries


def test_switches_off_give_todays_batch():
    tokens = _windows(3, 20, 4)
    out = pack_batch(tokens, EOS)
    assert torch.equal(out.inputs, tokens[:, :-1]) and torch.equal(out.labels, tokens[:, 1:])
    assert torch.equal(out.position_ids, torch.arange(20).expand(3, 20))
    assert out.loss_mask is None and out.cu_seqlens is None
    only_pos = pack_batch(tokens, EOS, reset_position_ids=True)
    assert only_pos.inputs.shape == (3, 20) and only_pos.cu_seqlens is None
    with pytest.raises(ValueError, match="tokens must be"):
        pack_batch(tokens[0], EOS)


def test_matches_megatrons_masks_and_positions():
    gpt_dataset = pytest.importorskip("megatron.core.datasets.gpt_dataset")
    ltor = getattr(gpt_dataset, "_get_ltor_masks_and_position_ids", None)
    if ltor is None:
        pytest.skip("this megatron-core has no _get_ltor_masks_and_position_ids")
    tokens = _windows(2, 48, 5)
    out = pack_batch(tokens, EOS, reset_attention_mask=True, reset_position_ids=True, eod_mask_loss=True)
    cu = out.cu_seqlens.tolist()
    for w in range(2):
        mask, loss_mask, pos = ltor(tokens[w, :-1].clone(), EOS, True, True, True, True)
        span = slice(w * 48, (w + 1) * 48)
        assert torch.equal(out.position_ids[0, span], pos)
        assert torch.equal(out.loss_mask[0, span], loss_mask)
        allowed = ~mask[0]  # Megatron: True = masked out
        ours = torch.zeros(48, 48, dtype=torch.bool)  # causal within each of our documents
        for a, e in zip(cu[:-1], cu[1:]):
            a, e = max(a, w * 48) - w * 48, min(e, (w + 1) * 48) - w * 48
            if a < e:
                ours[a:e, a:e] = torch.ones(e - a, e - a).tril().bool()
        assert torch.equal(ours, allowed)


# --------------------------------------------------------------------------- the trainer's batch
def _cp_batches(rank, world_size):
    """Context parallel 2: each rank's block of the packed sequence, and the loss over both."""
    from megatron.core import parallel_state as ps

    from megatron_infini.training.batches import batch_loss, model_kwargs, prepare_batch
    from megatron_infini.training.config import load_config

    # the context-parallel split comes from the group passed to prepare_batch (the config's
    # parallel.context_parallel_size is not read there), so the config here is the single-rank one
    cfg = load_config(None, ["model.segment_length=8", "train.seq_length=32",
                             "data.reset_attention_mask=true", "data.reset_position_ids=true",
                             "data.eod_mask_loss=true"])
    tokens = _windows(3, 32, 7, eos_rate=0.1)  # the same on every rank
    weights = torch.rand(3, 33, generator=torch.Generator().manual_seed(8))
    group = ps.get_context_parallel_group()
    full = prepare_batch(tokens, weights, cfg, EOS, torch.device("cpu"))
    mine = prepare_batch(tokens, weights, cfg, EOS, torch.device("cpu"), group)
    block = slice(rank * 48, (rank + 1) * 48)  # 3 * 32 / 2 tokens, in order
    for name in ("inputs", "labels", "position_ids", "loss_mask"):
        assert torch.equal(getattr(mine, name), getattr(full, name)[:, block]), name
    assert torch.equal(mine.cu_seqlens, full.cu_seqlens)  # global boundaries on every rank
    params = model_kwargs(mine)["packed_seq_params"]
    assert params.qkv_format == "thd" and torch.equal(params.cu_seqlens_q, full.cu_seqlens)
    assert params.max_seqlen_kv == full.max_seqlen
    per_token = (mine.labels.float() + 1).log()  # any per-token "loss"
    loss = batch_loss(per_token, mine.loss_mask, group)
    losses = [torch.empty(()) for _ in range(2)]
    torch.distributed.all_gather(losses, loss.detach(), group=group)
    w, l = full.loss_mask, (full.labels.float() + 1).log()
    want = (w * l).sum() / w.sum()  # the whole sequence's weighted mean
    torch.testing.assert_close(torch.stack(losses).mean(), want)
    assert batch_loss(l, None).item() == pytest.approx(l.mean().item())
    return True


def test_context_parallel_ranks_get_contiguous_blocks_and_global_boundaries():
    from _dist import run_distributed

    assert run_distributed(_cp_batches, 2, tp=1, context_parallel_size=2) == [True, True]
