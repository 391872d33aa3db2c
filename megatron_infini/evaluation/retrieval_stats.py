"""Why retrieval fails at long inputs: what the memory gives the question to read.

For one passkey prompt, `needle_share` runs the model once over the prompt followed by the
answer up to its first key digit (" 73." is " ", "7", "3", "." with the shipped tokenizer, so
the first digit is predicted at the answer's " ", which starts a new segment when the prompt
length is a multiple of the segment length) and, for that position (`reading_position`: the
query that must produce the first digit of the key) in every layer and head, splits the
memory's retrieval weights

    w_t = sigma(q_read) . sigma(k_t)     for every token t stored in the memory
                                         (all tokens before the reading position's segment)

into the needle's tokens and the rest: share = sum_{t in needle} w_t / sum_t w_t. With the
linear update this is exactly the needle's weight in A_mem = sum_t w_t v_t / (sum_t w_t);
with the delta rule the denominator is the same (z sums every key) while M holds corrected
values, so it is the needle's share of the normaliser. With `model.memory_write_gate` the
weights include each token's write strength. The share falling as 1 / (stored
tokens) is the "dilution by the normaliser" hypothesis. Also reports sigmoid(gate) per head.

Legend: s tokens, h heads, d head dim.
"""

from __future__ import annotations

from typing import Dict, List

import torch

from .passkey_data import PasskeySample


def reading_position(sample: PasskeySample, tokenizer) -> tuple:
    """(ids, position): the prompt plus the answer's tokens before its first digit, and the index
    of the position whose next-token prediction is the key's first digit (the last of `ids`)."""
    first = next((i for i, t in enumerate(sample.answer_ids) if tokenizer.decode([t]).strip()[:1].isdigit()), 0)
    ids = list(sample.ids) + list(sample.answer_ids[:first])
    return ids, len(ids) - 1


@torch.no_grad()
def needle_share(model, sample: PasskeySample, tokenizer=None) -> Dict[str, List[List[float]]]:
    """{"share": [layer][head], "gate": [layer][head], "stored": tokens in memory at the reading
    position, "position": that position}. With `tokenizer`, the query is the one that predicts
    the key's first digit (`reading_position`); without, the prompt's last token's."""
    from megatron_infini.inference.stream import unwrap
    from megatron_infini.ops._common import sigma
    from megatron_infini.streaming import infini_cores, set_memory_carry

    m = unwrap(model)
    set_memory_carry(m, False)
    cores = list(infini_cores(m))
    captured = []

    seq, read = reading_position(sample, tokenizer) if tokenizer is not None else (list(sample.ids), len(sample.ids) - 1)

    def hook(module, args, kwargs):
        captured.append((args[0][read, 0].float(), args[1][:, 0].float()))  # q_read [h, d], k [s, hkv, d]

    handles = [c.register_forward_pre_hook(hook, with_kwargs=True) for c in cores]
    try:
        ids = torch.tensor([seq], dtype=torch.long)
        pos = torch.arange(ids.shape[1]).unsqueeze(0)
        m(ids, pos, None)
    finally:
        for h in handles:
            h.remove()
    N = cores[0].config.segment_length
    stored = read // N * N  # tokens before the reading position's segment
    shares, gates = [], []
    for core, (q, k) in zip(cores, captured):
        hq, hkv = q.shape[0], k.shape[1]
        kk = sigma(k[:stored])  # [stored, hkv, d]
        if getattr(core, "write_weight", None) is not None:  # learned write strengths weigh each stored token
            kk = kk * core.write_strength(k[:stored].unsqueeze(1))[:, 0].unsqueeze(-1)
        w = torch.einsum("hd,shd->sh", sigma(q), kk.repeat_interleave(hq // hkv, dim=1))  # [stored, h]
        needle = w[sample.needle_start:min(sample.needle_end, stored)].sum(0)
        shares.append((needle / w.sum(0).clamp(min=1e-30)).tolist() if stored else [0.0] * hq)
        gates.append(torch.sigmoid(core.gate.float()).tolist() if core.gate is not None else [])
    return {"share": shares, "gate": gates, "stored": stored, "position": read}
