"""Blended training data: Megatron's weighted list of corpora, `[0.7, prefix_a, 0.3, prefix_b]`.

`parse_blend` reads the list (a YAML list, or Megatron's `--data-path` text
`"0.7 prefix_a 0.3 prefix_b"`). `BlendedDataset` samples it the way Megatron's `BlendedDataset`
does (`build_blending_indices` in megatron/core/datasets/helpers.cpp): with the weights
normalised to shares w_i, global sample g goes to the corpus with the largest error
`w_i * max(g, 1) - n_i` (n_i: samples corpus i got before g; ties to the first corpus), and
becomes that corpus's sample n_i. The assignment is a pure function of the weights, so the
stream is deterministic, the achieved shares never drift from the weights by more than about
one sample per corpus, and a resumed run (any data-parallel size) continues at
`consumed_samples` exactly. Unlike Megatron's fixed-size blend the stream is endless: the
index is built lazily, in blocks, as far as it is read (a Python loop, ~1 us per sample; 10 bytes per sample, as Megatron's).

Each corpus is a `PackedDocumentDataset` with the same seed and sequence length.
"""

from __future__ import annotations

import math
import os
from typing import Any, Dict, List, Optional, Tuple

import numpy as np

from megatron_infini.data.dataset import PackedDocumentDataset, SampleStream
from megatron_infini.data.preprocess import read_metadata

Blend = List[Tuple[float, str]]

_BLOCK = 1 << 14  # samples of index built at a time


def _number(x: Any) -> Optional[float]:
    if isinstance(x, bool):
        return None
    if isinstance(x, (int, float)):
        return float(x)
    try:
        return float(x)
    except (TypeError, ValueError):
        return None


def parse_blend(value: Any, key: str = "data.train_data") -> Blend:
    """`value` -> [(weight, prefix), ...]; [] for "" (nothing given).

    Accepted: a prefix (weight 1); a list `[w1, prefix1, w2, prefix2, ...]`; a list holding one
    prefix; the same list as text separated by whitespace, recognised by a number first (a
    single path may contain spaces). Raises ValueError naming `key` for an odd-length list, a
    weight that is not a positive finite number, or an empty prefix.
    """
    if value is None or value == "" or value == []:
        return []
    if isinstance(value, str):
        parts = value.split()
        if len(parts) < 2 or _number(parts[0]) is None:
            return [(1.0, value)]
        value = parts
    if not isinstance(value, (list, tuple)):
        return [(1.0, str(value))]
    if len(value) == 1:
        return [(1.0, str(value[0]))]
    if len(value) % 2:
        raise ValueError(f"{key}: a blend is a list of weight, prefix pairs ([0.7, prefix_a, 0.3, prefix_b]); "
                         f"got an odd number of items ({len(value)}): {list(value)!r}")
    blend = []
    for i in range(0, len(value), 2):
        w, prefix = _number(value[i]), value[i + 1]
        if w is None or not math.isfinite(w) or w <= 0:
            raise ValueError(f"{key}: the weight of {prefix!r} must be a positive number, got {value[i]!r}")
        if not isinstance(prefix, (str, os.PathLike)) or not os.fspath(prefix):
            raise ValueError(f"{key}: item {i + 1} must be a data prefix after the weight {value[i]!r}, "
                             f"got {prefix!r}")
        blend.append((w, os.fspath(prefix)))
    return blend


def corpus_names(prefixes: List[str]) -> List[str]:
    """Short names for metrics: each prefix's file name, made unique with `#i` where needed."""
    base = [os.path.basename(os.path.normpath(p)) or p for p in prefixes]
    return [f"{b}#{i}" if base.count(b) > 1 else b for i, b in enumerate(base)]


def check_same_tokenizer(prefixes: List[str]) -> None:
    """Raises ValueError when the `.json` beside two prefixes records different tokenizers."""
    seen = None
    for p in prefixes:
        meta = read_metadata(p)
        if meta is None:
            continue
        tok = {k: meta.get(f"tokenizer_{k}") for k in ("kind", "vocab_size", "fingerprint")}
        if seen is None:
            seen = (p, tok)
        elif any(tok[k] is not None and seen[1][k] is not None and tok[k] != seen[1][k] for k in tok):
            raise ValueError(f"the blended corpora {seen[0]!r} and {p!r} were made with different tokenizers "
                             f"({seen[1]} vs {tok}); preprocess every corpus with the same tokenizer")


