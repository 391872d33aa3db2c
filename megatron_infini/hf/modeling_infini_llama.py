"""Infini-attention Llama for Hugging Face transformers (`trust_remote_code=True`).

Copied into every model directory written by megatron-infini's `tools/convert_checkpoint.py
to-hf`; needs torch and transformers only. It computes what megatron-infini's model computes
(Munkhdalai et al. 2024, arXiv 2404.07143), per attention layer and head:

    the input is cut into segments of N = config.segment_length tokens (the last may be shorter);
    A_dot = causal softmax attention inside the segment, RoPE with in-segment positions 0..N-1;
    A_mem = sigma(Q) M / (sigma(Q) z + eps)       sigma = ELU + 1, Q without RoPE,
            (M, z) the float32 memory left by the earlier segments (0 at the start);
    A     = sigmoid(beta) A_mem + (1 - sigmoid(beta)) A_dot   (beta: one gate per query head);
    then M, z absorb the segment's keys (without RoPE) and values (linear or delta rule),
    each token weighted by its write strength when config.memory_write_gate is set.
Layers without memory (config.memory_layers, config.memory_enabled) keep A_dot only.

Segments of each row start at its first real token (attention_mask), so left-padded batches
give each row its own result; pad tokens are never written to memory. `position_ids` are not
read: positions follow from the token order. The cache (`InfiniCache`) holds, per layer, the
memory and the keys/values of the current incomplete segment only (< N tokens), so `generate()`
needs constant memory whatever the length; a segment is folded into the memory when it fills.

Legend: b batch, s tokens of this call, S buffer columns (the cached incomplete segment, then
this call's real tokens, padded to a multiple of N), hq / hkv query / key-value heads,
g = hq // hkv, d head dim, H hidden size, V vocabulary.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn
from transformers import GenerationMixin, PreTrainedModel
from transformers.cache_utils import Cache
from transformers.modeling_outputs import CausalLMOutputWithPast

from .configuration_infini_llama import InfiniLlamaConfig

#: Added to the retrieval denominators: an empty memory retrieves exactly 0.
EPS = 1e-6
#: The output field of the cache: "cache" in transformers >= 5.x, "past_key_values" before.
_CACHE_FIELD = "cache" if "cache" in CausalLMOutputWithPast.__dataclass_fields__ else "past_key_values"


def sigma(x: torch.Tensor) -> torch.Tensor:
    """ELU + 1 in float32: the positive feature map of the memory path."""
    return F.elu(x.float()) + 1.0


def rope_table(config: InfiniLlamaConfig, device) -> tuple:
    """(cos, sin) [N, d] float32 for in-segment positions 0..N-1 (Llama 3 scaling if configured)."""
    d = config.head_dim
    inv_freq = 1.0 / (config.rope_theta ** (torch.arange(0, d, 2, dtype=torch.float32, device=device) / d))
    sc = config.llama3_rope_scaling
    if sc:  # Llama 3.x: long wavelengths stretched by `factor`, short ones kept, smooth in between
        ratio = sc["original_max_position_embeddings"] * inv_freq / (2 * math.pi)
        t = ((ratio - sc["low_freq_factor"]) / (sc["high_freq_factor"] - sc["low_freq_factor"])).clamp(0.0, 1.0)
        inv_freq = inv_freq * (t + (1.0 - t) / sc["factor"])
    freqs = torch.outer(torch.arange(config.segment_length, dtype=torch.float32, device=device), inv_freq)
    emb = torch.cat([freqs, freqs], dim=-1)  # [N, d]
    return emb.cos(), emb.sin()


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """RoPE (halves layout): x [b, T, h, d], cos / sin [T, d] or [b, T, d]."""
    cos = cos.to(x.dtype).unsqueeze(-2)  # [(b,) T, 1, d]
    sin = sin.to(x.dtype).unsqueeze(-2)
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat([-x2, x1], dim=-1) * sin


def sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Softmax attention, causal when mask is None: q [B, T, hq, d], k / v [B, S, hkv, d] ->
    [B, T, hq, d]; query head i reads key/value head i // g."""
    g = q.shape[2] // k.shape[2]
    q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # (B, h, T, d)
    k, v = k.repeat_interleave(g, dim=1), v.repeat_interleave(g, dim=1)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None)
    return out.transpose(1, 2)


