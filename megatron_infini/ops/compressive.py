"""Compressive Transformer (Rae et al. 2019) and Transformer-XL attention as pure functions.

Two functions with one contract:
- `compressive_attention_naive`: the paper's loop, one segment at a time, pushing each
  segment into a FIFO memory (the test oracle);
- `compressive_attention`: the training form, every segment of the input at once (each
  segment reads the memory left by the segments before it, as windows over one tensor).

Each segment attends causally within itself and over [compressed memory; memory]. The memory
holds the pre-RoPE keys and the values of the `memory_length` most recent tokens, per
key/value head. With `compressed_memory_length` > 0 (Compressive Transformer), the N tokens a
segment pushes out of the memory are compressed by a learned per-head 1D convolution
(kernel = stride = c) into N / c slots of a second FIFO of `compressed_memory_length` slots;
with 0 (Transformer-XL) they are dropped. Memories are stop-gradient (constants for the
language-model loss); the compressor is trained only by the attention-reconstruction loss
returned as `aux`.

Positions (RoPE, relative by construction): the attended window is laid out as slots
[compressed (n_cm) | memory (n_m) | segment (N)] and slot i gets position i, so the query at
in-segment position t sits at n_cm + n_m + t, a memory key at its distance in tokens, and one
compressed slot (c tokens) counts as one position. Positions never exceed n_cm + n_m + N - 1,
whatever the input length. Slots not yet filled (start of a stream) are masked out.

Shape legend (sequence first at the boundary):
    s sequence, b batch, hq / hkv query / key-value heads, g = hq // hkv, dk / dv head dims,
    N segment length, n_m memory length, n_cm compressed memory length, c compression rate,
    W = n_cm + n_m window of memory slots.
    q [s, b, hq, dk]; k [s, b, hkv, dk]; v [s, b, hkv, dv]; out [s, b, hq, dv].
    memory (k_mem [b, hkv, W, dk], v_mem [b, hkv, W, dv] in k's dtype, valid [b, hkv, W]
    float32 1/0), slots [compressed | memory], newest last.
    compressor (w_k [hkv, c * dk, dk], w_v [hkv, c * dv, dv]) or None.
    rope_freqs [P, rot] angles of positions 0..P-1 (P >= W + N, rot <= dk, even) or None.

Only whole segments enter the memory: a trailing partial segment is attended but not stored
(a stream keeps such tokens pending, as `megatron_infini.inference.StreamingLM` does).
"""

from __future__ import annotations

import math
from typing import Optional, Tuple

import torch
import torch.nn.functional as F

from .sdpa import sdpa_masked

CompressiveMemory = Tuple[torch.Tensor, torch.Tensor, torch.Tensor]
Compressor = Tuple[torch.Tensor, torch.Tensor]


# ----------------------------------------------------------------------------- pieces


def empty_compressive_memory(b: int, hkv: int, dk: int, dv: int, memory_length: int,
                             compressed_memory_length: int = 0, dtype=torch.float32, device=None
                             ) -> CompressiveMemory:
    """All slots empty: zeros [b, hkv, W, dk|dv] and valid = 0 [b, hkv, W] float32."""
    w = memory_length + compressed_memory_length
    return (torch.zeros(b, hkv, w, dk, dtype=dtype, device=device),
            torch.zeros(b, hkv, w, dv, dtype=dtype, device=device),
            torch.zeros(b, hkv, w, dtype=torch.float32, device=device))


def mean_pool_compressor(hkv: int, d: int, c: int, dtype=torch.float32, device=None) -> torch.Tensor:
    """[hkv, c * d, d] weights that compress c slots into their mean (the compressor's init)."""
    eye = torch.eye(d, dtype=dtype, device=device) / c
    return eye.repeat(c, 1).unsqueeze(0).repeat(hkv, 1, 1).contiguous()


