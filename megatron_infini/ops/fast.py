"""Fast Infini-attention: all segments at once wherever the math allows.

- Local attention: segments are folded into the batch and run through one fused causal
  `scaled_dot_product_attention` call on a fused kernel, never the math one (`ops/sdpa.py`).
- Memory path in float32 with M and z side by side, Mz = [M | z] (dk x (dv + 1)), so one
  matmul gives a retrieval and its normaliser.
- Linear update: the state before segment j is an exclusive prefix sum (cumsum) over the
  per-segment deltas [sigma(K_i)^T V_i | sum_t sigma(K_i,t)]; no sequential dependency.
- Delta update: the states are built segment by segment (each update reads the state the
  previous one left): a read and a write matmul per step.
- Retrieval and gate read each segment's state. Deltas, delta states and retrieval are
  autograd functions with the chain rule written out that loop over chunks of whole
  segments (one segment for the delta states) sized by CHUNK_ELEMENTS: on CPU every
  temporary stays cache-sized, on GPU a chunk usually holds all segments. Nothing but the
  inputs and the small states is kept for backward (sigma and the reads are recomputed).
  Checked against autograd through the naive loop in tests/test_ops.py.
- Optional activation checkpointing in blocks of segments: only the memory state at block
  boundaries is kept for backward, the rest is recomputed.

Legend: s sequence, b batch, hq / hkv query / key-value heads, g = hq // hkv, dk / dv head
dims, N segment length, n number of segments (the last one zero-padded to N in the
folded layout of the local attention).
"""

from __future__ import annotations

import math
from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable
from torch.utils.checkpoint import checkpoint as _checkpoint

from ._common import EPS, Memory, autocast_off, check_inputs, check_write, empty_memory, pack_memory, unpack_memory
from .packed import local_attention_buckets, pack, pack_qkv, packed_layout, unpack, write_mask
from .sdpa import sdpa_causal


def infini_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    gate: torch.Tensor,
    *,
    segment_length: int,
    update: str = "linear",
    memory: Optional[Memory] = None,
    q_local: Optional[torch.Tensor] = None,
    k_local: Optional[torch.Tensor] = None,
    softmax_scale: Optional[float] = None,
    eps: float = EPS,
    checkpoint_segments: int = 0,
    write: Optional[torch.Tensor] = None,
    cu_seqlens: Optional[torch.Tensor] = None,
) -> Tuple[torch.Tensor, Memory]:
    """Infini-attention over a sequence cut into segments of `segment_length`.

    Args:
        q: [s, b, hq, dk] queries (no RoPE: the memory reads them), any float dtype.
        k: [s, b, hkv, dk] keys (no RoPE), hq % hkv == 0.
        v: [s, b, hkv, dv] values.
        gate: [hq] gate logits beta; output = sigmoid(beta) * A_mem + (1 - sigmoid(beta)) * A_dot.
        segment_length: N >= 1; the last segment may be shorter.
        update: "linear" or "delta" memory update.
        memory: None (empty) or (M [b, hkv, dk, dv], z [b, hkv, dk]) float32, the state left
            by earlier segments.
        q_local, k_local: optional tensors shaped like q / k used only by the local softmax
            attention (e.g. RoPE-rotated with in-segment positions). Default q / k.
        softmax_scale: local attention scale, default 1/sqrt(dk).
        eps: added to the retrieval denominators (an empty memory retrieves exactly 0).
        checkpoint_segments: 0 keeps all activations; k > 0 recomputes them in backward,
            in blocks of k segments, keeping only the memory state between blocks.
        write: optional write strengths [s, b, hkv] (e.g. in (0, 1)): token t enters the
            memory with weight w_t, M += w_t sigma(k_t)^T (v_t or its delta correction) and
            z += w_t sigma(k_t). None: every token with weight 1 (the paper). A constant w
            gives the same output as None (M and z scale together).
        cu_seqlens: optional packed documents (flash-attn varlen convention), int
            [num_docs + 1] with cu[0] = 0, cu[-1] = s, strictly increasing; batch b must be 1.
            Each document is cut into segments from its own first token, attends only to its
            own tokens and starts from an empty memory (the first document from `memory`), so
            the output equals each document run alone (`ops.packed`). None: one sequence.

    Returns:
        out [s, b, hq, dv] in q's dtype, and the memory (M, z) after the last segment, float32
        (packed: the memory of the last document, [1, ...]: what a continuation of that
        document would start from).
        Calling the op on consecutive chunks (cut at segment boundaries) passing the memory
        along gives the same result as one call on the whole input.
    """
    s, b, hq, hkv, dk, dv = check_inputs(q, k, v, gate, segment_length, update, memory, q_local, k_local)
    check_write(write, s, b, hkv)
    if isinstance(checkpoint_segments, bool) or not isinstance(checkpoint_segments, int) or checkpoint_segments < 0:
        raise ValueError(f"checkpoint_segments must be an integer >= 0, got {checkpoint_segments!r}")
    scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(dk)
    q_local = q if q_local is None else q_local
    k_local = k if k_local is None else k_local
    if memory is None:
        memory = empty_memory(b, hkv, dk, dv, q.device)
    M, z = memory
    if cu_seqlens is None:
        return _blocks(q, k, v, gate, q_local, k_local, M, z, segment_length, update, scale, eps, write,
                       checkpoint_segments, None)
    # packed documents: run in the padded segment layout [n * N, 1, ...], memory restarting per document
    layout = packed_layout(cu_seqlens, s, b, segment_length, q.device)
    write = write_mask(layout, write, b, hkv, q.device, update)  # [n * N, 1, hkv]; 0 on the padding
    q, k, v, q_local, k_local = pack_qkv(layout, q, k, v, q_local, k_local)  # [n * N, 1, h, d]
    out, memory = _blocks(q, k, v, gate, q_local, k_local, M, z, layout.N, update, scale, eps, write,
                          checkpoint_segments, layout.packing)
    return unpack(out, layout), memory


