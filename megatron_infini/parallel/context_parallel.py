"""Context parallelism for Infini-attention: the memory relay.

Each context-parallel (CP) rank holds a contiguous, in-order block of whole segments: rank r
of cp holds tokens [r * s / cp, (r + 1) * s / cp) (not Megatron's load-balanced chunks r and
2cp-1-r). It runs local attention on its own segments and needs only the memory (M, z) left by
the segments of the ranks before it:

- linear update: the state is additive, so rank r starts from the exclusive prefix sum over
  ranks of the memory deltas sigma(K)^T V, sum sigma(K) (`ops.memory_delta`). One all-gather
  of b * hkv * dk * (dv + 1) numbers per layer, after which every rank works in parallel.
  Backward: the gradient w.r.t. rank r's delta is the sum of the gradients w.r.t. the initial
  memory of ranks > r (one more all-gather, reverse exclusive prefix sum).
- delta update: the state is relayed rank to rank in order. Rank r posts the receive of the
  state of rank r-1, computes its local attention meanwhile, waits, runs its memory path and
  sends its final state to rank r+1 (non-blocking). Backward relays the gradient of the state
  from r+1 to r in reverse.

Pipeline bubble of the delta relay: layers pipeline across ranks (rank r runs layer L while
rank r+1 waits for layer L and rank r-1 is at layer L+1), so rank r starts each layer's memory
path about one memory path (plus a message latency) after rank r-1. Per forward pass the last
rank idles about (cp - 1) * (T_mem + latency), where T_mem is one layer's sequential memory
recursion on one rank (local attention, QKV and MLP are not in the critical path: local
attention runs while the state is in flight, sends do not wait for the receiver). Backward has
the same bubble, reversed (rank cp-1 first). The linear rule has no bubble: all ranks meet at
one all-gather, which overlaps the local attention.

Messages pack (M, z) into one tensor [b, hkv, dk, dv + 1] float32 (`pack_memory`). Bytes are
counted by an optional `CommCounter` (what each rank sends: an all-gather of n bytes sends
(cp - 1) * n, as a ring all-gather does).

Legend: s sequence, b batch, hkv key/value heads of this tensor-parallel rank, dk / dv head dims.
With tensor parallelism each TP rank relays the memory of its own heads within its CP group.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple

import torch
import torch.distributed as dist

from megatron_infini.ops import (
    empty_memory, infini_attention, infini_attention_deferred, memory_delta, pack_memory, unpack_memory,
)
from megatron_infini.ops.packed import check_cu_seqlens, check_rank_boundaries, rank_cu_seqlens

Memory = Tuple[torch.Tensor, torch.Tensor]


# --------------------------------------------------------------------------- bookkeeping
@dataclass
class CommCounter:
    """Bytes and messages this rank sent, by kind ("allgather_fwd", "p2p_fwd", ...)."""

    bytes_by_kind: Dict[str, int] = field(default_factory=dict)
    messages: int = 0

    def add(self, kind: str, nbytes: int) -> None:
        self.bytes_by_kind[kind] = self.bytes_by_kind.get(kind, 0) + int(nbytes)
        self.messages += 1

    @property
    def bytes_sent(self) -> int:
        return sum(self.bytes_by_kind.values())

    def reset(self) -> None:
        self.bytes_by_kind.clear()
        self.messages = 0


def contiguous_chunk(seq_length: int, cp_rank: int, cp_size: int, segment_length: Optional[int] = None) -> slice:
    """Tokens [r * s / cp, (r + 1) * s / cp) of context-parallel rank r.

    Raises ValueError unless the sequence splits evenly into whole segments per rank (the
    memory relay hands over the state at a segment boundary)."""
    if seq_length % cp_size:
        raise ValueError(
            f"sequence length {seq_length} does not split evenly over context_parallel_size {cp_size}")
    n = seq_length // cp_size
    if segment_length is not None and n % segment_length:
        raise ValueError(
            f"sequence length {seq_length} over context_parallel_size {cp_size} gives {n} tokens per rank, "
            f"not a multiple of segment_length {segment_length}: each context-parallel rank must hold whole "
            f"segments, so the sequence length must be a multiple of cp * segment_length = {cp_size * segment_length}")
    return slice(cp_rank * n, (cp_rank + 1) * n)


def split_for_context_parallel(t: torch.Tensor, dim: int, cp_group, segment_length: Optional[int] = None) -> torch.Tensor:
    """This rank's contiguous block of `t` along `dim` (e.g. tokens [b, s] with dim=1)."""
    cp, r = dist.get_world_size(cp_group), dist.get_rank(cp_group)
    if cp == 1:
        return t
    chunk = contiguous_chunk(t.shape[dim], r, cp, segment_length)
    return t.narrow(dim, chunk.start, chunk.stop - chunk.start)


