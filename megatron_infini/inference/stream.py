"""Streaming inference: read an input of any length segment by segment, then generate.

Legend: b batch, s tokens of one call, N segment length, h hidden, V (padded) vocabulary.

How the memory is kept exact:
- Whole segments are fed with memory carry on (`megatron_infini.streaming`), in chunks of
  `chunk_segments` segments: each chunk starts from the memory the previous one left, so the
  result equals one forward over the whole input, while activations are bounded by the chunk.
- The trailing incomplete segment (prompt tail + generated tokens) is kept as tokens. For the
  next-token logits it is run again, with in-segment positions 0..len-1, on top of the committed
  memory, and the memory is then restored: the memory only ever absorbs complete segments, as
  in a forward over the whole sequence. When the tail reaches N tokens it is committed.
  Cost per generated token: O(N), independent of the input length.
- Peak memory: the chunk's activations, its logits (only the last position's are computed
  during prefill) and the memory state (per layer H * (d_k * d_v + d_k) floats); none grows
  with the input length.

    lm = StreamingLM(model)
    last_logits = lm.feed(prompt_ids)            # [b, V]; prompt_ids [b, s] or an iterator of them
    new_ids = lm.generate(max_new_tokens=32)     # [b, K]
"""

from __future__ import annotations

from typing import Iterable, List, Optional, Union

import torch

from megatron_infini.streaming import infini_cores, reset_memory, set_memory_carry