def _blocks(q, k, v, gate, q_local, k_local, M, z, N, update, scale, eps, write, checkpoint_segments, packing):
    """The op, in blocks of `checkpoint_segments` segments recomputed in backward when > 0."""
    s = q.shape[0]
    block = checkpoint_segments * N
    if block == 0 or not torch.is_grad_enabled():
        return _forward(q, k, v, gate, q_local, k_local, M, z, N, update, scale, eps, write=write, packing=packing)

    outs = []
    # split, not slicing: slicing's backward writes each block's gradient into a zero tensor of the full length
    writes = write.split(block) if write is not None else [None] * -(-s // block)
    for i, (qb, kb, vb, qlb, klb, wb) in enumerate(zip(*(x.split(block) for x in (q, k, v, q_local, k_local)),
                                                       writes)):
        part = None if packing is None else packing.block(i * checkpoint_segments, checkpoint_segments)
        out, M, z = _checkpoint(
            _forward_flat, qb, kb, vb, gate, qlb, klb, M, z, N, update, scale, eps, None, wb, part,
            use_reentrant=False,
        )
        outs.append(out)
    return torch.cat(outs, dim=0), (M, z)


def _forward_flat(*args):
    out, (M, z) = _forward(*args)
    return out, M, z


def _fold(x: torch.Tensor, n: int, N: int) -> torch.Tensor:
    """[s, b, h, d] -> [b*n, h, N, d]: segments folded into the batch (the last one zero-padded)."""
    s, b, h, d = x.shape
    if n * N != s:
        x = F.pad(x, (0, 0, 0, 0, 0, 0, 0, n * N - s))  # [n*N, b, h, d]; the pad comes last
    return x.view(n, N, b, h, d).permute(2, 0, 3, 1, 4).reshape(b * n, h, N, d)


def _unfold(x: torch.Tensor, s: int, b: int) -> torch.Tensor:
    """[b*n, h, N, d] -> [s, b, h, d] (drops the padding)."""
    bn, h, N, d = x.shape
    n = bn // b
    return x.view(b, n, h, N, d).permute(1, 3, 0, 2, 4).reshape(n * N, b, h, d)[:s]


def local_attention_folded(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, segment_length: int, scale: Optional[float] = None
) -> torch.Tensor:
    """Causal attention inside each segment, segments folded into the batch: one fused call.

    q [s, b, hq, dk], k [s, b, hkv, dk], v [s, b, hkv, dv] -> [b*n, hq, N, dv] with
    N = min(segment_length, s) and n = ceil(s / N); rows past s are padding.
    """
    s = q.shape[0]
    N = min(segment_length, s)
    n = -(-s // N)
    # Zero-padded keys sit after every real query of the last segment, so causality hides them.
    # A fused kernel always (ops.sdpa): k/v heads expanded where the kernel cannot take GQA.
    return sdpa_causal(_fold(q, n, N), _fold(k, n, N), _fold(v, n, N), scale)


def local_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, segment_length: int, scale: Optional[float] = None,
    *, cu_seqlens: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Causal softmax attention inside each segment, all segments in one fused call.

    q [s, b, hq, dk], k [s, b, hkv, dk], v [s, b, hkv, dv] -> [s, b, hq, dv] in q's dtype.
    cu_seqlens: optional packed documents as in `infini_attention` (b = 1): segments are cut
    from each document's first token and never cross a document boundary.
    """
    if cu_seqlens is None:
        return _unfold(local_attention_folded(q, k, v, segment_length, scale), q.shape[0], q.shape[1])
    layout = packed_layout(cu_seqlens, q.shape[0], q.shape[1], segment_length, q.device)
    out = local_attention_buckets(pack(q, layout), pack(k, layout), pack(v, layout), layout.N, scale,
                                  layout.packing.lengths)  # [n, hq, N, dv]
    return unpack(_unfold(out, layout.n * layout.N, 1), layout)  # [s, 1, hq, dv]


#: Elements per temporary of the per-chunk loops: about 2 MB of float32 on CPU, so each chunk's
#: work stays in cache (measured: tools/bench_attention.py); elsewhere 128 MB, plenty of work
#: per kernel launch while bounding the transient memory.
CHUNK_ELEMENTS = {"cpu": 1 << 19}
CHUNK_ELEMENTS_DEFAULT = 1 << 25


def _segments(s: int, N: int, packing=None):
    """(index, start, length) of each segment; the last one may be shorter. Packed (padded
    layout): each segment's real rows only."""
    if packing is not None:
        return [(j, j * N, T) for j, T in enumerate(packing.lengths)]
    return [(j, start, min(N, s - start)) for j, start in enumerate(range(0, s, N))]


def _chunks(x: torch.Tensor, N: int):
    """Runs of whole segments of x [s, b, h, d] sized to CHUNK_ELEMENTS, and a short last
    segment on its own: (first segment, segments C, segment length T, first row)."""
    s, b, h, d = x.shape
    limit = CHUNK_ELEMENTS.get(x.device.type, CHUNK_ELEMENTS_DEFAULT)
    C = max(1, limit // (N * b * h * d))
    full = s // N
    out = [(j, min(C, full - j), N, j * N) for j in range(0, full, C)]
    if s % N:
        out.append((full, 1, s % N, full * N))
    return out


def _chunk_heads(x: torch.Tensor, start: int, C: int, T: int) -> torch.Tensor:
    """Rows [start, start + C*T) of [s, b, h, d] as a (b, h, C, T, d) view: C segments of T."""
    return x[start:start + C * T].unflatten(0, (C, T)).permute(2, 3, 0, 1, 4)


def _heads(x: torch.Tensor, start: int, T: int) -> torch.Tensor:
    """Rows [start, start+T) of [s, b, h, d] as a (b, h, T, d) view (no copy)."""
    return x[start:start + T].permute(1, 2, 0, 3)


def _sigma_(x: torch.Tensor) -> torch.Tensor:
    """sigma(x) = ELU(x) + 1 = max(x, 0) + exp(min(x, 0)) in float32, without autograd.

    Written so because torch's CPU ELU kernel is not vectorised (6x slower than exp here).
    The backwards below use its derivative min(sigma(x), 1): 1 for x > 0, exp(x) otherwise.
    """
    x = x.float()
    return torch.relu(x).add_(x.clamp(max=0.0).exp_())


def _per_query_head(Mz: torch.Tensor, g: int) -> torch.Tensor:
    """(b, hkv, ...) -> (b, hkv * g, ...): each key/value head's memory for its g query heads."""
    if g == 1:
        return Mz
    b, hkv, *rest = Mz.shape
    return Mz.unsqueeze(2).expand(b, hkv, g, *rest).reshape(b, hkv * g, *rest)


class _LinearDeltas(torch.autograd.Function):
    """Per-segment memory deltas of the linear rule, M and z side by side:
    dMz[j] = [sigma(K_j)^T V_j | sum_t sigma(K_j,t)]  (n, b, hkv, dk, dv + 1), float32.

    A chunk of segments at a time in forward and backward, so every temporary is cache-sized
    and nothing but k and v is kept for backward (sigma(K_j) is recomputed).
    """

    @staticmethod
    @autocast_off
    def forward(ctx, k, v, N):
        s, b, hkv, dk = k.shape
        dv = v.shape[3]
        dMz = torch.empty(-(-s // N), b, hkv, dk, dv + 1, dtype=torch.float32, device=k.device)
        for j, C, T, start in _chunks(k, N):
            sk = _sigma_(_chunk_heads(k, start, C, T))  # (b, hkv, C, T, dk)
            dMz[j:j + C, ..., :dv] = (sk.transpose(-1, -2) @ _chunk_heads(v, start, C, T).float()).permute(2, 0, 1, 3, 4)
            dMz[j:j + C, ..., dv] = sk.sum(dim=-2).permute(2, 0, 1, 3)
        ctx.save_for_backward(k, v)
        ctx.N = N
        return dMz

    @staticmethod
    @once_differentiable
    @autocast_off
    def backward(ctx, grad):
        k, v = ctx.saved_tensors
        dv = v.shape[3]
        grad_k = torch.empty(k.shape, dtype=k.dtype, device=k.device)
        grad_v = torch.empty(v.shape, dtype=v.dtype, device=v.device)
        for j, C, T, start in _chunks(k, ctx.N):
            sk = _sigma_(_chunk_heads(k, start, C, T))  # (b, hkv, C, T, dk)
            G = grad[j:j + C].permute(1, 2, 0, 3, 4)  # (b, hkv, C, dk, dv + 1)
            gM, gz = G[..., :dv], G[..., dv:]
            g_sk = _chunk_heads(v, start, C, T).float() @ gM.transpose(-1, -2) + gz.transpose(-1, -2)  # (b, hkv, C, T, dk)
            _chunk_heads(grad_v, start, C, T).copy_(sk @ gM)
            _chunk_heads(grad_k, start, C, T).copy_(g_sk.mul_(sk.clamp_(max=1.0)))  # sigma'(k) = min(sigma(k), 1)
        return grad_k, grad_v, None


class _DeltaStates(torch.autograd.Function):
    """The delta rule's memory states, M and z side by side: Mz[0] = Mz0 and

        Mz[j + 1] = Mz[j] + [sigma(K_j)^T (V_j - sigma(K_j) M_j / (sigma(K_j) z_j + eps)) | sum_t sigma(K_j,t)]

    k [s, b, hkv, dk], v [s, b, hkv, dv], Mz0 (b, hkv, dk, dv + 1) float32 ->
    (n + 1, b, hkv, dk, dv + 1) float32. `packing` (packed documents, `ops.packed.Packing`):
    Mz[j] = 0 where segment j starts a document (Mz0 then unused), and only each segment's
    real rows are read. Sequential over segments (each update reads the state
    the previous one left); the backward walks the segments in reverse with the chain rule
    written out, recomputing each segment's read from the saved states, so the temporaries
    are a segment's worth and autograd keeps no per-segment graph.
    """

    @staticmethod
    @autocast_off
    def forward(ctx, k, v, Mz0, w, N, eps, packing=None):
        s, b, hkv, dk = k.shape
        dv = v.shape[3]
        segs = _segments(s, N, packing)
        resets = frozenset() if packing is None else packing.resets
        states = torch.empty(len(segs) + 1, b, hkv, dk, dv + 1, dtype=torch.float32, device=k.device)
        states[0] = Mz0
        for j, start, T in segs:
            if j in resets:  # a document starts here: from an empty memory
                states[j].zero_()
            sk = _sigma_(_heads(k, start, T))  # (b, hkv, T, dk)
            u = _delta_values(sk @ states[j], _heads(v, start, T), eps)
            if w is not None:  # write strengths scale the rows written
                u.mul_(_heads(w, start, T))
            states[j + 1] = states[j] + sk.transpose(-1, -2) @ u
        ctx.save_for_backward(k, v, states, w)
        ctx.N, ctx.eps, ctx.resets, ctx.packing = N, eps, resets, packing
        return states

    @staticmethod
    @once_differentiable
    @autocast_off
    def backward(ctx, grad_states):
        k, v, states, w = ctx.saved_tensors
        b, hkv, dk, dv1 = states.shape[1:]
        dv = dv1 - 1
        new = torch.empty if ctx.packing is None else torch.zeros  # packed: padded rows get no gradient
        grad_k = new(k.shape, dtype=k.dtype, device=k.device)
        grad_v = new(v.shape, dtype=v.dtype, device=v.device)
        grad_w = new(w.shape, dtype=torch.float32, device=k.device) if w is not None else None
        G = grad_states[-1].clone()  # dL/dMz[j + 1], accumulated from the end
        for j, start, T in reversed(_segments(k.shape[0], ctx.N, ctx.packing)):
            Mz = states[j]
            sk = _sigma_(_heads(k, start, T))  # (b, hkv, T, dk)
            read = sk @ Mz  # (b, hkv, T, dv + 1)
            den = read[..., dv:] + ctx.eps
            # W = [u | d read]: both multiply into dL/dsigma(K_j) in one matmul below
            u = _delta_values(read, _heads(v, start, T), ctx.eps)  # (b, hkv, T, dv + 1)
            if w is None:
                g_u = sk @ G[..., :dv]  # (b, hkv, T, dv): dL/dV_j, and -dL/d(what M returned)
            else:  # rows written are w * u: dL/dw = (sigma(K) G) . u, dL/du = w * sigma(K) G
                ws = _heads(w, start, T)  # (b, hkv, T, 1)
                g_rows = sk @ G  # (b, hkv, T, dv + 1)
                _heads(grad_w, start, T).copy_((g_rows * u).sum(dim=-1, keepdim=True))
                u = u * ws
                g_u = g_rows[..., :dv] * ws
            W = torch.cat([
                u,
                g_u / den.neg(),
                (g_u * (read[..., :dv] / den)).sum(dim=-1, keepdim=True) / den,
            ], dim=-1)  # (b, hkv, T, 2 * (dv + 1))
            g_sk = W @ torch.cat([G, Mz], dim=-1).transpose(-1, -2)  # (b, hkv, T, dk)
            G += sk.transpose(-1, -2) @ W[..., dv1:]  # through the read of Mz[j]
            G += grad_states[j]  # now dL/dMz[j]
            if j in ctx.resets:  # Mz[j] was reset to zero: nothing flows to the previous document
                G.zero_()
            _heads(grad_v, start, T).copy_(g_u)
            _heads(grad_k, start, T).copy_(g_sk.mul_(sk.clamp_(max=1.0)))  # sigma'(k) = min(sigma(k), 1)
        return grad_k, grad_v, G, grad_w, None, None, None


def _delta_values(read: torch.Tensor, v: torch.Tensor, eps: float) -> torch.Tensor:
    """[V - what the memory returns for these keys | 1] (b, hkv, T, dv + 1) float32, from
    read = sigma(K) [M | z]: the rows the delta rule writes, with the ones column writing z."""
    dv = v.shape[-1]
    out = torch.empty(read.shape, dtype=torch.float32, device=read.device)
    out[..., :dv] = v - read[..., :dv] / (read[..., dv:] + eps)  # no out= into a strided view: torch.compile refuses it
    out[..., dv] = 1.0
    return out


class _RetrieveAndGate(torch.autograd.Function):
    """Memory retrieval and gate, a chunk of segments at a time:

        out_j = (1 - beta) * A_dot_j + beta * (sigma(Q_j) M_{j-1}) / (sigma(Q_j) z_{j-1} + eps)

    q [s, b, hq, dk]; Mz (n, b, hkv, dk, dv + 1) float32, the state [M | z] before each
    segment; a_dot the local attention in folded layout [b*n, hq, N, dv]; beta [hq] float32
    (the sigmoid of the gate). Returns [s, b, hq, dv] in q's dtype.

    Written as one autograd function so that retrieval, normalisation and gate run on
    cache-sized temporaries, forward and backward, instead of a dozen passes over
    sequence-sized tensors; backward recomputes sigma(Q_j) and the retrieval (one small
    matmul) instead of keeping them.
    """

    @staticmethod
    @autocast_off
    def forward(ctx, q, Mz, a_dot, beta, eps):
        s, b, hq, _ = q.shape
        hkv, dv = Mz.shape[2], Mz.shape[4] - 1
        N = a_dot.shape[2]
        a_seg = a_dot.view(b, -1, hq, N, dv)
        bcol = beta.view(hq, 1, 1, 1)
        out = torch.empty(s, b, hq, dv, dtype=q.dtype, device=q.device)
        for j, C, T, start in _chunks(q, N):
            Mzq = _per_query_head(Mz[j:j + C].permute(1, 2, 0, 3, 4), hq // hkv)  # (b, hq, C, dk, dv + 1)
            nd = _sigma_(_chunk_heads(q, start, C, T)) @ Mzq  # (b, hq, C, T, dv + 1)
            w = bcol / (nd[..., dv:] + eps)  # (b, hq, C, T, 1)
            a = a_seg[:, j:j + C, :, :T].transpose(1, 2).float()  # (b, hq, C, T, dv)
            _chunk_heads(out, start, C, T).copy_(torch.addcmul(a * (1.0 - bcol), nd[..., :dv], w))
        ctx.save_for_backward(q, Mz, a_dot, beta)
        ctx.eps = eps
        return out

    @staticmethod
    @once_differentiable
    @autocast_off
    def backward(ctx, grad_out):
        q, Mz, a_dot, beta = ctx.saved_tensors
        s, b, hq, dk = q.shape
        hkv, dv = Mz.shape[2], Mz.shape[4] - 1
        g = hq // hkv
        N = a_dot.shape[2]
        a_seg = a_dot.view(b, -1, hq, N, dv)
        bcol = beta.view(hq, 1, 1, 1)
        grad_q = torch.empty(q.shape, dtype=q.dtype, device=q.device)
        grad_Mz = torch.empty_like(Mz)
        grad_a = torch.empty_like(a_dot)
        ga_seg = grad_a.view(b, -1, hq, N, dv)
        ga_seg[:, -1, :, s - (ga_seg.shape[1] - 1) * N:] = 0.0  # rows past s: padding of the last segment
        grad_beta = torch.zeros(hq, dtype=torch.float32, device=q.device)
        for j, C, T, start in _chunks(q, N):
            sq = _sigma_(_chunk_heads(q, start, C, T))  # (b, hq, C, T, dk)
            Mzq = _per_query_head(Mz[j:j + C].permute(1, 2, 0, 3, 4), g)  # (b, hq, C, dk, dv + 1)
            nd = sq @ Mzq  # (b, hq, C, T, dv + 1)
            den = nd[..., dv:] + ctx.eps
            w = bcol / den
            go = _chunk_heads(grad_out, start, C, T).float()  # (b, hq, C, T, dv)
            ga_seg[:, j:j + C, :, :T] = (go * (1.0 - bcol)).transpose(1, 2)
            p = (go * nd[..., :dv]).sum(dim=-1, keepdim=True)  # grad . num
            r = (go * a_seg[:, j:j + C, :, :T].transpose(1, 2).float()).sum(dim=-1, keepdim=True)  # grad . A_dot
            grad_beta += (p / den - r).sum(dim=(0, 2, 3, 4))
            g_nd = torch.cat([go * w, p * w.div_(den).neg_()], dim=-1)  # d/d[num | den]
            g_Mzq = sq.transpose(-1, -2) @ g_nd  # (b, hq, C, dk, dv + 1)
            if g > 1:
                g_Mzq = g_Mzq.unflatten(1, (hkv, g)).sum(dim=2)
            grad_Mz[j:j + C] = g_Mzq.permute(2, 0, 1, 3, 4)
            _chunk_heads(grad_q, start, C, T).copy_((g_nd @ Mzq.transpose(-1, -2)).mul_(sq.clamp_(max=1.0)))
        return grad_q, grad_Mz, grad_a, grad_beta, None


def _forward(q, k, v, gate, q_local, k_local, M0, z0, N, update, scale, eps, a_dot=None, write=None, packing=None):
    """The op over one block. `a_dot`: the local attention in folded layout [b*n, hq, N, dv]
    when already computed (see `ops.context.infini_attention_deferred`), else computed here.
    `write`: optional write strengths [s, b, hkv]. `packing`: packed documents in the padded
    segment layout (`ops.packed.Packing`): the memory restarts from zero at each document but
    the first (which continues from M0, z0); padded rows are written with strength 0 (linear)
    or skipped (delta)."""
    s = q.shape[0]
    N = min(N, s)  # one short segment when the input is shorter than a segment
    if a_dot is None and packing is not None:  # packed: a fused call per segment-length bucket
        a_dot = local_attention_buckets(q_local, k_local, v, N, scale, packing.lengths)  # [n, hq, N, dv]
    elif a_dot is None:
        a_dot = local_attention_folded(q_local, k_local, v, N, scale)  # [b*n, hq, N, dv]
    return _memory_path(q, k, v, gate, a_dot, M0, z0, N, update, eps, write, packing)


@autocast_off
def _memory_path(q, k, v, gate, a_dot, M0, z0, N, update, eps, write=None, packing=None):
    """Retrieval, update and gate of `_forward`, in float32 whatever the caller's autocast."""
    # Memory path in float32, M and z side by side as Mz = [M | z] (b, hkv, dk, dv + 1), so one
    # matmul reads both the retrieval and its normaliser.
    Mz0 = pack_memory(M0, z0)
    if update == "linear":  # state before segment j: exclusive prefix sum of the deltas
        if write is None:
            deltas = _LinearDeltas.apply(k, v, N)  # (n, b, hkv, dk, dv + 1)
        else:  # w_t sigma(k_t)^T [v_t | 1] = sigma(k_t)^T [w_t v_t | w_t]: weighted values, z column dropped
            w = write.float().unsqueeze(-1)  # [s, b, hkv, 1]
            deltas = _LinearDeltas.apply(k, torch.cat([v.float() * w, w], dim=-1), N)[..., :-1]
        cum = torch.cumsum(deltas, dim=0)  # (n, b, hkv, dk, dv + 1)
        if packing is None:
            Mz_prev = torch.cat([Mz0.unsqueeze(0), Mz0 + cum[:-1]], dim=0)
            Mz_last = Mz0 + cum[-1]
        else:  # prefix sums restarting at each document: minus the sum before the document's first segment
            doc_start = packing.doc_start
            excl = torch.cat([torch.zeros_like(cum[:1]), cum[:-1]], dim=0)  # (n, b, hkv, dk, dv + 1)
            first = Mz0.unsqueeze(0) * (doc_start < 0).view(-1, 1, 1, 1, 1)  # M0 for the continued document
            Mz_prev = excl - excl[doc_start.clamp(min=0)] + first
            # A document's first segment reads exactly zero, through `where`: its retrieval gradient
            # (~1/eps on an empty memory) must not enter the difference above, where it would cancel
            # only up to rounding and leak into the previous document's keys and values.
            starts = doc_start == torch.arange(len(doc_start), device=doc_start.device)  # (n,)
            Mz_prev = torch.where(starts.view(-1, 1, 1, 1, 1), torch.zeros_like(Mz_prev), Mz_prev)
            Mz_last = Mz_prev[-1] + deltas[-1]
    else:  # delta rule: sequential, each update reads the state the previous one left
        w = None if write is None else write.float().unsqueeze(-1)  # [s, b, hkv, 1]
        states = _DeltaStates.apply(k, v, Mz0, w, N, eps, packing)  # (n + 1, b, hkv, dk, dv + 1)
        Mz_prev, Mz_last = states[:-1], states[-1]

    out = _RetrieveAndGate.apply(q, Mz_prev, a_dot, torch.sigmoid(gate.float()), eps)  # [s, b, hq, dv]
    M_last, z_last = unpack_memory(Mz_last)
    return out, (M_last.contiguous(), z_last.contiguous())
