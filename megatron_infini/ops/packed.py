"""Packed documents: several documents in one input, each on its own (flash-attn "varlen").

A packed input has batch 1 and `cu_seqlens` (int [num_docs + 1], cu[0] = 0, cu[-1] = s):
document d holds tokens cu[d] .. cu[d+1]-1. Each document is cut into segments from its own
first token, starts from an empty memory and attends only to its own tokens, so the packed
call gives what each document gives when run alone.

The fast op runs packed input in a *padded segment layout*: every document's segments are laid
one after another, each padded to N rows (padding only at the end of a document's last
segment), [n * N, 1, h, d] with n = sum_d ceil(len_d / N). Then every segment holds one
document's tokens from row 0, so the unpacked machinery applies: fused SDPA over the folded
segments, one call per segment-length bucket (padded keys sit after every real query:
causality hides them; `local_attention_buckets`), padded rows write nothing (write strength 0,
or skipped by the delta rule's loop), and the memory restarts at each document's first segment
(`Packing`). No loop over documents.

Context parallelism (`rank_shares`): every rank gets the global boundaries and holds a
contiguous block; a rank boundary may fall anywhere. Where it cuts a segment, the part of that
segment on rank r-1 (its tail) also goes to rank r (its head), so the segment is whole on rank
r (`megatron_infini.parallel.context_parallel` relays the rows and the memory).

Legend: s tokens of the packed input, N segment length, n segments of all documents,
D documents.
"""

from __future__ import annotations

import bisect
from typing import List, NamedTuple, Optional, Tuple

import torch
import torch.nn.functional as F

from .sdpa import sdpa_causal


class Packing(NamedTuple):
    """What the memory path needs of a padded segment layout (or of a block of its segments)."""

    doc_start: torch.Tensor
    """[n] long: each segment's document's first segment; -1 for the segments of the document that
    continues from the memory passed in (the first one)."""
    lengths: Tuple[int, ...]
    """Real (unpadded) rows of each segment."""

    @property
    def resets(self) -> frozenset:
        """Segments where a document starts from an empty memory."""
        return frozenset(j for j, d in enumerate(self.doc_start.tolist()) if d == j)

    def block(self, first: int, count: int) -> "Packing":
        """Segments first .. first + count - 1, counted from `first` (documents started before
        it continue from the memory passed in)."""
        d = self.doc_start[first:first + count]
        return Packing(torch.where(d >= first, d - first, -1), self.lengths[first:first + count])


class PackedLayout(NamedTuple):
    index: torch.Tensor
    """[s] long: the row of each token in the padded layout [n * N]."""
    n: int
    """Segments of all documents."""
    N: int
    """Segment length of the layout: min(segment_length, longest document)."""
    doc_start: torch.Tensor
    """[n] long: each segment's document's first segment; -1 for the first document's segments
    (they start from the op's `memory`, the others from an empty memory)."""
    positions: torch.Tensor
    """[s] long: each token's position inside its document."""
    packing: Packing
    """Per segment: its document's first segment and its real rows."""


def check_cu_seqlens(cu_seqlens, s: int, b: int) -> list:
    """Validate packed-sequence boundaries; return them as a list of ints (one host sync)."""
    if not isinstance(cu_seqlens, torch.Tensor) or cu_seqlens.dim() != 1 or cu_seqlens.numel() < 2 \
            or cu_seqlens.is_floating_point() or cu_seqlens.is_complex():
        got = (f"{cu_seqlens.dtype} {list(cu_seqlens.shape)}" if isinstance(cu_seqlens, torch.Tensor)
               else type(cu_seqlens).__name__)
        raise ValueError(f"cu_seqlens must be a 1-D integer tensor [num_docs + 1], got {got}")
    if b != 1:
        raise ValueError(f"packed input (cu_seqlens given) must have batch size 1, got {b}: "
                         "flatten the batch into one packed sequence")
    cu = cu_seqlens.tolist()
    if cu[0] != 0 or cu[-1] != s:
        raise ValueError(f"cu_seqlens must start at 0 and end at the sequence length {s}, got {cu[0]} .. {cu[-1]}")
    if any(a >= c for a, c in zip(cu, cu[1:])):
        raise ValueError(f"cu_seqlens must be strictly increasing (every document holds a token), got {cu}")
    return cu


