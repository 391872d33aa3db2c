"""Compressive Transformer / Transformer-XL attention as a Megatron-core self-attention.

Same layout, constructor and forward signature as `InfiniSelfAttention` (the spec swaps one
for the other by `config.memory_type`): linear_qkv (column-parallel) -> CompressiveCoreAttention
(this rank's heads) -> linear_proj (row-parallel). The op is `megatron_infini.ops.compressive`.

Why memories of keys and values per head (not the paper's hidden activations): under tensor
parallelism the hidden state [s, b, h] is whole on every rank, so a hidden-state memory would
be replicated (b * n * h values per rank), whereas keys and values are split by head:
2 * b * n * (G / tp) * hn per rank, with G key/value heads. This is smaller from tp = 2 on
(or at once with grouped-query attention), it needs no re-projection of the memory with the
current weights at every segment, and the compressor (one per key/value head) is split
across ranks with its heads. The price: memory keys/values are those of the weights at the
time they were written (as in Transformer-XL's cached-key implementations).

Shape legend: s sequence, b batch, np / ng query / key-value heads on this rank, hn head dim,
W = n_cm + n_m memory slots. query [s, b, np, hn]; key, value [s, b, ng, hn]; memory
(k [b, ng, W, hn], v [b, ng, W, hn], valid [b, ng, W] float32); compress_k / compress_v
[ng, c * hn, hn].
"""

from __future__ import annotations

import math
from typing import Optional

import torch
from megatron.core.process_groups_config import ProcessGroupCollection
from megatron.core.tensor_parallel.layers import set_tensor_model_parallel_attributes
from megatron.core.transformer.attention import SelfAttention, SelfAttentionSubmodules
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.transformer_config import TransformerConfig
from megatron.core.transformer.utils import ensure_metadata_has_dp_cp_group, make_sharded_tensors_for_checkpoint
from megatron.core.utils import divide, get_pg_size

from megatron_infini.compat import ensure_cpu_compat, param_device
from megatron_infini.layers.attention import pop_loss_terms, refuse_unsupported_options
from megatron_infini.ops.compressive import (
    compressive_attention,
    empty_compressive_memory,
    mean_pool_compressor,
)

MEMORY_NAMES = ("k", "v", "valid")


