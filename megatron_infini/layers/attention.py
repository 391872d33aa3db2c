"""Infini-attention as a Megatron-core self-attention.

Layout (Megatron's, so its tensor parallelism applies unchanged):
    linear_qkv (column-parallel) -> InfiniCoreAttention (this rank's heads) -> linear_proj
    (row-parallel). Each tensor-parallel rank holds the gates of its query heads and the
    memory (M, z) of its key/value heads.

Shape legend (Megatron, sequence first):
    s sequence, b batch, h hidden, np / ng query heads / key-value groups on this rank,
    hn head dim (kv_channels), N segment length.
    hidden_states [s, b, h]; query [s, b, np, hn]; key, value [s, b, ng, hn];
    memory M [b, ng, hn, hn] float32, z [b, ng, hn] float32; output [s, b, h].

Positions: the memory reads q/k *before* RoPE; the local (in-segment) softmax attention reads
q/k rotated with in-segment positions 0..N-1 (docs/infini.md), so no position beyond N is ever
seen, whatever the input length, and a stream cut at segment boundaries sees the same
positions as one long call.
"""

from __future__ import annotations

import math
from typing import Optional, Tuple

import torch
from megatron.core.models.common.embeddings.rope_utils import apply_rotary_pos_emb
from megatron.core.process_groups_config import ProcessGroupCollection
from megatron.core.tensor_parallel.layers import set_tensor_model_parallel_attributes
from megatron.core.transformer.attention import SelfAttention, SelfAttentionSubmodules
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.transformer_config import TransformerConfig
from megatron.core.transformer.utils import (
    ensure_metadata_has_dp_cp_group,
    make_sharded_tensors_for_checkpoint,
)
from megatron.core.utils import divide, get_pg_size

from megatron_infini.compat import ensure_cpu_compat, param_device, unsupported_attention_options
from megatron_infini.ops import infini_attention, local_attention
from megatron_infini.ops.packed import document_positions

Memory = Tuple[torch.Tensor, torch.Tensor]

_REQUIRED_FIELDS = ("segment_length", "memory_update", "gate_init", "checkpoint_segments", "memory_enabled")