def compress(x: torch.Tensor, w: torch.Tensor, c: int) -> torch.Tensor:
    """1D convolution with kernel = stride = c over slots, per head: x [b, h, n, d] (n % c == 0),
    w [h, c * d, d'] -> [b, h, n / c, d']."""
    b, h, n, d = x.shape
    groups = x.reshape(b, h, n // c, c * d)  # c consecutive slots side by side
    return torch.einsum("bhgk,hkd->bhgd", groups, w.to(x.dtype))


def rotate(x: torch.Tensor, angles: Optional[torch.Tensor]) -> torch.Tensor:
    """RoPE (Megatron's non-interleaved layout) on the last dim: x [..., T, d], angles [T, rot]."""
    if angles is None:
        return x
    rot = angles.shape[-1]
    cos, sin = angles.cos().to(x.dtype), angles.sin().to(x.dtype)
    xr, rest = x[..., :rot], x[..., rot:]
    x1, x2 = xr.chunk(2, dim=-1)
    return torch.cat([xr * cos + torch.cat([-x2, x1], dim=-1) * sin, rest], dim=-1)


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, allowed: torch.Tensor, scale: float) -> torch.Tensor:
    """Masked softmax attention: q [..., T, dk], k [..., L, dk], v [..., L, dv], allowed (bool,
    broadcast to [..., T, L]) -> [..., T, dv]. A row with no allowed key returns 0."""
    scores = (q @ k.transpose(-1, -2)) * scale
    scores = scores.masked_fill(~allowed, torch.finfo(scores.dtype).min)
    return (torch.softmax(scores, dim=-1) * allowed) @ v


def window_mask(W: int, T: int, device=None) -> torch.Tensor:
    """[T, W + T] bool: query t sees every memory slot and segment keys 0..t."""
    causal = torch.ones(T, T, dtype=torch.bool, device=device).tril()
    return torch.cat([torch.ones(T, W, dtype=torch.bool, device=device), causal], dim=1)


def reconstruction_sq(q, k_old, v_old, valid_old, k_c, v_c, valid_c, scale) -> torch.Tensor:
    """Sum of squared differences between attention over the evicted slots and over their
    compressed form (Rae et al.'s attention-reconstruction loss; content only, no positions).
    q [..., g, T, dk]; k_old / v_old [..., L, d], valid_old [..., L]; k_c / v_c / valid_c the same
    with L / c slots. Everything but the compressed slots should arrive detached."""
    full = attend(q, k_old.unsqueeze(-3), v_old.unsqueeze(-3), valid_old[..., None, None, :].bool(), scale)
    comp = attend(q, k_c.unsqueeze(-3), v_c.unsqueeze(-3), valid_c[..., None, None, :].bool(), scale)
    return (full - comp).square().sum()