class CompressiveCoreAttention(MegatronModule):
    """Core attention over [compressed memory; memory; segment] for this rank's heads.

    Holds the compressor `compress_k` / `compress_v` [ng, c * hn, hn] ("compressive" only; a
    tensor-parallel parameter split along heads, initialised as mean pooling) and, while memory
    carry is on, the memory (k, v, valid) left by the previous forward call
    (`megatron_infini.streaming`). In training mode `reconstruction_loss` holds this rank's
    weighted attention-reconstruction loss of the last forward (with graph; see
    `reconstruction_loss(model)`), `last_reconstruction_loss` its unweighted detached value.
    """

    memory_names = MEMORY_NAMES
    gate = None  # no gate: the trainer's gate statistics skip this layer

    def __init__(
        self,
        config: TransformerConfig,
        layer_number: int,
        attn_mask_type: AttnMaskType,
        attention_type: str = "self",
        cp_comm_type: Optional[str] = None,
        softmax_scale: Optional[float] = None,
        pg_collection: Optional[ProcessGroupCollection] = None,
        memory_type: Optional[str] = None,
    ):
        super().__init__(config=config)
        # memory_type "xl" for a layer of an Infini model: a layer without memory under
        # memory_free_attention="xl" (the spec passes it); otherwise the config's memory_type.
        kind = getattr(config, "memory_type", None) if memory_type is None else memory_type
        if memory_type is not None and memory_type != config.memory_type and not (
                memory_type == "xl" and config.memory_free_xl(layer_number)):
            raise ValueError(f"layer {layer_number}: memory_type {memory_type!r} but config.memory_type is "
                             f"{config.memory_type!r}; build the model with get_gpt_block_infini_spec(config)")
        if kind not in ("compressive", "xl"):
            raise ValueError("CompressiveCoreAttention needs an InfiniTransformerConfig with memory_type "
                             f"'compressive' or 'xl', got {kind!r}")
        if attention_type != "self":
            raise ValueError(f"attention_type must be 'self', got {attention_type!r}")
        if pg_collection is None:
            pg_collection = ProcessGroupCollection.use_mpu_process_groups(required_pgs=["tp", "cp"])
        self.tp_group = pg_collection.tp
        self.tp_size = get_pg_size(self.tp_group)
        if get_pg_size(pg_collection.cp) > 1:
            raise ValueError(f"memory_type={config.memory_type!r} does not support context parallelism")
        self.layer_number = layer_number
        self.num_heads_per_partition = divide(config.num_attention_heads, self.tp_size)
        self.num_groups_per_partition = divide(config.num_query_groups, self.tp_size)
        self.softmax_scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(config.kv_channels)
        self.memory_length = config.xl_memory_length
        self.compressed_length = config.compressed_memory_length if kind == "compressive" else 0
        self.rate = config.compression_rate
        if self.compressed_length:
            hn, ng = config.kv_channels, self.num_groups_per_partition
            for name in ("compress_k", "compress_v"):
                w = mean_pool_compressor(ng, hn, self.rate, config.params_dtype, param_device(config))
                p = torch.nn.Parameter(w)  # [ng, c * hn, hn]
                set_tensor_model_parallel_attributes(p, is_parallel=True, dim=0, stride=1)
                setattr(self, name, p)
        self.carry_memory = False
        self.memory = None
        self.last_memory_stats = None
        self.reconstruction_loss: Optional[torch.Tensor] = None
        self.last_reconstruction_loss: Optional[torch.Tensor] = None

    @property
    def window(self) -> int:
        """W: memory slots per head (compressed + raw)."""
        return self.memory_length + self.compressed_length

    def empty_memory(self, b: int, device=None):
        hn = self.config.kv_channels
        return empty_compressive_memory(b, self.num_groups_per_partition, hn, hn, self.memory_length,
                                        self.compressed_length, self.config.params_dtype, device)

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
        rope_freqs: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        """query [s, b, np, hn], key / value [s, b, ng, hn] without RoPE; rope_freqs [W + N, rot]
        angles of the window slots, or None -> [s, b, np * hn]."""
        if attention_bias is not None or packed_seq_params is not None:
            raise NotImplementedError("compressive / xl attention supports neither attention_bias nor packed sequences")
        s, b = query.shape[:2]
        memory = self.memory if self.carry_memory else None
        if memory is not None and memory[0].shape[0] != b:
            raise ValueError(f"carried memory has batch size {memory[0].shape[0]} but the input has {b}; "
                             "call megatron_infini.streaming.reset_memory(model) between documents")
        compressor = (self.compress_k, self.compress_v) if self.compressed_length else None
        out, memory, aux = compressive_attention(
            query, key, value, compressor, segment_length=self.config.segment_length,
            memory_length=self.memory_length, compressed_memory_length=self.compressed_length,
            compression_rate=self.rate, memory=memory, rope_freqs=rope_freqs, softmax_scale=self.softmax_scale,
        )  # out [s, b, np, hn]
        if self.carry_memory:
            self.memory = tuple(t.detach() for t in memory)
        if self.training and aux is not None:
            # This rank's heads' share of the mean over all heads: the TP ranks' terms sum to it.
            local = aux / self.tp_size
            self.reconstruction_loss = local * self.config.reconstruction_loss_weight
            self.last_reconstruction_loss = local.detach()
        return out.reshape(s, b, -1)  # [s, b, np * hn]

    def sharded_state_dict(self, prefix: str = "", sharded_offsets=(), metadata: Optional[dict] = None):
        """The compressor is split along key/value heads (axis 0) across tensor-parallel ranks."""
        metadata = ensure_metadata_has_dp_cp_group(metadata)
        state_dict = self.state_dict(prefix="", keep_vars=True)
        return make_sharded_tensors_for_checkpoint(
            state_dict, prefix, {"compress_k": 0, "compress_v": 0}, sharded_offsets,
            tp_group=self.tp_group, dp_cp_group=metadata["dp_cp_group"],
        )


