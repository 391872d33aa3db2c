"""Context parallelism for Infini-attention: the memory relay.

Each context-parallel (CP) rank holds a contiguous, in-order block of whole segments (packed
documents: see below): rank r of cp holds tokens [r * s / cp, (r + 1) * s / cp) (not
Megatron's load-balanced chunks r and 2cp-1-r). It runs local attention on its own segments and needs only the memory (M, z) left by
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

Packed documents (`cu_seqlens`, global boundaries, every rank the same; `ops.packed.rank_shares`):
each document is cut into segments from its own first token, so a rank boundary may fall p
tokens (0 < p < N) into a segment of the document it cuts. Those p rows of rank r-1 are its
*tail*: it computes their outputs (local attention among themselves, retrieval from the memory
before their segment) but does not write them to the memory it hands on. It sends their k, v
and k_local (one message [p, b, hkv, 2 dk + dv], at most N-1 rows per layer: flat in length)
to rank r, which puts them before its own rows as its *head*: the segment is whole there, its
rows attend to the head's keys, read the memory received and write head and own rows; the head
rows' outputs are dropped, and their gradients go back to rank r-1 in backward (`_SendTail`,
`_RecvHead`), added to those of its tail. A rank's *memory part*, [r * s - head, (r + 1) * s -
tail), is what it writes for later ranks; the parts cut the sequence into consecutive pieces,
so every token is written once (a rank may receive a head and send a tail, or hold only the
middle of a document). Linear rule: rank r's delta is that of its memory part's last document
(the head included when that document is its first, the tail never), and rank r sums the deltas
of the ranks from the one whose memory part holds its first document's first token (itself,
i.e. nothing, when that document starts in its own memory part, head included). Delta rule: the
state sent is the one before the tail (the rows before the tail run as one call, the tail as a
second short call from that state, its final state kept only as this rank's result), and a
rank whose first document starts in its own memory part drops the state received. Each rank
must hold at least N tokens when a rank boundary cuts a segment (so a segment spans at most two
ranks); ValueError otherwise. Layers without memory exchange the head rows too
(`MemoryRelay.local_attention`).

Messages pack (M, z) into one tensor [b, hkv, dk, dv + 1] float32 (`pack_memory`). Bytes are
counted by an optional `CommCounter` (what each rank sends: an all-gather of n bytes sends
(cp - 1) * n, as a ring all-gather does; "rows_fwd" / "rows_bwd" for a cut segment's rows and
their gradients).

Legend: s sequence (this rank's tokens), b batch, hkv key/value heads of this tensor-parallel
rank, dk / dv head dims, N segment length.
With tensor parallelism each TP rank relays the memory of its own heads within its CP group.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple

import torch
import torch.distributed as dist

from megatron_infini.ops import (
    empty_memory, infini_attention, infini_attention_deferred, local_attention, memory_delta, pack_memory,
    unpack_memory,
)
from megatron_infini.ops.packed import RankShare, check_cu_seqlens, rank_shares

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


def packed_rank_shares(cu_seqlens: torch.Tensor, s_local: int, b: int, cp_size: int,
                       segment_length: int) -> List[RankShare]:
    """What each context-parallel rank computes of a packed sequence (global boundaries
    `cu_seqlens`, rank r holding tokens [r * s_local, (r + 1) * s_local)): `ops.packed.rank_shares`.
    ValueError on bad boundaries, or when a rank boundary cuts a segment and a rank holds fewer
    than segment_length tokens."""
    cu = check_cu_seqlens(cu_seqlens, s_local * cp_size, b)
    return rank_shares(cu, s_local, cp_size, segment_length)


# --------------------------------------------------------------------------- autograd pieces
class _ExclusivePrefixSum(torch.autograd.Function):
    """forward: sum of the deltas of ranks first[r] .. r-1 (all-gather already started);
    backward: the gradient w.r.t. this rank's delta is the sum of the gradients of the ranks
    r' > r with first[r'] <= r. `first[r]`: 0 for one sequence; packed documents: the rank
    whose memory part holds the first token of rank r's first document (r when it starts in
    rank r's own memory part, head included: `ops.packed.RankShare.first`)."""

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
    back to rank r-1. `anchor` (a tensor that requires grad) only ties the node into the graph;
    packed, with a head, it is a head tensor (`_RecvHead`'s output), so the state's gradient is
    sent before the head's, the order in which rank r-1 receives them (backends without tags)."""

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


class _SendTail(torch.autograd.Function):
    """forward: send the last `tail` rows of each of `xs` ([s, b, hkv, d_i], one message
    [tail, b, hkv, sum d_i]) to rank r+1, pass `xs` through; backward: receive the gradients of
    those rows from rank r+1 (where they were its head) and add them to theirs here."""

    @staticmethod
    def forward(ctx, relay, tail, *xs):
        msg = torch.cat([x[-tail:].detach() for x in xs], dim=-1).contiguous()  # [tail, b, hkv, sum d_i]
        relay.isend(msg, relay.rank + 1, relay.tag_rows_fwd, "rows_fwd")
        ctx.relay, ctx.tail, ctx.widths = relay, tail, [x.shape[-1] for x in xs]
        ctx.shape, ctx.dtype, ctx.device = msg.shape, msg.dtype, msg.device
        return tuple(x.view_as(x) for x in xs)

    @staticmethod
    def backward(ctx, *grads):
        relay, t = ctx.relay, ctx.tail
        buf = torch.empty(ctx.shape, dtype=ctx.dtype, device=ctx.device)
        relay.irecv(buf, relay.rank + 1, relay.tag_rows_bwd).wait()
        out = []
        for g, part in zip(grads, buf.split(ctx.widths, dim=-1)):
            g = g.clone()
            g[-t:] += part.to(g.dtype)
            out.append(g)
        return (None, None, *out)


class _RecvHead(torch.autograd.Function):
    """forward: the rows rank r-1 sent (its tail; receive posted earlier), one tensor per width
    [head, b, hkv, d_i]; backward: send their gradients back to rank r-1 in one message.
    `anchor` (a tensor that requires grad) only ties the node into the graph."""

    @staticmethod
    def forward(ctx, anchor, relay, buf, work, widths):
        work.wait()
        ctx.relay = relay
        return tuple(p.clone() for p in buf.split(widths, dim=-1))

    @staticmethod
    def backward(ctx, *grads):
        relay = ctx.relay
        relay.isend(torch.cat(grads, dim=-1).contiguous(), relay.rank - 1, relay.tag_rows_bwd, "rows_bwd")
        return None, None, None, None, None


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
        # state (forward, backward), then the rows of a straddling segment (forward, backward)
        self.tag_fwd, self.tag_bwd, self.tag_rows_fwd, self.tag_rows_bwd = (4 * tag + i for i in range(4))
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
        segments unless packed). Returns out [s, b, hq, dv] and this rank's final memory (M, z)
        (packed: after all of its rows, the tail included).

        cu_seqlens: packed documents, the *global* boundaries [num_docs + 1] of the whole
        packed sequence (every rank gets the same; b = 1). A rank boundary may fall anywhere;
        the rows of a segment it cuts travel to the next rank (module docstring), and the state
        is relayed only within a document.
        """
        s, b, hkv, dk = k.shape
        dv = v.shape[-1]
        self.flush()
        if cu_seqlens is None:
            if s % segment_length:
                raise ValueError(
                    f"context-parallel rank {self.rank} holds {s} tokens, not a multiple of segment_length "
                    f"{segment_length}: the sequence length must be a multiple of context_parallel_size * "
                    f"segment_length = {self.size * segment_length}")
            mine, first = None, [0] * self.size  # per rank: the rank whose memory its first document continues
        else:
            shares = packed_rank_shares(cu_seqlens, s, b, self.size, segment_length)
            mine, first = shares[self.rank], [sh.first for sh in shares]
        same_q, same_k = q_local is None or q_local is q, k_local is None or k_local is k
        q_local = q if q_local is None else q_local
        k_local = k if k_local is None else k_local
        h, t = (0, 0) if mine is None else (mine.head, mine.tail)
        rows = (k, v) if same_k else (k, v, k_local)  # what a straddling segment's rows carry
        if t:  # the last rows: sent to rank r+1 now, their gradients come back in backward
            rows = _SendTail.apply(self, t, *rows)
        head = self._post_head(h, rows) if h else None
        if update == "delta":  # posted after the head's receive: messages from r-1 come in this order
            get_state = self._start_delta(k, b, hkv, dk, dv, continues=first[self.rank] < self.rank)
        if h:  # rank r-1's rows of the straddling segment, put before this rank's own
            head = _RecvHead.apply(k, self, *head)
            rows = tuple(torch.cat([a, x]) for a, x in zip(head, rows))  # [h + s, b, hkv, d]
            pad = q.new_zeros((h,) + tuple(q.shape[1:]))  # queries of the head rows: outputs dropped
            q, q_local = torch.cat([pad, q]), None if same_q else torch.cat([pad.to(q_local.dtype), q_local])
        k, v = rows[0], rows[1]
        k_local = None if same_k else rows[2]
        q_local = None if same_q else q_local
        L = h + s  # rows computed here
        if update == "linear":  # what this rank adds to the memory of the next: its memory part's last document
            mem = L - t
            last = 0 if mine is None else mine.last
            get_memory = self._start_linear(k[last:mem], v[last:mem], first)
        else:
            get_memory = get_state(head[0] if h else k)
        cu_main = None if mine is None else mine.cu_seqlens
        main = L if update == "linear" else L - t  # delta: the tail runs on from the state before it
        if main < L:
            cu_main = torch.tensor([a for a in cu_main.tolist() if a < main] + [main], dtype=torch.int32)

        def part(x, a, c):
            return None if x is None else x[a:c]

        op = dict(segment_length=segment_length, update=update, softmax_scale=softmax_scale)
        args = (q[:main], k[:main], v[:main], gate)
        local = dict(q_local=part(q_local, 0, main), k_local=part(k_local, 0, main), cu_seqlens=cu_main)
        if checkpoint_segments:
            out, final = infini_attention(*args, memory=get_memory(), checkpoint_segments=checkpoint_segments,
                                          **local, **op)
        else:  # local attention runs while the memory is in flight
            out, final = infini_attention_deferred(*args, get_memory=get_memory, **local, **op)
        handed_on = final  # delta: the state before the tail
        if main < L:  # the tail: its own segment here, from the state before it (not handed on)
            out_tail, final = infini_attention(
                q[main:], k[main:], v[main:], gate, memory=None if mine.tail_starts_document else final,
                q_local=part(q_local, main, L), k_local=part(k_local, main, L),
                checkpoint_segments=checkpoint_segments, **op)
            out = torch.cat([out, out_tail])
        out = out[h:]  # [s, b, hq, dv]: the head rows' outputs are rank r-1's
        if update == "delta" and self.rank < self.size - 1:
            out = _SendToNext.apply(out, pack_memory(*handed_on), self)
        return out, final

    def local_attention(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, segment_length: int,
                        softmax_scale: Optional[float] = None,
                        cu_seqlens: Optional[torch.Tensor] = None) -> torch.Tensor:
        """A layer without memory: `ops.local_attention` over this rank's block (q, k, v
        [s, b, h, d] as the local attention reads them, e.g. with in-segment RoPE) -> [s, b, hq, dv].
        Packed (`cu_seqlens` global, b = 1): the rows of a segment that a rank boundary cuts
        travel as in `attention`; no memory."""
        if cu_seqlens is None:
            return local_attention(q, k, v, segment_length, softmax_scale)
        s, b = k.shape[:2]
        self.flush()
        mine = packed_rank_shares(cu_seqlens, s, b, self.size, segment_length)[self.rank]
        h, t = mine.head, mine.tail
        rows = (k, v)
        if t:
            rows = _SendTail.apply(self, t, *rows)
        if h:
            head = _RecvHead.apply(k, self, *self._post_head(h, rows))
            rows = tuple(torch.cat([a, x]) for a, x in zip(head, rows))  # [h + s, b, hkv, d]
            q = torch.cat([q.new_zeros((h,) + tuple(q.shape[1:])), q])
        out = local_attention(q, rows[0], rows[1], segment_length, softmax_scale, cu_seqlens=mine.cu_seqlens)
        return out[h:]  # [s, b, hq, dv]

    def _post_head(self, h: int, rows):
        """Post the receive of rank r-1's tail: `h` rows of each of `rows`' widths, one message."""
        widths = [x.shape[-1] for x in rows]
        x = rows[0]
        buf = torch.empty((h,) + tuple(x.shape[1:-1]) + (sum(widths),), dtype=x.dtype, device=x.device)
        return buf, self.irecv(buf, self.rank - 1, self.tag_rows_fwd), widths

    def _start_linear(self, k, v, first):
        delta = pack_memory(*memory_delta(k, v))  # [b, hkv, dk, dv + 1]
        parts, work = self.all_gather(delta.detach(), "allgather_fwd", async_op=True)
        return lambda: unpack_memory(_ExclusivePrefixSum.apply(delta, self, parts, work, first))

    def _start_delta(self, k, b, hkv, dk, dv, continues=True):
        """Post the receive of rank r-1's state; returns anchor -> get_memory."""
        if self.rank == 0:
            return lambda anchor: (lambda: empty_memory(b, hkv, dk, dv, k.device))
        buf = torch.empty(b, hkv, dk, dv + 1, dtype=torch.float32, device=k.device)
        work = self.irecv(buf, self.rank - 1, self.tag_fwd)
        if not continues:  # packed: a document starts on this rank; the state received belongs to another
            return lambda anchor: (lambda: unpack_memory(_RecvFromPrevious.apply(anchor, self, buf, work) * 0.0))
        return lambda anchor: (lambda: unpack_memory(_RecvFromPrevious.apply(anchor, self, buf, work)))
