"""Why retrieval fails at long inputs: what the memory gives the question to read.

For one passkey prompt, `needle_share` runs the model once over the whole prompt and, for
the last prompt position (the query that must produce the key) of every layer and head,
splits the memory's retrieval weights

    w_t = sigma(q_last) . sigma(k_t)     for every token t stored in the memory
                                         (all tokens before the question's segment)

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


@torch.no_grad()
def needle_share(model, sample: PasskeySample) -> Dict[str, List[List[float]]]:
    """{"share": [layer][head], "gate": [layer][head], "stored": tokens in memory at the question}."""
    from megatron_infini.inference.stream import unwrap
    from megatron_infini.ops._common import sigma
    from megatron_infini.streaming import infini_cores, set_memory_carry

    m = unwrap(model)
    set_memory_carry(m, False)
    cores = list(infini_cores(m))
    captured = []

    def hook(module, args, kwargs):
        captured.append((args[0][-1, 0].float(), args[1][:, 0].float()))  # q_last [h, d], k [s, hkv, d]

    handles = [c.register_forward_pre_hook(hook, with_kwargs=True) for c in cores]
    try:
        ids = torch.tensor([sample.ids], dtype=torch.long)
        pos = torch.arange(ids.shape[1]).unsqueeze(0)
        m(ids, pos, None)
    finally:
        for h in handles:
            h.remove()
    N = cores[0].config.segment_length
    stored = (len(sample.ids) - 1) // N * N  # tokens before the last position's segment
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
    return {"share": shares, "gate": gates, "stored": stored}