class CompressiveSelfAttention(SelfAttention):
    """Megatron `SelfAttention` whose core attention is `CompressiveCoreAttention`.

    Same constructor and forward signature as `InfiniSelfAttention`; the full-sequence path only
    (no KV-cache inference context, no packed sequences): for streaming keep the memory between
    calls (`megatron_infini.streaming.set_memory_carry`).
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
            raise ValueError(f"attn_mask_type must be AttnMaskType.causal, got {attn_mask_type}")
        refuse_unsupported_options(config, submodules, type(self).__name__)
        super().__init__(config=config, submodules=submodules, layer_number=layer_number,
                         attn_mask_type=attn_mask_type, cp_comm_type=cp_comm_type, pg_collection=pg_collection)
        if not isinstance(self.core_attention, CompressiveCoreAttention):
            raise ValueError("submodules.core_attention must be CompressiveCoreAttention")
        self._rope_step: Optional[torch.Tensor] = None  # angles of position 1, from the last table seen

    def window_rope(self, rotary_pos_emb) -> Optional[torch.Tensor]:
        """Angles [W + N, rot] of the window slots, from Megatron's RoPE table [S, 1, 1, rot]
        (angle of position p = p * angle of position 1). A call with S = 1 reuses the angles of
        the last longer call (a stream's one-token steps)."""
        if rotary_pos_emb is None:
            return None
        freqs = rotary_pos_emb[0] if isinstance(rotary_pos_emb, tuple) else rotary_pos_emb
        if freqs.shape[0] >= 2:
            self._rope_step = freqs[1].detach().reshape(-1).float()  # [rot]
        elif self._rope_step is None:
            raise ValueError("compressive / xl attention needs a RoPE table of at least 2 positions in the "
                             "first call (it derives the angles of its window slots from position 1)")
        core = self.core_attention
        n = core.window + self.config.segment_length
        return torch.arange(n, device=freqs.device, dtype=torch.float32)[:, None] * self._rope_step.to(freqs.device)

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
        if inference_context is not None or inference_params is not None or packed_seq_params is not None:
            raise NotImplementedError(
                "CompressiveSelfAttention has no KV-cache inference or packed sequences; for streaming, "
                "use megatron_infini.streaming.set_memory_carry(model, True)")
        if key_value_states is not None:
            raise ValueError("CompressiveSelfAttention is self-attention: key_value_states must be None")
        if self.config.no_rope_freq and self.config.no_rope_freq[self.layer_number - 1]:
            rotary_pos_emb = None
        query, key, value = self.get_query_key_value_tensors(hidden_states)  # [s, b, np|ng, hn]
        core = self.core_attention(query, key, value, attention_mask, attn_mask_type=self.attn_mask_type,
                                   attention_bias=attention_bias, packed_seq_params=None,
                                   rope_freqs=self.window_rope(rotary_pos_emb))  # [s, b, np * hn]
        return self.linear_proj(core)


def compressive_cores(model: torch.nn.Module):
    """The compressive / xl core attentions of `model`, in layer order."""
    cores = [m for m in model.modules() if isinstance(m, CompressiveCoreAttention)]
    return sorted(cores, key=lambda m: m.layer_number)


def reconstruction_loss(model: torch.nn.Module) -> Optional[torch.Tensor]:
    """Sum over layers of this rank's weighted reconstruction loss of the last training forward
    (with graph; add it to the loss before backward: it reaches only the compressors), or None
    when the model has no compressor. Cleared on read, so a loss is never added twice."""
    return pop_loss_terms(compressive_cores(model), "reconstruction_loss")


@torch.no_grad()
def reconstruction_stats(model: torch.nn.Module) -> dict:
    """{"aux/reconstruction_loss": unweighted mean over layers of the last training forward}
    (summed over tensor-parallel ranks), or {} when the model has no compressor."""
    vals = [c.last_reconstruction_loss for c in compressive_cores(model) if c.last_reconstruction_loss is not None]
    if not vals:
        return {}
    total = torch.stack(vals).float().mean()
    tp_group = compressive_cores(model)[0].tp_group
    if get_pg_size(tp_group) > 1:
        torch.distributed.all_reduce(total, group=tp_group)
    return {"aux/reconstruction_loss": total.item()}