class InfiniCoreAttention(MegatronModule):
    """Core attention (Megatron's `core_attention` slot): the op over this rank's heads.

    Holds the per-head gate logits `gate` [np] (a tensor-parallel parameter split along heads;
    absent when `config.memory_enabled` is False or the layer is not in `config.memory_layers`)
    and, while memory carry is on, the memory (M, z) left by the previous forward call (see
    `megatron_infini.streaming`).
    """

    def __init__(
        self,
        config: TransformerConfig,
        layer_number: int,
        attn_mask_type: AttnMaskType,
        attention_type: str = "self",
        cp_comm_type: Optional[str] = None,
        softmax_scale: Optional[float] = None,
        pg_collection: Optional[ProcessGroupCollection] = None,
    ):
        super().__init__(config=config)
        missing = [f for f in _REQUIRED_FIELDS if not hasattr(config, f)]
        if missing:
            raise ValueError(f"InfiniCoreAttention needs an InfiniTransformerConfig; config lacks {missing}")
        if attention_type != "self":
            raise ValueError(f"attention_type must be 'self' for Infini-attention, got {attention_type!r}")
        if getattr(config, "memory_type", "infini") != "infini":
            raise ValueError(f"config.memory_type is {config.memory_type!r}: build the layer with "
                             "get_gpt_block_infini_spec(config) or get_gpt_layer_infini_spec(memory_type=...)")
        if pg_collection is None:
            pg_collection = ProcessGroupCollection.use_mpu_process_groups(required_pgs=["tp", "cp"])
        self.tp_group = pg_collection.tp
        self.cp_group = pg_collection.cp
        self.cp_size = get_pg_size(self.cp_group)
        self.layer_number = layer_number
        tp = get_pg_size(self.tp_group)
        self.num_heads_per_partition = divide(config.num_attention_heads, tp)
        self.num_groups_per_partition = divide(config.num_query_groups, tp)
        self.softmax_scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(config.kv_channels)

        has_memory = config.layer_has_memory(layer_number)
        if getattr(config, "memory_free_attention", "segment") == "xl" and not has_memory:
            raise ValueError(f"layer {layer_number} has no memory and config.memory_free_attention is 'xl': it is a "
                             "Transformer-XL layer; build the model with get_gpt_block_infini_spec(config)")
        if has_memory:
            self.gate = torch.nn.Parameter(
                torch.full((self.num_heads_per_partition,), float(config.gate_init),
                           dtype=config.params_dtype, device=param_device(config))
            )  # [np]
            set_tensor_model_parallel_attributes(self.gate, is_parallel=True, dim=0, stride=1)
            self.gate.infini_gate = True  # for optimizer groups: own lr, no weight decay (docs/infini.md)
        else:
            self.gate = None
        self.write_weight = self.write_bias = None
        self.write_gate = getattr(config, "memory_write_gate", "none")
        if has_memory and self.write_gate != "none":
            # write strength f(u . k + c) per key/value group; u = 0: a constant, which gives the paper's output
            dev, ng = param_device(config), self.num_groups_per_partition
            self.write_weight = torch.nn.Parameter(
                torch.zeros(ng, config.kv_channels, dtype=config.params_dtype, device=dev))  # [ng, hn]
            w0 = float(getattr(config, "memory_write_init", 0.5))  # strength w0 everywhere at the start
            c0 = w0 - 0.5 if self.write_gate == "hard" else math.log(w0 / (1.0 - w0))
            self.write_bias = torch.nn.Parameter(torch.full((ng,), c0, dtype=config.params_dtype, device=dev))  # [ng]
            for p in (self.write_weight, self.write_bias):
                set_tensor_model_parallel_attributes(p, is_parallel=True, dim=0, stride=1)
        self.write_penalty: Optional[torch.Tensor] = None  # memory_write_l1 term of the last training forward
        self.repeat_max = int(getattr(config, "memory_repeat_max", 1))  # the trainer may hold it at 1 (set_memory_repeat)
        self.carry_memory = False
        self.memory: Optional[Memory] = None
        self.last_memory_stats: Optional[torch.Tensor] = None  # set by forwards in training mode (metrics)
        # Context parallelism: this rank holds a contiguous block of the sequence and gets its
        # initial memory from the ranks before it (megatron_infini.parallel); packed documents:
        # also the rows of a segment that the rank boundary cuts (layers without memory too).
        self.cp_relay = None
        if self.cp_size > 1:
            from megatron_infini.parallel.context_parallel import MemoryRelay

            self.cp_relay = MemoryRelay(self.cp_group, tag=layer_number)

    def forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        attention_mask: Optional[torch.Tensor] = None,
        attn_mask_type: Optional[AttnMaskType] = None,
        attention_bias: Optional[torch.Tensor] = None,
        packed_seq_params=None,
        *,
        q_local: Optional[torch.Tensor] = None,
        k_local: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        """query [s, b, np, hn], key / value [s, b, ng, hn] (no RoPE), q_local / k_local the
        same with in-segment RoPE -> [s, b, np * hn]. The mask is not read: attention is causal
        by construction (the spec declares `AttnMaskType.causal`). packed_seq_params: packed
        documents (`packed_cu_seqlens`), b = 1; under context parallelism the global boundaries."""
        if attention_bias is not None:
            raise NotImplementedError("Infini-attention does not support attention_bias")
        cfg = self.config
        s, b = query.shape[:2]
        cu_seqlens = packed_cu_seqlens(packed_seq_params)  # packed documents: [num_docs + 1] or None
        if cu_seqlens is not None:
            self._check_packed()
        if self.cp_size > 1:
            self._check_context_parallel(s, packed=cu_seqlens is not None)
        if self.gate is None:
            local = (query if q_local is None else q_local, key if k_local is None else k_local, value)
            if self.cp_relay is not None:  # packed: the rows of a segment cut by the rank boundary travel
                out = self.cp_relay.local_attention(*local, segment_length=cfg.segment_length,
                                                    softmax_scale=self.softmax_scale, cu_seqlens=cu_seqlens)
            else:
                out = local_attention(*local, cfg.segment_length, self.softmax_scale, cu_seqlens=cu_seqlens)
            # out [s, b, np, hn]
        else:
            memory = self.memory if self.carry_memory else None
            if memory is not None and memory[0].shape[0] != b:
                raise ValueError(
                    f"carried memory has batch size {memory[0].shape[0]} but the input has {b}; "
                    "call megatron_infini.streaming.reset_memory(model) between documents"
                )
            op = dict(segment_length=cfg.segment_length, update=cfg.memory_update, q_local=q_local,
                      k_local=k_local, softmax_scale=self.softmax_scale,
                      checkpoint_segments=cfg.checkpoint_segments)
            if cu_seqlens is not None:
                op["cu_seqlens"] = cu_seqlens
            if self.write_weight is not None:
                op["write"] = self.write_strength(key)  # [s, b, ng]
                lam = getattr(cfg, "memory_write_l1", 0.0)
                if self.training and lam:  # this rank's heads: the TP ranks' terms sum to the global mean
                    self.write_penalty = op["write"].mean() * (lam / get_pg_size(self.tp_group))
            repeat = self.repeat_max
            if self.training and repeat > 1:  # each segment written as if repeated m times (linear update)
                m = repeat_multipliers(s, b, cfg.segment_length, repeat, key.device)  # [s, b, 1]
                op["write"] = m.expand(s, b, key.shape[2]) if op.get("write") is None else op["write"] * m
            if self.cp_relay is not None:  # initial memory from the context-parallel ranks before this one
                out, memory = self.cp_relay.attention(query, key, value, self.gate, **op)
            else:
                out, memory = infini_attention(query, key, value, self.gate, memory=memory, **op)
            # out [s, b, np, hn]
            if self.carry_memory:
                # Kept without graph: gradients never cross a forward call.
                self.memory = (memory[0].detach(), memory[1].detach())
            if self.training:  # for the trainer's metrics: sum of M^2, sum of z, count of z (TP-reduced by the reader)
                M, z = memory[0].detach(), memory[1].detach()
                # the count is made on the device (no host-to-device copy, no stream sync)
                self.last_memory_stats = torch.stack([M.square().sum(), z.sum(), z.new_full((), float(z.numel()))])
        return out.reshape(s, b, -1)  # [s, b, np * hn]

    def write_strength(self, key: torch.Tensor) -> torch.Tensor:
        """key [s, b, ng, hn] (no RoPE) -> write strengths [s, b, ng] float32:
        clamp(1/2 + u . k + c, 0, 1) ("hard") or sigmoid(u . k + c) ("sigmoid")."""
        logit = torch.einsum("sbgd,gd->sbg", key.float(), self.write_weight.float()) + self.write_bias.float()
        if self.write_gate == "hard":
            return (logit + 0.5).clamp(0.0, 1.0)
        return torch.sigmoid(logit)

    def _check_packed(self) -> None:
        """Packed documents: refuse what would mix them (a memory carried across calls, the
        per-segment repeat augmentation whose segments are not the documents' own)."""
        if self.carry_memory:
            raise ValueError(
                "packed sequences (packed_seq_params) with memory carry (megatron_infini.streaming) are not "
                "supported: the carried memory belongs to one document; turn carry off for packed input")
        if self.training and self.repeat_max > 1:
            raise ValueError(
                f"packed sequences (packed_seq_params) with memory_repeat_max {self.repeat_max} > 1 are not "
                "supported: the augmentation draws its multipliers per segment of the unpacked input")

    def _check_context_parallel(self, s: int, packed: bool = False) -> None:
        n = self.config.segment_length
        if self.carry_memory:
            raise ValueError(
                f"memory carry (megatron_infini.streaming) is not supported with context_parallel_size "
                f"{self.cp_size} > 1: the last context-parallel rank holds the final memory; stream with "
                "context_parallel_size 1")
        if self.gate is not None and self.write_weight is not None:
            raise ValueError("memory_write_gate is not supported with context parallelism (the memory relay "
                             "takes no write strengths); use context_parallel_size 1")
        if packed:  # segments are cut per document: the rank boundaries are checked with the documents
            return
        if s % n:
            raise ValueError(
                f"context-parallel rank holds {s} tokens, not a multiple of segment_length {n}: each of the "
                f"{self.cp_size} context-parallel ranks must hold whole segments, so the sequence length "
                f"must be a multiple of context_parallel_size * segment_length = {self.cp_size * n}")

    def sharded_state_dict(self, prefix: str = "", sharded_offsets=(), metadata: Optional[dict] = None):
        """The gate is split along heads (axis 0) across tensor-parallel ranks."""
        metadata = ensure_metadata_has_dp_cp_group(metadata)
        layers = getattr(self.config, "memory_layers", None)
        if layers is not None and sharded_offsets and self.gate is not None:
            # Megatron's TransformerBlock stacks each parameter over all layers along a prepended
            # axis (offset layer - 1 of num_layers); the gate and write parameters exist only in
            # the memory layers, so they are stacked over those: offset = rank among them.
            axis, _, _ = sharded_offsets[0]
            sharded_offsets = ((axis, layers.index(self.layer_number), len(layers)), *sharded_offsets[1:])
        state_dict = self.state_dict(prefix="", keep_vars=True)
        return make_sharded_tensors_for_checkpoint(
            state_dict, prefix, {"gate": 0, "write_weight": 0, "write_bias": 0}, sharded_offsets,
            tp_group=self.tp_group, dp_cp_group=metadata["dp_cp_group"],
        )