def packed_layout(cu_seqlens: torch.Tensor, s: int, b: int, segment_length: int, device=None) -> PackedLayout:
    """The padded segment layout of a packed input of `s` tokens, batch `b` (must be 1; see the
    module docstring). ValueError on bad boundaries."""
    cu = torch.tensor(check_cu_seqlens(cu_seqlens, s, b), dtype=torch.long)  # [D + 1], on the host
    lengths = cu[1:] - cu[:-1]  # [D]
    N = min(segment_length, int(lengths.max()))
    nseg = (lengths + N - 1) // N  # [D] segments per document
    seg_off = torch.cumsum(nseg, 0) - nseg  # [D] first segment of each document
    n = int(nseg.sum())
    D = lengths.numel()
    doc = torch.repeat_interleave(torch.arange(D), lengths, output_size=s)  # [s] document of each token
    pos = torch.arange(s) - cu[doc]  # [s] position inside the document
    index = (seg_off[doc] + pos // N) * N + pos % N  # [s]
    seg_doc = torch.repeat_interleave(torch.arange(D), nseg, output_size=n)  # [n] document of each segment
    doc_start = torch.where(seg_doc == 0, -1, seg_off[seg_doc])  # [n]
    seg_in_doc = torch.arange(n) - seg_off[seg_doc]  # [n]
    lengths = (lengths[seg_doc] - seg_in_doc * N).clamp(max=N)  # [n] real rows of each segment
    doc_start = doc_start.to(device)
    return PackedLayout(index.to(device), n, N, doc_start, pos.to(device),
                        Packing(doc_start, tuple(lengths.tolist())))


def document_positions(cu_seqlens: torch.Tensor, s: int) -> torch.Tensor:
    """[s] long: each token's position inside its document (0 at every document's first token),
    on cu_seqlens' device; e.g. for RoPE that restarts at each document."""
    cu = torch.tensor(check_cu_seqlens(cu_seqlens, s, 1), dtype=torch.long)
    doc = torch.repeat_interleave(torch.arange(cu.numel() - 1), cu[1:] - cu[:-1], output_size=s)
    return (torch.arange(s) - cu[doc]).to(cu_seqlens.device)


def pack(x: torch.Tensor, layout: PackedLayout) -> torch.Tensor:
    """[s, ...] -> [n * N, ...] in the padded layout, zeros on the padding (differentiable)."""
    out = x.new_zeros((layout.n * layout.N,) + tuple(x.shape[1:]))
    return out.index_copy(0, layout.index, x)


def pack_qkv(layout: PackedLayout, q, k, v, q_local, k_local):
    """q, k, v, q_local, k_local [s, 1, h, d] -> the same in the padded layout [n * N, 1, h, d];
    q_local / k_local that are q / k themselves are packed once."""
    pq, pk = pack(q, layout), pack(k, layout)
    return (pq, pk, pack(v, layout), pq if q_local is q else pack(q_local, layout),
            pk if k_local is k else pack(k_local, layout))


def unpack(x: torch.Tensor, layout: PackedLayout) -> torch.Tensor:
    """[n * N, ...] -> [s, ...]: the rows of the real tokens (differentiable)."""
    return x.index_select(0, layout.index)


def write_mask(layout: PackedLayout, write: Optional[torch.Tensor], b: int, hkv: int, device,
               update: str = "linear") -> Optional[torch.Tensor]:
    """Write strengths [n * N, b, hkv] float32 in the padded layout: `write` (or 1) on the real
    tokens, 0 on the padding, so padded rows never reach the memory. None for the delta rule
    without `write`: its per-segment loop reads only the real rows (`Packing.lengths`)."""
    if write is None and update == "delta":
        return None
    if write is None:
        write = torch.ones(layout.index.numel(), b, hkv, dtype=torch.float32, device=device)
    return pack(write.float(), layout)


class RankShare(NamedTuple):
    """What one context-parallel rank computes of a packed input (see `rank_shares`)."""

    cu_seqlens: torch.Tensor
    """int32 [num_docs + 1]: the boundaries of the rank's rows, head included (0 .. head + s_local)."""
    head: int
    """Rows received from rank r-1 and put before the rank's own: the part of a segment that
    straddles their boundary (0: the boundary falls on a segment or document boundary)."""
    tail: int
    """The rank's last rows that rank r+1 prepends (its `head`): they are not written to the
    memory handed on (0: none)."""
    first: int
    """The rank whose memory part holds the first token of the document of the rank's first row
    (the rank itself when that document starts in its memory part: it starts from an empty memory)."""
    last: int
    """Row (head included) where the last document of the rank's memory part starts."""
    tail_starts_document: bool
    """The tail is the start of a document (it continues from no memory of this rank)."""


def rank_shares(cu: list, s_local: int, cp_size: int, segment_length: int) -> List[RankShare]:
    """Context parallelism over a packed input (boundaries `cu`, a list of ints): rank r holds
    tokens [r * s_local, (r + 1) * s_local). Per rank, what it computes (`RankShare`).

    A rank boundary may fall anywhere. Where it falls p tokens (0 < p < N) into a segment of the
    document it cuts, those p rows of rank r-1 are its *tail* and rank r's *head*: rank r-1
    computes their outputs (their segment's rows it holds), rank r prepends them to its own rows
    so that the segment is whole there and writes them to the memory. Rank r's *memory part*,
    the rows whose writes it hands on, is [r * s_local - head, (r + 1) * s_local - tail); the
    memory parts cut [0, s) into consecutive pieces, so every token is written once.
    ValueError when such a boundary exists and a rank holds fewer than segment_length tokens
    (a segment could span three ranks).
    """
    N = segment_length

    def doc_of(t: int) -> int:  # the document holding token t
        return bisect.bisect_right(cu, t) - 1

    cut = [0] * (cp_size + 1)  # cut[r]: rows of rank r-1 handed to rank r
    for r in range(1, cp_size):
        c = r * s_local
        d = doc_of(c)
        cut[r] = (c - cu[d]) % N
        if cut[r] and s_local < N:
            raise ValueError(
                f"packed documents with context parallelism: each context-parallel rank holds {s_local} tokens, "
                f"fewer than segment_length {N}, and the boundary of ranks {r - 1} and {r} (token {c}) falls "
                f"{cut[r]} tokens into a segment of document {d} (tokens {cu[d]}..{cu[d + 1] - 1}); each rank must "
                f"hold at least segment_length tokens when a rank boundary cuts a segment: use a sequence length "
                f"of at least context_parallel_size * segment_length = {cp_size * N}")
    lo = [r * s_local - cut[r] for r in range(cp_size)]  # first row of each rank (head included)
    hi = [(r + 1) * s_local - cut[r + 1] for r in range(cp_size)]  # end of each rank's memory part
    shares = []
    for r in range(cp_size):
        start, stop = lo[r], (r + 1) * s_local
        f = cu[doc_of(start)]  # first token of the document of the first row
        first = r if f >= start else max(i for i in range(r) if lo[i] <= f)
        inner = [a - start for a in cu if start < a < stop]
        last = max(cu[doc_of(hi[r] - 1)], start) - start
        tail = cut[r + 1]
        shares.append(RankShare(torch.tensor([0, *inner, stop - start], dtype=torch.int32), cut[r], tail,
                                first, last, tail > 0 and hi[r] in cu))
    return shares


#: Length buckets of the packed local attention, as fractions of N (see `local_attention_buckets`).
BUCKETS = (0.25, 0.5, 0.75, 1.0)


def local_attention_buckets(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, N: int, scale: Optional[float],
                            lengths: Tuple[int, ...]) -> torch.Tensor:
    """Causal attention inside each segment of the padded layout, a fused call per length bucket.

    q [n * N, 1, hq, dk], k [n * N, 1, hkv, dk], v [n * N, 1, hkv, dv] -> [n, hq, N, dv] (the
    folded layout of `fast.local_attention_folded`), rows past a segment's length zero.
    A document's last segment is usually short; padded to N it would cost a full segment's
    attention, so segments are grouped by length (up to N/4, N/2, 3N/4, N) and each group runs
    cut to its bound.
    """
    n = len(lengths)

    def fold(x):  # [n * N, 1, h, d] -> (n, h, N, d)
        return x.view(n, N, x.shape[2], x.shape[3]).transpose(1, 2)

    qf, kf, vf = fold(q), fold(k), fold(v)
    lens = torch.tensor(lengths)
    parts, order, low = [], [], 0
    for frac in BUCKETS:
        high = max(1, min(N, round(frac * N)))
        idx = ((lens > low) & (lens <= high)).nonzero().flatten()
        low = max(low, high)
        if idx.numel() == 0:
            continue
        if idx.numel() == n and high == N:  # one bucket of whole segments: no gather
            return sdpa_causal(qf, kf, vf, scale)
        sel = idx.to(q.device)
        out = sdpa_causal(*(x.index_select(0, sel)[:, :, :high] for x in (qf, kf, vf)), scale)  # (m, hq, high, dv)
        parts.append(F.pad(out, (0, 0, 0, N - high)))  # (m, hq, N, dv)
        order.append(idx)
    inverse = torch.empty(n, dtype=torch.long)
    inverse[torch.cat(order)] = torch.arange(n)
    return torch.cat(parts).index_select(0, inverse.to(q.device))  # (n, hq, N, dv)