def check_compressive(q, k, v, compressor, segment_length, memory_length, compressed_memory_length,
                      compression_rate, memory, rope_freqs):
    """Validate the op's arguments; raise ValueError naming the bad one. Returns the dims."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor) or t.dim() != 4:
            raise ValueError(f"{name} must be a 4-D tensor [s, b, heads, head_dim]")
    s, b, hq, dk = q.shape
    hkv, dv = k.shape[2], v.shape[3]
    if k.shape[:2] != (s, b) or k.shape[3] != dk or v.shape[:3] != (s, b, hkv):
        raise ValueError(f"k {tuple(k.shape)} / v {tuple(v.shape)} do not match q {tuple(q.shape)}")
    if hq % hkv:
        raise ValueError(f"q heads ({hq}) must be a multiple of k/v heads ({hkv})")
    N, nm, ncm, c = segment_length, memory_length, compressed_memory_length, compression_rate
    for name, val, low in (("segment_length", N, 1), ("memory_length", nm, 1),
                           ("compressed_memory_length", ncm, 0), ("compression_rate", c, 1)):
        if isinstance(val, bool) or not isinstance(val, int) or val < low:
            raise ValueError(f"{name} must be an integer >= {low}, got {val!r}")
    if ncm:
        if N % c or nm % c:
            raise ValueError(f"segment_length ({N}) and memory_length ({nm}) must be multiples of "
                             f"compression_rate ({c})")
        if compressor is None or len(compressor) != 2:
            raise ValueError("compressor (w_k, w_v) is required when compressed_memory_length > 0")
        wk, wv = compressor
        if wk.shape != (hkv, c * dk, dk) or wv.shape != (hkv, c * dv, dv):
            raise ValueError(f"compressor must be ([{hkv}, {c * dk}, {dk}], [{hkv}, {c * dv}, {dv}]), "
                             f"got {tuple(wk.shape)} and {tuple(wv.shape)}")
    W = nm + ncm
    if memory is not None:
        mk, mv, mvalid = memory
        if mk.shape != (b, hkv, W, dk) or mv.shape != (b, hkv, W, dv) or mvalid.shape != (b, hkv, W):
            raise ValueError(f"memory must be ([{b}, {hkv}, {W}, {dk}], [{b}, {hkv}, {W}, {dv}], "
                             f"[{b}, {hkv}, {W}]), got {tuple(mk.shape)}, {tuple(mv.shape)}, {tuple(mvalid.shape)}")
    if rope_freqs is not None and (rope_freqs.dim() != 2 or rope_freqs.shape[0] < W + N
                                   or rope_freqs.shape[1] > dk or rope_freqs.shape[1] % 2):
        raise ValueError(f"rope_freqs must be [P >= {W + N}, rot <= {dk}, even], got {tuple(rope_freqs.shape)}")
    return s, b, hq, hkv, dk, dv


def _setup(q, k, v, memory, W, nm, ncm):
    """Heads-first compute-dtype copies of the inputs and of the (possibly empty) memory."""
    s, b, hq, dk = q.shape
    hkv, dv = k.shape[2], v.shape[3]
    ct = torch.promote_types(q.dtype, torch.float32)
    qh = q.to(ct).permute(1, 2, 0, 3).reshape(b, hkv, hq // hkv, s, dk)  # (b, hkv, g, s, dk)
    kh, vh = (t.to(ct).permute(1, 2, 0, 3) for t in (k, v))  # (b, hkv, s, d)
    if memory is None:
        memory = empty_compressive_memory(b, hkv, dk, dv, nm, ncm, ct, q.device)
    mk, mv, mvalid = (t.to(ct) for t in memory)
    return ct, qh, kh, vh, mk, mv, mvalid


# ----------------------------------------------------------------------------- naive


def compressive_attention_naive(
    q, k, v, compressor: Optional[Compressor] = None, *, segment_length: int, memory_length: int,
    compressed_memory_length: int = 0, compression_rate: int = 1, memory: Optional[CompressiveMemory] = None,
    rope_freqs: Optional[torch.Tensor] = None, softmax_scale: Optional[float] = None,
):
    """Reference: segments one by one, FIFO memories. Same contract as `compressive_attention`."""
    s, b, hq, hkv, dk, dv = check_compressive(q, k, v, compressor, segment_length, memory_length,
                                              compressed_memory_length, compression_rate, memory, rope_freqs)
    N, nm, ncm, c = segment_length, memory_length, compressed_memory_length, compression_rate
    W = nm + ncm
    scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(dk)
    ct, qh, kh, vh, mk, mv, mvalid = _setup(q, k, v, memory, W, nm, ncm)
    angles = None if rope_freqs is None else rope_freqs.to(ct)
    aux_sq, whole = None, 0
    if ncm:
        aux_sq = compressor[0].sum() * 0 + compressor[1].sum() * 0  # stays connected to the compressor
    outs = []
    for start in range(0, s, N):
        T = min(N, s - start)
        seg = slice(start, start + T)
        qs, ks, vs = qh[..., seg, :], kh[:, :, seg], vh[:, :, seg]
        wk, wv = torch.cat([mk, ks], dim=2), torch.cat([mv, vs], dim=2)  # (b, hkv, W + T, d)
        wvalid = torch.cat([mvalid, mvalid.new_ones(b, hkv, T)], dim=2).bool()  # (b, hkv, W + T)
        pos_q = None if angles is None else angles[W:W + T]
        pos_k = None if angles is None else angles[:W + T]
        allowed = wvalid[:, :, None, None, :] & window_mask(W, T, q.device)  # (b, hkv, 1, T, W + T)
        out = attend(rotate(qs, pos_q), rotate(wk, pos_k).unsqueeze(2), wv.unsqueeze(2), allowed, scale)
        outs.append(out.reshape(b, hq, T, dv))
        if T < N:
            break  # a partial segment is not stored
        whole += 1
        # FIFO: the segment (stop-gradient) enters the memory, the oldest N tokens leave it
        rk = torch.cat([mk[:, :, ncm:], ks.detach()], dim=2)  # (b, hkv, n_m + N, dk)
        rv = torch.cat([mv[:, :, ncm:], vs.detach()], dim=2)
        rvalid = torch.cat([mvalid[:, :, ncm:], mvalid.new_ones(b, hkv, N)], dim=2)
        ck, cv, cvalid = mk[:, :, :ncm], mv[:, :, :ncm], mvalid[:, :, :ncm]
        if ncm:
            ok, ov, ovalid = rk[:, :, :N], rv[:, :, :N], rvalid[:, :, :N]  # evicted
            nk, nv = compress(ok, compressor[0], c), compress(ov, compressor[1], c)  # (b, hkv, N / c, d)
            nvalid = ovalid.reshape(b, hkv, N // c, c).amin(-1)
            aux_sq = aux_sq + reconstruction_sq(qs.detach(), ok, ov, ovalid, nk, nv, nvalid, scale)
            ck = torch.cat([ck, nk.detach()], dim=2)[:, :, -ncm:]
            cv = torch.cat([cv, nv.detach()], dim=2)[:, :, -ncm:]
            cvalid = torch.cat([cvalid, nvalid], dim=2)[:, :, -ncm:]
        mk = torch.cat([ck, rk[:, :, N:]], dim=2)
        mv = torch.cat([cv, rv[:, :, N:]], dim=2)
        mvalid = torch.cat([cvalid, rvalid[:, :, N:]], dim=2)
    out = torch.cat(outs, dim=2).permute(2, 0, 1, 3).to(q.dtype)  # (b, hq, s, dv) -> [s, b, hq, dv]
    aux = None if aux_sq is None else aux_sq / max(whole * b * hq * N * dv, 1)
    return out, (mk.to(k.dtype), mv.to(k.dtype), mvalid.float()), aux


# ----------------------------------------------------------------------------- parallel


def _windows(x: torch.Tensor, size: int, step: int, count: int) -> torch.Tensor:
    """x [b, h, L, ...] -> [b, h, count, size, ...]: slices x[j*step : j*step + size]."""
    w = x.unfold(2, size, step)[:, :, :count]  # (b, h, count, ..., size)
    return w.movedim(-1, 3) if x.dim() == 4 else w


def compressive_attention(
    q, k, v, compressor: Optional[Compressor] = None, *, segment_length: int, memory_length: int,
    compressed_memory_length: int = 0, compression_rate: int = 1, memory: Optional[CompressiveMemory] = None,
    rope_freqs: Optional[torch.Tensor] = None, softmax_scale: Optional[float] = None,
):
    """All segments at once. Returns (out [s, b, hq, dv] in q's dtype, final memory (detached),
    aux): aux is the mean squared attention-reconstruction error over the whole segments
    (a scalar whose gradient reaches only the compressor), None when compressed_memory_length is 0.

    Segment j's memory is a window over E = [initial memory; all tokens] (keys/values detached):
    E[jN : jN + n_m]; its compressed memory a window over [initial compressed memory;
    compress(E[0 : whole * N])], starting at slot jN / c.
    """
    s, b, hq, hkv, dk, dv = check_compressive(q, k, v, compressor, segment_length, memory_length,
                                              compressed_memory_length, compression_rate, memory, rope_freqs)
    N, nm, ncm, c = segment_length, memory_length, compressed_memory_length, compression_rate
    W, g = nm + ncm, hq // hkv
    scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(dk)
    ct, qh, kh, vh, mk, mv, mvalid = _setup(q, k, v, memory, W, nm, ncm)
    nseg, whole = -(-s // N), s // N
    pad = nseg * N - s
    if pad:  # padded keys come after every real query of the partial segment: never seen
        qh, kh, vh = (F.pad(t, (0, 0, 0, pad)) for t in (qh, kh, vh))
    ek = torch.cat([mk[:, :, ncm:], kh.detach()], dim=2)  # (b, hkv, n_m + nseg N, dk)
    ev = torch.cat([mv[:, :, ncm:], vh.detach()], dim=2)
    evalid = torch.cat([mvalid[:, :, ncm:], mvalid.new_ones(b, hkv, nseg * N)], dim=2)
    win_k, win_v, win_valid = [_windows(ek, nm, N, nseg)], [_windows(ev, nm, N, nseg)], [_windows(evalid, nm, N, nseg)]
    aux = None
    final_c = (mk[:, :, :ncm], mv[:, :, :ncm], mvalid[:, :, :ncm])
    if ncm:
        L, m = whole * N, N // c  # evicted tokens in all; compressed slots per segment
        ok, ov, ovalid = ek[:, :, :L], ev[:, :, :L], evalid[:, :, :L]
        nk, nv = compress(ok, compressor[0], c), compress(ov, compressor[1], c)  # (b, hkv, L / c, d)
        nvalid = ovalid.reshape(b, hkv, L // c, c).amin(-1)
        sq = reconstruction_sq(
            qh[..., :L, :].detach().reshape(b, hkv, g, whole, N, dk).transpose(2, 3),  # (b, hkv, whole, g, N, dk)
            ok.reshape(b, hkv, whole, N, dk), ov.reshape(b, hkv, whole, N, dv), ovalid.reshape(b, hkv, whole, N),
            nk.reshape(b, hkv, whole, m, dk), nv.reshape(b, hkv, whole, m, dv), nvalid.reshape(b, hkv, whole, m),
            scale)
        aux = (sq + compressor[0].sum() * 0 + compressor[1].sum() * 0) / max(whole * b * hq * N * dv, 1)
        cek = torch.cat([mk[:, :, :ncm], nk.detach()], dim=2)  # (b, hkv, n_cm + L / c, dk)
        cev = torch.cat([mv[:, :, :ncm], nv.detach()], dim=2)
        cevalid = torch.cat([mvalid[:, :, :ncm], nvalid], dim=2)
        win_k.insert(0, _windows(cek, ncm, m, nseg))
        win_v.insert(0, _windows(cev, ncm, m, nseg))
        win_valid.insert(0, _windows(cevalid, ncm, m, nseg))
        final_c = (cek[:, :, whole * m:whole * m + ncm], cev[:, :, whole * m:whole * m + ncm],
                   cevalid[:, :, whole * m:whole * m + ncm])
    segs = lambda t: t.reshape(b, hkv, nseg, N, t.shape[-1])  # noqa: E731  (b, hkv, nseg N, d) -> per segment
    wk = torch.cat(win_k + [segs(kh)], dim=3)  # (b, hkv, nseg, W + N, dk)
    wv = torch.cat(win_v + [segs(vh)], dim=3)
    wvalid = torch.cat(win_valid + [evalid.new_ones(b, hkv, nseg, N)], dim=3).bool()  # (b, hkv, nseg, W + N)
    angles = None if rope_freqs is None else rope_freqs.to(ct)
    # One fused attention call over (batch, segment) with grouped-query heads; every query sees
    # at least itself, so no row is fully masked. Slot validity is the same for every head.
    # (batch, segment) flattened: 4-D tensors, which the fused kernels take (sdpa_masked).
    qs = qh.reshape(b, hkv, g, nseg, N, dk).permute(0, 3, 1, 2, 4, 5).reshape(b * nseg, hq, N, dk)
    allowed = wvalid[:, 0, :, None, None, :] & window_mask(W, N, q.device)  # (b, nseg, 1, N, W + N)
    out = sdpa_masked(
        rotate(qs, None if angles is None else angles[W:W + N]),
        rotate(wk, None if angles is None else angles[:W + N]).transpose(1, 2).reshape(b * nseg, hkv, W + N, dk),
        wv.transpose(1, 2).reshape(b * nseg, hkv, W + N, dv), allowed.reshape(b * nseg, 1, N, W + N),
        scale)  # (b nseg, hq, N, dv)
    out = out.reshape(b, nseg, hq, N, dv).transpose(1, 2).reshape(b, hq, nseg * N, dv)[:, :, :s].permute(2, 0, 1, 3).to(q.dtype)  # [s, b, hq, dv]
    raw = slice(whole * N, whole * N + nm)
    final = (torch.cat([final_c[0], ek[:, :, raw]], dim=2), torch.cat([final_c[1], ev[:, :, raw]], dim=2),
             torch.cat([final_c[2], evalid[:, :, raw]], dim=2))
    return out, (final[0].to(k.dtype), final[1].to(k.dtype), final[2].float()), aux