class Plan:
    """Where the tokens of one forward call go, shared by all layers.

    Each row's real tokens (valid [b, s]) are appended to the incomplete segment the cache holds
    for it (pending [b] tokens), in a buffer of S columns that starts at a segment boundary, so
    column c has in-segment position c % N in every row."""

    def __init__(self, valid: torch.Tensor, pending: torch.Tensor, N: int):
        self.N = N
        length = pending + valid.sum(1)  # [b] buffer tokens of each row
        self.S = max(N, -(-int(length.max()) // N) * N)
        col = pending[:, None] + valid.long().cumsum(1) - 1  # [b, s]
        self.col = torch.where(valid, col, torch.full_like(col, self.S))  # pads go to a dropped column
        columns = torch.arange(self.S, device=valid.device)
        self.pos = columns % N  # [S]
        complete = length // N * N  # tokens in whole segments: these are written to memory
        self.written = columns[None] < complete[:, None]  # [b, S]
        self.tail_start, self.tail = complete, length - complete  # the new incomplete segment

    def scatter(self, new: torch.Tensor, old: Optional[torch.Tensor] = None) -> torch.Tensor:
        """new [b, s, h, d] (+ the cached old [b, P, h, d], zero past each row's length) -> [b, S, h, d]."""
        b, s, h, d = new.shape
        buf = new.new_zeros(b, self.S + 1, h, d)
        if old is not None and old.shape[1]:
            buf[:, :old.shape[1]] = old
        return buf.scatter(1, self.col[:, :, None, None].expand(b, s, h, d), new)[:, :self.S]

    def gather(self, buf: torch.Tensor) -> torch.Tensor:
        """buf [b, S, h, d] -> the columns of this call's tokens [b, s, h, d] (pads: column S - 1)."""
        b, s = self.col.shape
        idx = self.col.clamp(max=self.S - 1)[:, :, None, None].expand(b, s, *buf.shape[2:])
        return buf.gather(1, idx)

    def tail_of(self, buf: torch.Tensor) -> torch.Tensor:
        """The new incomplete segment of each row: buf [b, S, h, d] -> [b, P, h, d], zero-padded."""
        b, P = buf.shape[0], int(self.tail.max())
        j = torch.arange(P, device=buf.device)[None]  # [1, P]
        idx = (self.tail_start[:, None] + j).clamp(max=self.S - 1)  # [b, P]
        out = buf.gather(1, idx[:, :, None, None].expand(b, P, *buf.shape[2:]))
        return out * (j < self.tail[:, None])[:, :, None, None].to(buf.dtype)


class InfiniCache(Cache):
    """Per layer: the memory (M [b, hkv, d, d], z [b, hkv, d], float32) and the keys/values of
    the current incomplete segment (< N tokens, without RoPE): constant size at any length."""

    def __init__(self):
        try:
            super().__init__(layers=[])
        except TypeError:  # older transformers: Cache() takes no layers
            super().__init__()
        self.states: dict = {}
        self.pending: Optional[torch.Tensor] = None  # [b] tokens of each row's incomplete segment
        self.seen = 0

    def get_seq_length(self, layer_idx: int = 0) -> int:
        """Columns (tokens, pads included) read so far."""
        return self.seen

    def numel(self) -> int:
        """Numbers held by the cache (memory and incomplete-segment keys/values of all layers)."""
        return sum(t.numel() for st in self.states.values() for t in st.values())

    def reorder_cache(self, beam_idx: torch.LongTensor):
        """Beam search: keep rows `beam_idx`."""
        self.states = {i: {k: t.index_select(0, beam_idx.to(t.device)) for k, t in st.items()}
                       for i, st in self.states.items()}
        self.pending = self.pending.index_select(0, beam_idx.to(self.pending.device))


class InfiniAttention(nn.Module):
    def __init__(self, config: InfiniLlamaConfig, layer_idx: int):
        super().__init__()
        self.N, self.hq, self.hkv, self.d = (config.segment_length, config.num_attention_heads,
                                             config.num_key_value_heads, config.head_dim)
        self.update = config.memory_update
        H = config.hidden_size
        self.q_proj = nn.Linear(H, self.hq * self.d, bias=False)
        self.k_proj = nn.Linear(H, self.hkv * self.d, bias=False)
        self.v_proj = nn.Linear(H, self.hkv * self.d, bias=False)
        self.o_proj = nn.Linear(self.hq * self.d, H, bias=False)
        self.has_memory = config.layer_has_memory(layer_idx)
        self.write_gate = config.memory_write_gate if self.has_memory else "none"
        if self.has_memory:
            self.infini_gate = nn.Parameter(torch.zeros(self.hq))  # beta [hq]
        if self.write_gate != "none":
            self.infini_write_weight = nn.Parameter(torch.zeros(self.hkv, self.d))  # u [hkv, d]
            self.infini_write_bias = nn.Parameter(torch.zeros(self.hkv))  # c [hkv]

    def forward(self, x: torch.Tensor, plan: Plan, rope: tuple, state: dict) -> tuple:
        """x [b, s, H] -> ([b, s, H], the layer's new cache state)."""
        b, s, _ = x.shape
        q = self.q_proj(x).view(b, s, self.hq, self.d)  # no RoPE: the memory reads these
        k = self.k_proj(x).view(b, s, self.hkv, self.d)
        v = self.v_proj(x).view(b, s, self.hkv, self.d)
        kb, vb = plan.scatter(k, state.get("k")), plan.scatter(v, state.get("v"))  # [b, S, hkv, d]
        cos, sin = rope
        kr = rotate(kb, cos[plan.pos], sin[plan.pos])
        if plan.S == self.N:  # one segment (decoding, short inputs): attend from this call's queries only
            qpos = plan.col.clamp(max=self.N - 1)  # [b, s]
            keys = torch.arange(self.N, device=x.device)
            mask = keys[None, None, :] <= plan.col[:, :, None]  # [b, s, S]; pads (column S) see all
            a_dot = sdpa(rotate(q, cos[qpos], sin[qpos]), kr, vb, mask[:, None])  # [b, s, hq, d]
            queries = [q]
        else:  # whole buffer, segments folded into the batch: one causal attention call
            qb = plan.scatter(q)  # [b, S, hq, d]
            n = plan.S // self.N
            fold = lambda t: t.reshape(b * n, self.N, *t.shape[2:])  # [b, S, h, d] -> [b*n, N, h, d]
            a_dot = sdpa(fold(rotate(qb, cos[plan.pos], sin[plan.pos])), fold(kr), fold(vb))
            a_dot = a_dot.reshape(b, plan.S, self.hq, self.d)  # [b, S, hq, d]
            queries = list(qb.split(self.N, dim=1))
        new_state = {"k": plan.tail_of(kb), "v": plan.tail_of(vb)}
        if self.has_memory:
            a_mem, new_state["M"], new_state["z"] = self.memory(queries, kb, vb, plan, state)
            beta = torch.sigmoid(self.infini_gate.float()).view(1, 1, self.hq, 1)
            a_dot = (beta * a_mem + (1.0 - beta) * a_dot.float()).to(x.dtype)
        if plan.S != self.N:
            a_dot = plan.gather(a_dot)  # [b, s, hq, d]
        return self.o_proj(a_dot.reshape(b, s, self.hq * self.d)), new_state

    def write_strength(self, k: torch.Tensor) -> torch.Tensor:
        """k [b, S, hkv, d] (no RoPE) -> write strengths [b, S, hkv] float32."""
        logit = torch.einsum("bshd,hd->bsh", k.float(), self.infini_write_weight.float())
        logit = logit + self.infini_write_bias.float()
        return (logit + 0.5).clamp(0.0, 1.0) if self.write_gate == "hard" else torch.sigmoid(logit)

    def memory(self, queries: list, kb: torch.Tensor, vb: torch.Tensor, plan: Plan, state: dict) -> tuple:
        """Retrieval for the queries of each buffer segment (list of [b, T, hq, d], no RoPE) from
        the memory before it, then the segment's writes -> (a_mem [b, sum T, hq, d] float32, M, z)."""
        b, g, d, N = kb.shape[0], self.hq // self.hkv, self.d, self.N
        if "M" in state:
            M, z = state["M"], state["z"]
        else:
            M = torch.zeros(b, self.hkv, d, d, dtype=torch.float32, device=kb.device)
            z = torch.zeros(b, self.hkv, d, dtype=torch.float32, device=kb.device)
        w = plan.written.float().unsqueeze(-1)  # [b, S, 1]: whole segments only, never pads
        if self.write_gate != "none":
            w = w * self.write_strength(kb)  # [b, S, hkv]
        out = []
        for i, qs in enumerate(queries):
            T = qs.shape[1]
            sq = sigma(qs).view(b, T, self.hkv, g, d).permute(0, 2, 3, 1, 4)  # (b, hkv, g, T, d)
            num = sq @ M.unsqueeze(2)  # (b, hkv, g, T, d)
            den = sq @ z[:, :, None, :, None]  # (b, hkv, g, T, 1)
            out.append((num / (den + EPS)).permute(0, 3, 1, 2, 4).reshape(b, T, self.hq, d))
            seg = slice(i * N, (i + 1) * N)
            ws = w[:, seg].expand(b, N, self.hkv).permute(0, 2, 1).unsqueeze(-1)  # (b, hkv, N, 1)
            if not bool((ws != 0).any()):
                continue  # nothing of this segment is written (incomplete, or all strengths 0)
            sk = sigma(kb[:, seg]).transpose(1, 2)  # (b, hkv, N, d)
            vs = vb[:, seg].float().transpose(1, 2)  # (b, hkv, N, d)
            if self.update == "delta":  # subtract what the memory already returns for these keys
                vs = vs - (sk @ M) / (sk @ z.unsqueeze(-1) + EPS)
            M = M + (sk * ws).transpose(-1, -2) @ vs  # (b, hkv, d, d)
            z = z + (sk * ws).sum(dim=-2)  # (b, hkv, d)
        return torch.cat(out, dim=1), M, z


class InfiniMLP(nn.Module):
    def __init__(self, config: InfiniLlamaConfig):
        super().__init__()
        H, F_ = config.hidden_size, config.intermediate_size
        self.gate_proj = nn.Linear(H, F_, bias=False)
        self.up_proj = nn.Linear(H, F_, bias=False)
        self.down_proj = nn.Linear(F_, H, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class RMSNorm(nn.Module):
    def __init__(self, size: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.eps = eps

    def forward(self, x):
        return F.rms_norm(x, (x.shape[-1],), self.weight, self.eps)


class InfiniDecoderLayer(nn.Module):
    def __init__(self, config: InfiniLlamaConfig, layer_idx: int):
        super().__init__()
        self.self_attn = InfiniAttention(config, layer_idx)
        self.mlp = InfiniMLP(config)
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(self, x, plan, rope, state):
        a, state = self.self_attn(self.input_layernorm(x), plan, rope, state)
        x = x + a
        return x + self.mlp(self.post_attention_layernorm(x)), state


class InfiniLlamaPreTrainedModel(PreTrainedModel):
    config_class = InfiniLlamaConfig
    base_model_prefix = "model"
    _no_split_modules = ["InfiniDecoderLayer"]

    def _init_weights(self, module):
        std = self.config.initializer_range
        if isinstance(module, (nn.Linear, nn.Embedding)):
            module.weight.data.normal_(0.0, std)
        elif isinstance(module, RMSNorm):
            module.weight.data.fill_(1.0)


class InfiniLlamaModel(InfiniLlamaPreTrainedModel):
    def __init__(self, config: InfiniLlamaConfig):
        super().__init__(config)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(InfiniDecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_init()

    def get_input_embeddings(self):
        return self.embed_tokens

    def set_input_embeddings(self, value):
        self.embed_tokens = value

    def forward(self, input_ids=None, attention_mask=None, cache: Optional[InfiniCache] = None,
                inputs_embeds=None) -> torch.Tensor:
        """-> final-norm hidden states [b, s, H]; `cache` (if given) advances by this call."""
        x = self.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds  # [b, s, H]
        b, s = x.shape[:2]
        valid = (torch.ones(b, s, dtype=torch.bool, device=x.device) if attention_mask is None
                 else attention_mask[:, -s:].to(device=x.device, dtype=torch.bool))  # [b, s]
        cache = InfiniCache() if cache is None else cache
        if cache.pending is not None and cache.pending.shape[0] != b:
            raise ValueError(f"the cache holds {cache.pending.shape[0]} rows but the input has {b}")
        pending = cache.pending if cache.pending is not None else torch.zeros(b, dtype=torch.long, device=x.device)
        plan = Plan(valid, pending.to(x.device), self.config.segment_length)
        rope = rope_table(self.config, x.device)
        for i, layer in enumerate(self.layers):
            x, cache.states[i] = layer(x, plan, rope, cache.states.get(i, {}))
        cache.pending, cache.seen = plan.tail, cache.seen + s
        return self.norm(x)


class InfiniLlamaForCausalLM(InfiniLlamaPreTrainedModel, GenerationMixin):
    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}

    def __init__(self, config: InfiniLlamaConfig):
        super().__init__(config)
        self.model = InfiniLlamaModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def get_input_embeddings(self):
        return self.model.embed_tokens

    def set_input_embeddings(self, value):
        self.model.embed_tokens = value

    def get_output_embeddings(self):
        return self.lm_head

    def set_output_embeddings(self, value):
        self.lm_head = value

    @classmethod
    def _supports_default_dynamic_cache(cls) -> bool:
        return False  # forward makes its own InfiniCache (a DynamicCache would grow with the length)

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, cache=None, past_key_values=None,
                inputs_embeds=None, labels=None, use_cache=None, logits_to_keep=0, return_dict=None, **kwargs):
        """Logits [b, s, V] of one call over any length (segments, memory and all); `labels`
        [b, s] give the mean next-token loss (shifted here, -100 ignored). `position_ids` are not
        read (positions follow from the order of each row's real tokens)."""
        cache = cache if cache is not None else past_key_values
        if cache is not None and not isinstance(cache, InfiniCache):
            raise ValueError(f"cache must be an InfiniCache (the model makes one), got {type(cache).__name__}")
        use_cache = self.config.use_cache if use_cache is None else use_cache
        if cache is None:
            cache = InfiniCache()
        hidden = self.model(input_ids, attention_mask, cache, inputs_embeds)  # [b, s, H]
        if logits_to_keep:
            hidden = hidden[:, -logits_to_keep:]
        logits = self.lm_head(hidden).float()  # [b, s, V]
        loss = None
        if labels is not None:
            loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]),
                                   labels[:, 1:].reshape(-1).to(logits.device), ignore_index=-100)
        out = CausalLMOutputWithPast(loss=loss, logits=logits, **{_CACHE_FIELD: cache if use_cache else None})
        return out if return_dict is not False else out.to_tuple()