class BlendingIndex:
    """Megatron's blending index, extended lazily: `corpus[g]`, `sample[g]` for every global g
    below `size` (10 bytes per sample, as Megatron's index)."""

    def __init__(self, weights: List[float]):
        w = np.asarray(weights, dtype=np.float64)
        self.weights = (w / w.sum()).tolist()  # Megatron's normalize
        self.size = 0
        self._corpus = np.empty(_BLOCK, dtype=np.int16)
        self._sample = np.empty(_BLOCK, dtype=np.int64)
        self._counts = [0] * len(self.weights)  # samples per corpus among [0, size)
        self._seen = (0, [0] * len(self.weights))  # (g, counts before g) of the last counts_before

    @property
    def corpus(self) -> np.ndarray:
        return self._corpus[:self.size]

    @property
    def sample(self) -> np.ndarray:
        return self._sample[:self.size]

    def ensure(self, size: int) -> None:
        """Build the index at least up to `size` samples."""
        while self.size < size:
            start = self.size
            if start + _BLOCK > len(self._corpus):  # double the capacity
                self._corpus = np.concatenate([self._corpus, np.empty_like(self._corpus)])
                self._sample = np.concatenate([self._sample, np.empty_like(self._sample)])
            corpus, sample = self._corpus[start:start + _BLOCK], self._sample[start:start + _BLOCK]
            counts, weights, k = self._counts, self.weights, len(self.weights)
            for j in range(_BLOCK):
                g = max(float(start + j), 1.0)
                best, best_err = 0, weights[0] * g - counts[0]
                for i in range(1, k):
                    err = weights[i] * g - counts[i]
                    if err > best_err:
                        best, best_err = i, err
                corpus[j], sample[j] = best, counts[best]
                counts[best] += 1
            self.size = start + _BLOCK

    def counts_before(self, g: int) -> List[int]:
        """Samples each corpus got among global samples [0, g) (incremental for growing g)."""
        self.ensure(g)
        last, counts = self._seen if self._seen[0] <= g else (0, [0] * len(self.weights))
        more = np.bincount(self._corpus[last:g], minlength=len(self.weights))
        counts = [int(c + m) for c, m in zip(counts, more)]
        self._seen = (g, counts)
        return counts


class BlendedDataset(SampleStream):
    """Endless stream of `seq_length + 1`-token samples drawn from weighted corpora.

    Args:
        blend: [(weight, prefix), ...] (see `parse_blend`); weights need not sum to 1.
        seq_length, seed, shuffle, dp_rank, dp_world_size, model_vocab_size: as for
            `PackedDocumentDataset`, applied to every corpus.

    Raises:
        ValueError: an empty blend, a missing or unreadable corpus (named), corpora made with
            different tokenizers, or the errors of `PackedDocumentDataset`.
    """

    def __init__(self, blend: Blend, seq_length: int, seed: int = 1234, shuffle: bool = True,
                 dp_rank: int = 0, dp_world_size: int = 1, model_vocab_size: Optional[int] = None):
        if not blend:
            raise ValueError("a blend needs at least one (weight, prefix) pair")
        self.blend = [(float(w), os.fspath(p)) for w, p in blend]
        prefixes = [p for _, p in self.blend]
        check_same_tokenizer(prefixes)
        self.corpora = [PackedDocumentDataset(p, seq_length, seed=seed, shuffle=shuffle, dp_rank=dp_rank,
                                              dp_world_size=dp_world_size, model_vocab_size=model_vocab_size)
                        for p in prefixes]
        self.names = corpus_names(prefixes)
        self.index = BlendingIndex([w for w, _ in self.blend])
        self.seq_length, self.seed, self.shuffle = seq_length, seed, shuffle
        self.dp_rank, self.dp_world_size = dp_rank, dp_world_size
        self.metadata = self.corpora[0].metadata
        self.consumed_samples = 0
        """Global samples handed out so far (over all data-parallel ranks)."""

    def __getitem__(self, global_index: int) -> np.ndarray:
        """Tokens of global sample `global_index`, int64 `[seq_length + 1]`."""
        if global_index < 0:
            raise IndexError(f"sample index must be >= 0, got {global_index}")
        self.index.ensure(global_index + 1)
        return self.corpora[int(self.index.corpus[global_index])][int(self.index.sample[global_index])]

    def corpus_samples(self) -> Dict[str, int]:
        """Samples each corpus has contributed so far (global), keyed `samples/<corpus name>`."""
        counts = self.index.counts_before(self.consumed_samples)
        return {f"samples/{n}": c for n, c in zip(self.names, counts)}

    def state_dict(self) -> dict:
        """Position in the stream plus what defines it (checked on load)."""
        return {
            "consumed_samples": self.consumed_samples,
            "blend": [[w, p] for w, p in self.blend],
            "corpora": [{k: v for k, v in c.state_dict().items() if k not in ("consumed_samples", "epoch")}
                        for c in self.corpora],
        }

    def load_state_dict(self, state: dict) -> None:
        """Resumes at `state["consumed_samples"]`.

        Raises:
            ValueError: the state was saved for another stream (other corpora, weights, seed, ...).
        """
        if "blend" not in state:
            raise ValueError("data state mismatch: the checkpoint was saved for a single corpus, this run "
                             f"blends {len(self.blend)}; the sample stream would differ")
        weights = [float(w) for w, _ in state["blend"]]
        if len(weights) != len(self.blend) or weights != [w for w, _ in self.blend]:
            raise ValueError(f"data state mismatch: checkpoint has blend weights {weights}, this run has "
                             f"{[w for w, _ in self.blend]}; the sample stream would differ")
        for corpus, saved in zip(self.corpora, state["corpora"]):
            corpus.load_state_dict({**saved, "consumed_samples": 0})
        self.consumed_samples = int(state["consumed_samples"])

    def __repr__(self) -> str:
        parts = ", ".join(f"{w:g} {n}" for (w, _), n in zip(self.blend, self.names))
        return f"BlendedDataset({parts}, seq_length={self.seq_length}, dp={self.dp_rank}/{self.dp_world_size})"


def open_dataset(blend: Blend, seq_length: int, **kwargs) -> SampleStream:
    """One corpus (`[(w, prefix)]`): a `PackedDocumentDataset`, exactly as without blending;
    several: a `BlendedDataset`."""
    if len(blend) == 1:
        return PackedDocumentDataset(blend[0][1], seq_length, **kwargs)
    return BlendedDataset(blend, seq_length, **kwargs)