Tokens = Union[torch.Tensor, Iterable[torch.Tensor]]


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The bare Megatron `GPTModel` inside DeepSpeed / DDP / Float16 wrappers."""
    while hasattr(model, "module"):
        model = model.module
    return model


def segment_length(model: torch.nn.Module) -> int:
    cores = list(infini_cores(model))
    if not cores:
        raise ValueError("model has no Infini attention layers")
    return cores[0].config.segment_length


def fold_segments(tokens: torch.Tensor, N: int) -> torch.Tensor:
    """tokens [b, n*N] -> [b*n, N]: every segment becomes its own sequence (row b*n + j)."""
    b, s = tokens.shape
    if s % N:
        raise ValueError(f"fold_segments needs whole segments: {s} tokens, segment length {N}")
    return tokens.reshape(b * (s // N), N)


def unfold_segments(x: torch.Tensor, b: int) -> torch.Tensor:
    """Inverse of `fold_segments` on sequence-first outputs: [N, b*n, ...] -> [n*N, b, ...]."""
    N, bn = x.shape[:2]
    n = bn // b
    return x.view(N, b, n, *x.shape[2:]).transpose(0, 2).reshape(n * N, b, *x.shape[2:])


def memory_snapshot(model: torch.nn.Module) -> list:
    """The kept memory of every layer (references: the op never updates it in place)."""
    return [core.memory for core in infini_cores(model)]


def restore_memory(model: torch.nn.Module, snapshot: list) -> None:
    for core, mem in zip(infini_cores(model), snapshot):
        core.memory = mem


def memory_numbers(model: torch.nn.Module) -> int:
    """Numbers held by the kept memory of all layers (this rank): numel(M) + numel(z), or
    numel(k) + numel(v) + numel(valid) for compressive / xl layers."""
    return sum(t.numel() for m in memory_snapshot(model) if m is not None for t in m)


def sample_next(
    logits: torch.Tensor, temperature: float = 0.0, top_p: float = 1.0,
    generator: Optional[torch.Generator] = None,
) -> torch.Tensor:
    """logits [b, V] -> token ids [b]. temperature 0: greedy (argmax); else nucleus sampling
    from the smallest set of tokens whose probability reaches `top_p`."""
    if temperature <= 0:
        return logits.argmax(dim=-1)
    probs = torch.softmax(logits.float() / temperature, dim=-1)  # [b, V]
    if top_p < 1.0:
        sorted_p, idx = probs.sort(dim=-1, descending=True)
        keep = sorted_p.cumsum(dim=-1) - sorted_p < top_p  # always keeps the top token
        sorted_p = sorted_p * keep
        probs = torch.zeros_like(probs).scatter_(-1, idx, sorted_p)
    return torch.multinomial(probs / probs.sum(-1, keepdim=True), 1, generator=generator).squeeze(-1)


class StreamingLM:
    """Feeds tokens to a Megatron GPTModel with Infini-attention, carrying each layer's memory.

    Args:
        model: the GPTModel (or a wrapper of it), in eval mode; batch size is fixed by the
            first `feed` until `reset`.
        chunk_segments: whole segments per forward call while feeding (bounds activations).
        vocab_limit: ids >= this are never generated (Megatron pads the vocabulary).
        memory: False runs the ablation: every segment starts from an *empty* memory (as the
            first segment of every training sequence does), so nothing is carried from one
            segment to the next; the weights, the gates and the local attention are unchanged.
        reset_at_eos: an EOS id: the input may hold several documents, and the stream starts
            afresh (empty memory, new segments) after each EOS, as training with
            `data.reset_attention_mask` reads them. The logits right after an EOS are still the
            previous document's. Batch size 1 only. None: one stream across EOS.
    """

    def __init__(self, model: torch.nn.Module, chunk_segments: int = 16, vocab_limit: Optional[int] = None,
                 memory: bool = True, reset_at_eos: Optional[int] = None):
        if chunk_segments < 1:
            raise ValueError(f"chunk_segments must be >= 1, got {chunk_segments}")
        self.model = unwrap(model)
        self.N = segment_length(self.model)
        self.chunk = chunk_segments * self.N
        self.vocab_limit = vocab_limit
        self.use_memory = memory
        self.reset_at_eos = reset_at_eos
        self.device = next(self.model.parameters()).device
        set_memory_carry(self.model, True)
        self.reset()

    def reset(self) -> None:
        """Start a new document: empty memory, no pending tokens."""
        reset_memory(self.model)
        self.pending: Optional[torch.Tensor] = None  # [b, < N] tokens of the incomplete segment
        self._last_hidden: Optional[torch.Tensor] = None  # [b, h] at the last fed position
        self.tokens_seen = 0
        self.committed_segments = 0

    def close(self) -> None:
        """Turn memory carry off again (the model goes back to one-call-per-sequence)."""
        set_memory_carry(self.model, False)

    # ---------------------------------------------------------------- model calls

    def _hidden(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens [b, s] -> final-norm hidden states [s, b, h]; the memory advances by these
        tokens (callers restore it for an incomplete segment)."""
        b, s = tokens.shape
        fold = not self.use_memory and s > self.N
        if not self.use_memory:
            reset_memory(self.model)
        x = fold_segments(tokens, self.N) if fold else tokens  # ablation: [b*n, N], one segment per row
        pos = torch.arange(x.shape[1], device=self.device).unsqueeze(0).expand_as(x)
        self.model.post_process = False  # GPTModel then returns the decoder output (final norm applied)
        try:
            h = self.model(x.to(self.device), pos, None)  # [s, b, h] or [N, b*n, h]
        finally:
            self.model.post_process = True
            if not self.use_memory:
                reset_memory(self.model)
        return unfold_segments(h, b) if fold else h

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden [..., b, h] -> logits [..., b, V] through the output layer (gathered over TP)."""
        m = self.model
        weight = m.shared_embedding_or_output_weight() if m.share_embeddings_and_output_weights else None
        squeeze = hidden.dim() == 2
        out, _ = m.output_layer(hidden.unsqueeze(0) if squeeze else hidden, weight=weight,
                                runtime_gather_output=True)
        out = out.float()
        if self.vocab_limit is not None:
            out[..., self.vocab_limit:] = float("-inf")
        return out[0] if squeeze else out

    # ---------------------------------------------------------------- streaming

    @torch.no_grad()
    def feed(self, tokens: Tokens) -> torch.Tensor:
        """Append tokens ([b, s] LongTensor, or an iterable of them, e.g. a generator reading a
        huge input piece by piece) to the stream; returns the next-token logits [b, V] (float32)."""
        pieces = [tokens] if isinstance(tokens, torch.Tensor) else tokens
        if self.reset_at_eos is not None:
            return self._feed_documents(pieces)
        last = None
        for piece in pieces:
            if piece.dim() != 2:
                raise ValueError(f"tokens must be [batch, seq], got shape {tuple(piece.shape)}")
            piece = piece.to(self.device)
            buf = piece if self.pending is None else torch.cat([self.pending, piece], dim=1)
            whole = buf.shape[1] // self.N * self.N
            for start in range(0, whole, self.chunk):  # commit whole segments, chunk by chunk
                last = self._hidden(buf[:, start:min(start + self.chunk, whole)])[-1]  # [b, h]
            self.committed_segments += whole // self.N
            self.pending = buf[:, whole:] if whole < buf.shape[1] else None
            self.tokens_seen += piece.shape[1]
        if self.pending is not None:  # the incomplete segment: read, then restore the memory
            snap = memory_snapshot(self.model)
            try:
                last = self._hidden(self.pending)[-1]
            finally:
                restore_memory(self.model, snap)
        if last is None:
            last = self._last_hidden
        if last is None:
            raise ValueError("feed() needs at least one token")
        self._last_hidden = last
        return self.logits(last)

    def _feed_documents(self, pieces: Iterable[torch.Tensor]) -> torch.Tensor:
        """`feed` with a fresh stream after every EOS (`reset_at_eos`)."""
        eos, logits = self.reset_at_eos, None
        for piece in pieces:
            if piece.dim() != 2 or piece.shape[0] != 1:
                raise ValueError(f"reset_at_eos needs tokens [1, seq] (batch size 1), got shape {tuple(piece.shape)}")
            ends = (piece[0] == eos).nonzero().flatten().tolist()
            start = 0
            for end in ends + [piece.shape[1] - 1]:
                if end < start:
                    continue
                self.reset_at_eos = None  # plain feed of one document's tokens
                try:
                    logits = self.feed(piece[:, start:end + 1])
                finally:
                    self.reset_at_eos = eos
                if end in ends:  # the next token starts a new document
                    last = self._last_hidden
                    self.reset()
                    self._last_hidden = last
                start = end + 1
        if logits is None:
            raise ValueError("feed() needs at least one token")
        return logits

    @torch.no_grad()
    def generate(
        self, max_new_tokens: int, temperature: float = 0.0, top_p: float = 1.0,
        eos_id: Optional[int] = None, generator: Optional[torch.Generator] = None,
        stop_at: Optional[List[int]] = None,
    ) -> torch.Tensor:
        """Continue the stream by up to `max_new_tokens` tokens -> [b, K] (K <= max_new_tokens:
        stops early when every row has produced `eos_id` or a token of `stop_at`)."""
        if self._last_hidden is None:
            raise ValueError("generate() needs a prompt: call feed() first")
        logits = self.logits(self._last_hidden)
        out = []
        stops = set(stop_at or []) | ({eos_id} if eos_id is not None else set())
        done = None
        for _ in range(max_new_tokens):
            nxt = sample_next(logits, temperature, top_p, generator)  # [b]
            out.append(nxt)
            hit = torch.tensor([int(t) in stops for t in nxt.tolist()], device=nxt.device)
            done = hit if done is None else done | hit
            logits = self.feed(nxt.unsqueeze(1))  # the stream always holds what was emitted
            if bool(done.all()):
                break
        if not out:
            return torch.empty(self._last_hidden.shape[0], 0, dtype=torch.long)
        return torch.stack(out, dim=1).cpu()


@torch.no_grad()
def reference_greedy(model: torch.nn.Module, prompt: torch.Tensor, max_new_tokens: int,
                     vocab_limit: Optional[int] = None) -> torch.Tensor:
    """Greedy decoding by a full forward over prompt + generated tokens at every step (no memory
    carry, no caching): the oracle for `StreamingLM`. prompt [b, s] -> [b, K]."""
    m = unwrap(model)
    set_memory_carry(m, False)
    seq = prompt.clone()
    out = []
    for _ in range(max_new_tokens):
        pos = torch.arange(seq.shape[1]).unsqueeze(0).expand_as(seq)
        logits = m(seq, pos, None)[:, -1].float()  # [b, V]
        if vocab_limit is not None:
            logits[:, vocab_limit:] = float("-inf")
        nxt = logits.argmax(-1)
        out.append(nxt)
        seq = torch.cat([seq, nxt.unsqueeze(1)], dim=1)
    return torch.stack(out, dim=1)