def setup_context_parallel(model: torch.nn.Module) -> None:
    """Make a stock `GPTModel` hand the Infini layers its whole RoPE table under context parallelism.

    Megatron's `RotaryEmbedding` slices the table into the load-balanced chunks r and 2cp-1-r;
    Infini layers use in-segment positions 0..N-1 (rows every rank needs), so the slicing is
    turned off. Idempotent; a no-op for models without rotary embeddings.
    """
    for m in model.modules():
        if hasattr(m, "get_rotary_seq_len") and getattr(m, "cp_group", None) is not None:
            m.cp_group = None
            fwd = getattr(type(m), "forward", None)
            if hasattr(fwd, "cache_clear"):  # Megatron memoises the table per (module, length)
                fwd.cache_clear()


def packed_rank_share(cu_seqlens: torch.Tensor, s_local: int, b: int, cp_rank: int, cp_size: int,
                      segment_length: int) -> Tuple[torch.Tensor, List[int]]:
    """A context-parallel rank's share of a packed sequence (global boundaries `cu_seqlens`,
    rank r holding tokens [r * s_local, (r + 1) * s_local)): its own cu_seqlens (int32, on
    cu_seqlens' device) and, per rank, the rank where the document holding that rank's first
    token starts. ValueError when a rank boundary cuts a document mid-segment."""
    cu = check_cu_seqlens(cu_seqlens, s_local * cp_size, b)
    check_rank_boundaries(cu, s_local, cp_size, segment_length)
    first = [rank_cu_seqlens(cu, r * s_local, s_local)[1] // s_local for r in range(cp_size)]
    return rank_cu_seqlens(cu, cp_rank * s_local, s_local)[0].to(cu_seqlens.device), first


# --------------------------------------------------------------------------- autograd pieces
class _ExclusivePrefixSum(torch.autograd.Function):
    """forward: sum of the deltas of ranks first[r] .. r-1 (all-gather already started);
    backward: the gradient w.r.t. this rank's delta is the sum of the gradients of the ranks
    r' > r with first[r'] <= r. `first[r]`: 0 for one sequence; packed documents: the rank
    where the document holding rank r's first token starts (r when one starts there)."""

    @staticmethod
    def forward(ctx, delta, relay, parts, work, first):
        work.wait()
        ctx.relay, ctx.first = relay, first
        r = relay.rank
        out = torch.zeros_like(delta)
        for p in parts[first[r]:r]:
            out = out + p
        return out

    @staticmethod
    def backward(ctx, grad):
        relay = ctx.relay
        parts = relay.all_gather(grad.contiguous(), "allgather_bwd")
        out = torch.zeros_like(grad)
        for r2 in range(relay.rank + 1, relay.size):
            if ctx.first[r2] <= relay.rank:
                out = out + parts[r2]
        return out, None, None, None, None


class _RecvFromPrevious(torch.autograd.Function):
    """forward: the state rank r-1 sent (receive posted earlier); backward: send its gradient
    back to rank r-1. `anchor` (a tensor that requires grad) only ties the node into the graph."""

    @staticmethod
    def forward(ctx, anchor, relay, buf, work):
        work.wait()
        ctx.relay = relay
        return buf

    @staticmethod
    def backward(ctx, grad):
        relay = ctx.relay
        relay.isend(grad.contiguous(), relay.rank - 1, relay.tag_bwd, "p2p_bwd")
        return None, None, None, None


class _SendToNext(torch.autograd.Function):
    """forward: send the final state to rank r+1, pass `out` through; backward: receive the
    gradient of the final state from rank r+1."""

    @staticmethod
    def forward(ctx, out, final, relay):
        relay.isend(final.detach().contiguous(), relay.rank + 1, relay.tag_fwd, "p2p_fwd")
        ctx.relay = relay
        ctx.shape, ctx.dtype = final.shape, final.dtype
        return out.view_as(out)

    @staticmethod
    def backward(ctx, grad_out):
        relay = ctx.relay
        buf = torch.empty(ctx.shape, dtype=ctx.dtype, device=grad_out.device)
        relay.irecv(buf, relay.rank + 1, relay.tag_bwd).wait()
        return grad_out, buf, None


# --------------------------------------------------------------------------- the relay
class MemoryRelay:
    """The memory exchange of one Infini layer over one context-parallel group.

    Owned by `InfiniCoreAttention` (one per layer; `tag` keeps layers' messages apart).
    `attention(q, k, v, gate, ...)` is `ops.infini_attention` over this rank's block with the
    initial memory taken from the ranks before it. `counter` (optional) counts bytes sent.
    """

    def __init__(self, cp_group, tag: int, counter: Optional[CommCounter] = None):
        self.group = cp_group
        self.size = dist.get_world_size(cp_group)
        self.rank = dist.get_rank(cp_group)
        self.tag_fwd, self.tag_bwd = 2 * tag, 2 * tag + 1
        self.counter = counter
        self._pending: List[Tuple[object, torch.Tensor]] = []  # unfinished sends (work, tensor)

    # communication, counted
    def _global(self, group_rank: int) -> int:
        return dist.get_global_rank(self.group, group_rank)

    def isend(self, t: torch.Tensor, dst: int, tag: int, kind: str) -> None:
        if self.counter is not None:
            self.counter.add(kind, t.numel() * t.element_size())
        self._pending.append((dist.isend(t, self._global(dst), group=self.group, tag=tag), t))

    def irecv(self, t: torch.Tensor, src: int, tag: int):
        return dist.irecv(t, self._global(src), group=self.group, tag=tag)

    def all_gather(self, t: torch.Tensor, kind: str, async_op: bool = False):
        parts = [torch.empty_like(t) for _ in range(self.size)]
        if self.counter is not None:
            self.counter.add(kind, (self.size - 1) * t.numel() * t.element_size())
        work = dist.all_gather(parts, t, group=self.group, async_op=async_op)
        return (parts, work) if async_op else parts

    def flush(self) -> None:
        """Wait for this layer's sends still in flight (done lazily, before the next exchange)."""
        for work, _ in self._pending:
            work.wait()
        self._pending.clear()

    # the layer's attention
    def attention(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        gate: torch.Tensor,
        *,
        segment_length: int,
        update: str,
        q_local: Optional[torch.Tensor] = None,
        k_local: Optional[torch.Tensor] = None,
        softmax_scale: Optional[float] = None,
        checkpoint_segments: int = 0,
        cu_seqlens: Optional[torch.Tensor] = None,
    ) -> Tuple[torch.Tensor, Memory]:
        """q [s, b, hq, dk], k [s, b, hkv, dk], v [s, b, hkv, dv]: this rank's block (whole
        segments). Returns out [s, b, hq, dv] and this rank's final memory (M, z).

        cu_seqlens: packed documents, the *global* boundaries [num_docs + 1] of the whole
        packed sequence (every rank gets the same; b = 1). Each rank boundary must be a
        document boundary or a segment boundary of the document it cuts
        (`ops.packed.check_rank_boundaries`); the state is relayed only within a document.
        """
        s, b, hkv, dk = k.shape
        dv = v.shape[-1]
        first = [0] * self.size  # per rank: the rank whose memory its first document continues from (0: all)
        if cu_seqlens is not None:
            cu_seqlens, first = packed_rank_share(cu_seqlens, s, b, self.rank, self.size, segment_length)
        elif s % segment_length:
            raise ValueError(
                f"context-parallel rank {self.rank} holds {s} tokens, not a multiple of segment_length "
                f"{segment_length}: the sequence length must be a multiple of context_parallel_size * "
                f"segment_length = {self.size * segment_length}")
        self.flush()
        if update == "linear":
            # packed: what this rank adds to the memory of the next is its last document's part
            last = 0 if cu_seqlens is None else int(cu_seqlens[-2])
            get_memory = self._start_linear(k[last:], v[last:], first)
        else:
            get_memory = self._start_delta(k, b, hkv, dk, dv, continues=first[self.rank] < self.rank)
        op = dict(segment_length=segment_length, update=update, q_local=q_local, k_local=k_local,
                  softmax_scale=softmax_scale, cu_seqlens=cu_seqlens)
        if checkpoint_segments:
            out, final = infini_attention(q, k, v, gate, memory=get_memory(),
                                          checkpoint_segments=checkpoint_segments, **op)
        else:  # local attention runs while the memory is in flight
            out, final = infini_attention_deferred(q, k, v, gate, get_memory=get_memory, **op)
        if update == "delta" and self.rank < self.size - 1:
            out = _SendToNext.apply(out, pack_memory(*final), self)
        return out, final

    def _start_linear(self, k, v, first):
        delta = pack_memory(*memory_delta(k, v))  # [b, hkv, dk, dv + 1]
        parts, work = self.all_gather(delta.detach(), "allgather_fwd", async_op=True)
        return lambda: unpack_memory(_ExclusivePrefixSum.apply(delta, self, parts, work, first))

    def _start_delta(self, k, b, hkv, dk, dv, continues=True):
        if self.rank == 0:
            return lambda: empty_memory(b, hkv, dk, dv, k.device)
        buf = torch.empty(b, hkv, dk, dv + 1, dtype=torch.float32, device=k.device)
        work = self.irecv(buf, self.rank - 1, self.tag_fwd)
        if not continues:  # packed: a document starts on this rank; the state received belongs to another
            return lambda: unpack_memory(_RecvFromPrevious.apply(k, self, buf, work) * 0.0)
        return lambda: unpack_memory(_RecvFromPrevious.apply(k, self, buf, work))