def repeat_multipliers(s: int, b: int, segment_length: int, repeat_max: int, device) -> torch.Tensor:
    """Write multipliers [s, b, 1] float32 for `memory_repeat_max`: one integer m in
    1..repeat_max per segment and sequence, P(m) proportional to log((m + 1) / m), from the
    default torch RNG of `device`, repeated over the segment's tokens."""
    n_seg = -(-s // segment_length)
    u = torch.rand(n_seg, b, device=device)
    m = torch.exp(u * math.log(repeat_max + 1)).floor().clamp(1, repeat_max)  # [n_seg, b]
    return m.repeat_interleave(segment_length, dim=0)[:s].unsqueeze(-1)  # [s, b, 1]


def packed_cu_seqlens(packed_seq_params) -> Optional[torch.Tensor]:
    """The document boundaries cu_seqlens [num_docs + 1] of Megatron's `PackedSeqParams`
    (qkv_format "thd", self-attention: cu_seqlens_q == cu_seqlens_kv), or None without packing.
    Raises ValueError for what Infini-attention cannot take (other formats, padded boundaries)."""
    if packed_seq_params is None:
        return None
    p = packed_seq_params
    if getattr(p, "qkv_format", "thd") != "thd":
        raise ValueError(f"packed_seq_params.qkv_format must be 'thd' for Infini-attention, got {p.qkv_format!r}")
    cu, cu_kv = p.cu_seqlens_q, p.cu_seqlens_kv
    if cu is None:
        raise ValueError("packed_seq_params.cu_seqlens_q must be set (int32 [num_docs + 1])")
    if cu_kv is not None and cu_kv is not cu and not torch.equal(cu_kv, cu):
        raise ValueError("packed_seq_params: cu_seqlens_kv must equal cu_seqlens_q (self-attention)")
    for name in ("cu_seqlens_q_padded", "cu_seqlens_kv_padded"):
        padded = getattr(p, name, None)
        if padded is not None and not torch.equal(padded, cu):
            raise ValueError(f"packed_seq_params.{name} differs from cu_seqlens_q: padded documents are not "
                             "supported by Infini-attention")
    return cu


def packed_in_segment_rope(freqs: torch.Tensor, cu_seqlens: torch.Tensor, s: int, segment_length: int,
                           offset: int = 0) -> torch.Tensor:
    """RoPE angles [s, 1, 1, d] for packed documents: each token at its position inside its own
    segment, segments cut from each document's first token (in-document position mod N).

    freqs: Megatron's rotary_pos_emb [S, 1, 1, d] for positions 0..S-1. cu_seqlens: the
    boundaries of the whole packed sequence; this call's tokens are offset .. offset + s - 1
    of it (a context-parallel rank's block).
    """
    total = int(cu_seqlens[-1])
    pos = document_positions(cu_seqlens, total)[offset:offset + s] % segment_length  # [s]
    need = int(pos.max()) + 1
    if freqs.shape[0] < need:
        raise ValueError(f"rotary_pos_emb has {freqs.shape[0]} positions, need at least {need} "
                         "(packed_seq_params.max_seqlen_q too small?)")
    return freqs.index_select(0, pos.to(freqs.device))  # [s, 1, 1, d]


def in_segment_rope(freqs: torch.Tensor, s: int, segment_length: int) -> torch.Tensor:
    """RoPE angles for in-segment positions (t mod N) of t = 0..s-1.

    freqs: Megatron's rotary_pos_emb [S, 1, 1, d] for positions 0..S-1, S >= min(N, s).
    Returns [s, 1, 1, d]: rows 0..N-1 repeated.
    """
    n = min(segment_length, s)
    if freqs.shape[0] < n:
        raise ValueError(f"rotary_pos_emb has {freqs.shape[0]} positions, need at least {n}")
    reps = -(-s // n)
    return freqs[:n].repeat(reps, *([1] * (freqs.dim() - 1)))[:s]  # [s, 1, 1, d]


def refuse_unsupported_options(config: TransformerConfig, submodules: SelfAttentionSubmodules, name: str) -> None:
    """ValueError listing the Megatron self-attention options that `name`'s forward would drop
    (`compat.unsupported_attention_options`); called before Megatron's constructor, which
    refuses some of them itself with a less specific message."""
    problems = unsupported_attention_options(config, submodules)
    if problems:
        raise ValueError(f"{name} does not support these Megatron attention options: " + "; ".join(problems))


class InfiniSelfAttention(SelfAttention):
    """Megatron `SelfAttention` whose core attention is `InfiniCoreAttention`.

    Same constructor as Megatron's; forward keeps Megatron's signature but supports only the
    training / full-sequence path (no KV-cache inference context). Packed documents come as
    Megatron's `PackedSeqParams` (qkv_format "thd", input [s, 1, h]): each document is cut into
    its own segments, starts from an empty memory and sees only itself (docs/model.md). For
    streaming inference keep the memory between calls instead (`megatron_infini.streaming`).
    Megatron's selective "core_attn" recompute does not apply; `config.checkpoint_segments`
    bounds the activation memory of the op instead.
    """

    def __init__(
        self,
        config: TransformerConfig,
        submodules: SelfAttentionSubmodules,
        layer_number: int,
        attn_mask_type: AttnMaskType = AttnMaskType.causal,
        cp_comm_type: Optional[str] = None,
        pg_collection: Optional[ProcessGroupCollection] = None,
        **unused,
    ):
        ensure_cpu_compat()
        if attn_mask_type != AttnMaskType.causal:
            raise ValueError(f"attn_mask_type must be AttnMaskType.causal for Infini-attention, got {attn_mask_type}")
        refuse_unsupported_options(config, submodules, type(self).__name__)
        super().__init__(
            config=config, submodules=submodules, layer_number=layer_number,
            attn_mask_type=attn_mask_type, cp_comm_type=cp_comm_type, pg_collection=pg_collection,
        )
        if not isinstance(self.core_attention, InfiniCoreAttention):
            raise ValueError("submodules.core_attention must be InfiniCoreAttention")

    def forward(
        self,
        hidden_states: torch.Tensor,
        attention_mask: Optional[torch.Tensor],
        key_value_states=None,
        inference_context=None,
        rotary_pos_emb=None,
        rotary_pos_cos=None,
        rotary_pos_sin=None,
        rotary_pos_cos_sin=None,
        attention_bias=None,
        packed_seq_params=None,
        sequence_len_offset=None,
        *,
        inference_params=None,
    ):
        """hidden_states [s, b, h] -> (output [s, b, h], bias [h] or None)."""
        if inference_context is not None or inference_params is not None:
            raise NotImplementedError(
                "InfiniSelfAttention has no KV-cache inference; for streaming, "
                "use megatron_infini.streaming.set_memory_carry(model, True)"
            )
        cu_seqlens = packed_cu_seqlens(packed_seq_params)  # packed documents (qkv_format "thd"), or None
        if key_value_states is not None:
            raise ValueError("InfiniSelfAttention is self-attention: key_value_states must be None")
        if self.config.no_rope_freq and self.config.no_rope_freq[self.layer_number - 1]:
            rotary_pos_emb = None

        query, key, value = self.get_query_key_value_tensors(hidden_states)  # [s, b, np|ng, hn]
        q_local, k_local = query, key
        if rotary_pos_emb is not None:
            q_freqs, k_freqs = rotary_pos_emb if isinstance(rotary_pos_emb, tuple) else (rotary_pos_emb,) * 2
            s, n = query.shape[0], self.config.segment_length
            cp = self.config.context_parallel_size
            if cp > 1 and cu_seqlens is None and q_freqs.shape[0] < s * cp:  # packed: Megatron never slices
                raise ValueError(
                    "context parallelism: rotary_pos_emb holds Megatron's load-balanced slice of the RoPE "
                    "table, but Infini layers need the in-segment positions 0..N-1 on every rank; call "
                    "megatron_infini.parallel.setup_context_parallel(model) after building the GPTModel")
            rope = dict(config=self.config, cp_group=self.pg_collection.cp)
            if cu_seqlens is None:
                q_freqs, k_freqs = in_segment_rope(q_freqs, s, n), in_segment_rope(k_freqs, s, n)
            else:  # positions restart at each document's first token
                same = k_freqs is q_freqs
                offset = s * self.pg_collection.cp.rank() if cp > 1 else 0  # this rank's block
                q_freqs = packed_in_segment_rope(q_freqs, cu_seqlens, s, n, offset)
                k_freqs = q_freqs if same else packed_in_segment_rope(k_freqs, cu_seqlens, s, n, offset)
            q_local = apply_rotary_pos_emb(query, q_freqs, **rope)
            k_local = apply_rotary_pos_emb(key, k_freqs, **rope)

        core = self.core_attention(
            query, key, value, attention_mask, attn_mask_type=self.attn_mask_type,
            attention_bias=attention_bias, packed_seq_params=packed_seq_params, q_local=q_local, k_local=k_local,
        )  # [s, b, np * hn]
        return self.linear_proj(core)


def pop_loss_terms(modules, attr: str) -> Optional[torch.Tensor]:
    """Sum of the per-layer loss terms `module.<attr>` left by the last training forward (with
    graph; add it to the loss before backward), or None when no module has one. Cleared on
    read, so a term is never added twice."""
    terms = []
    for m in modules:
        if getattr(m, attr) is not None:
            terms.append(getattr(m, attr))
            setattr(m, attr, None)
    return torch.stack(terms).sum() if terms else None


def write_penalty(model: torch.nn.Module) -> Optional[torch.Tensor]:
    """Sum over memory layers of this rank's `memory_write_l1` penalty of the last training
    forward (see `pop_loss_terms`)."""
    return pop_loss_terms((m for m in model.modules() if isinstance(m, InfiniCoreAttention)), "write_penalty")


def set_memory_repeat(model: torch.nn.Module, repeat_max: int) -> None:
    """Set the `memory_repeat_max` augmentation of every memory layer (1: off), e.g. to start it
    at a training step (the trainer's `model.memory_repeat_start`)."""
    for m in model.modules():
        if isinstance(m, InfiniCoreAttention):
            m.repeat_max = int(repeat_max)
