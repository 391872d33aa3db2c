"""`PackedDocumentDataset`: fixed-length training sequences cut from whole, packed documents.

The token stream of epoch `e` is every document of an indexed dataset (see `preprocess`),
each ending in EOS, concatenated in the order `permutation(num_documents)` drawn from
`numpy.random.default_rng([seed, e])` (or in file order with `shuffle=False`). Documents
are never truncated or split into separate samples: long documents simply run across
consecutive samples, which is what a recurrent memory needs to see.

Sample `k` of an epoch is the window `stream[k * L : k * L + L + 1]` with `L = seq_length`
(inputs `[:-1]`, labels `[1:]`; consecutive windows share one token, as in Megatron's GPT
dataset). An epoch has `(num_tokens - 1) // L` samples; the few tokens left at the end of an
epoch are dropped (a different tail each epoch, since the order is reshuffled). Global sample
`g` is sample `g % len(ds)` of epoch `g // len(ds)`, so the sample stream is endless.

Data parallelism follows Megatron's `MegatronPretrainingSampler`: each micro step takes the
next `micro_batch_size * dp_world_size` global samples, and rank `r` takes the contiguous
block `[r * b, (r + 1) * b)` of them. The position is one global number, `consumed_samples`,
identical on every rank, so a checkpoint resumes at exactly the next sample, also with a
different data-parallel size.

Shapes: a batch is a `torch.LongTensor` `[b, seq_length + 1]`.
"""

from __future__ import annotations

import os
from typing import Iterator, Optional

import numpy as np

from megatron_infini.data.preprocess import indexed_dataset_module, read_metadata


def check_vocab(tokenizer_vocab_size: int, model_vocab_size: int) -> None:
    """Raises ValueError when the tokenizer emits ids the model's embedding cannot hold.

    The model's vocabulary may be larger (Megatron pads it to a multiple of 128 times the
    tensor-parallel size); it must not be smaller.
    """
    if tokenizer_vocab_size > model_vocab_size:
        raise ValueError(
            f"vocab_size mismatch: the tokenizer has {tokenizer_vocab_size} tokens but the model's "
            f"vocab_size is {model_vocab_size}; ids >= {model_vocab_size} would index past the "
            f"embedding. Set the model's vocab_size to at least {tokenizer_vocab_size}."
        )


def check_idx_size(path: str, header_len: int) -> None:
    """Raises ValueError naming the file when a Megatron-core .idx is shorter than its own header
    says: version <Q, dtype code <B, sequence count <Q, document count <Q, then int32 lengths and
    int64 pointers per sequence and int64 document indices."""
    import struct

    with open(path, "rb") as f:
        head = f.read(header_len + 25)[header_len:]
    size = os.path.getsize(path)
    if len(head) < 25:
        raise ValueError(f"{path} is truncated ({size} bytes, shorter than its header); preprocess the data again")
    _, _, sequences, documents = struct.unpack("<QBQQ", head)
    expected = header_len + 25 + 12 * sequences + 8 * documents
    if size < expected:
        raise ValueError(f"{path} is truncated: {size} bytes, its header describes {sequences} sequences in "
                         f"{expected} bytes; preprocess the data again")


def check_bin_size(prefix: str, indexed) -> None:
    """Raises ValueError naming the file when PREFIX.bin is shorter or longer than its index says
    (a copy cut short, or a .bin from another preprocessing run)."""
    index = getattr(indexed, "index", None)
    pointers, lengths = getattr(index, "sequence_pointers", None), getattr(index, "sequence_lengths", None)
    if pointers is None or lengths is None or not len(lengths):
        return  # another Megatron reader layout: nothing to compare with
    expected = int(pointers[-1]) + int(lengths[-1]) * int(index.dtype_size)
    actual = os.path.getsize(prefix + ".bin")
    if actual != expected:
        raise ValueError(f"{prefix}.bin has {actual} bytes but {prefix}.idx describes {expected}: the .bin is "
                         f"{'truncated' if actual < expected else 'not the one indexed'}; preprocess the data again")


class SampleStream:
    """Megatron's pretraining sampler over an endless stream of samples `self[g]` (g >= 0).

    Subclasses set `consumed_samples`, `dp_rank`, `dp_world_size` and define `__getitem__`.
    """

    consumed_samples: int
    dp_rank: int
    dp_world_size: int

    def rank_sample_indices(self, consumed_samples: int, micro_batch_size: int) -> range:
        """Global indices of this rank's micro batch that starts at `consumed_samples`."""
        start = consumed_samples + self.dp_rank * micro_batch_size
        return range(start, start + micro_batch_size)

    def batches(self, micro_batch_size: int, num_batches: Optional[int] = None) -> Iterator["torch.Tensor"]:
        """This rank's micro batches, `torch.LongTensor [micro_batch_size, seq_length + 1]`.

        Endless unless `num_batches` is given. Each yielded batch counts as consumed:
        `consumed_samples` grows by `micro_batch_size * dp_world_size` before the yield, so a
        `state_dict()` taken after training on it resumes with the next batch.
        """
        import torch

        if micro_batch_size < 1:
            raise ValueError(f"micro_batch_size must be >= 1, got {micro_batch_size}")
        n = 0
        while num_batches is None or n < num_batches:
            indices = self.rank_sample_indices(self.consumed_samples, micro_batch_size)
            batch = torch.from_numpy(np.stack([self[g] for g in indices]))  # [b, seq_length + 1]
            self.consumed_samples += micro_batch_size * self.dp_world_size
            n += 1
            yield batch


class PackedDocumentDataset(SampleStream):
    """Endless, seeded stream of `seq_length + 1`-token samples over one indexed dataset.

    Args:
        path_prefix: prefix of `.bin` / `.idx` files written by `tools/preprocess_data.py`.
        seq_length: tokens per training sequence `L`; samples have `L + 1` tokens.
        seed: seed of the per-epoch document order.
        shuffle: reshuffle the documents every epoch; False keeps file order (evaluation).
        dp_rank, dp_world_size: this rank's data-parallel coordinates.
        model_vocab_size: when given, checked against the tokenizer recorded in
            `{path_prefix}.json` (see `check_vocab`).

    Raises:
        ValueError: missing or unreadable files, bad arguments, a tokenizer larger than the
            model's vocabulary, or fewer than `seq_length + 1` tokens in the dataset.
    """

    def __init__(
        self,
        path_prefix: str | os.PathLike,
        seq_length: int,
        seed: int = 1234,
        shuffle: bool = True,
        dp_rank: int = 0,
        dp_world_size: int = 1,
        model_vocab_size: Optional[int] = None,
    ) -> None:
        self.path_prefix = os.fspath(path_prefix)
        if seq_length < 1:
            raise ValueError(f"seq_length must be >= 1, got {seq_length}")
        if dp_world_size < 1 or not 0 <= dp_rank < dp_world_size:
            raise ValueError(f"need 0 <= dp_rank < dp_world_size, got dp_rank={dp_rank}, "
                             f"dp_world_size={dp_world_size}")
        missing = [p for p in (self.path_prefix + ".bin", self.path_prefix + ".idx") if not os.path.isfile(p)]
        if missing:
            raise ValueError(
                f"data not found: {missing} (make it with tools/preprocess_data.py "
                f"--output-prefix {self.path_prefix})"
            )
        self.metadata = read_metadata(self.path_prefix)
        if model_vocab_size is not None and self.metadata is not None:
            check_vocab(self.metadata["tokenizer_vocab_size"], model_vocab_size)

        indexed = indexed_dataset_module()
        with open(self.path_prefix + ".idx", "rb") as f:
            header = f.read(len(indexed._INDEX_HEADER))
        if header != indexed._INDEX_HEADER:
            raise ValueError(f"cannot read indexed dataset {self.path_prefix!r}: "
                             f"{self.path_prefix}.idx is not a Megatron-core index file")
        check_idx_size(self.path_prefix + ".idx", len(indexed._INDEX_HEADER))
        try:
            self._indexed = indexed.IndexedDataset(self.path_prefix)
        except (AssertionError, OSError, ValueError) as e:
            raise ValueError(f"cannot read indexed dataset {self.path_prefix!r}: {e}") from None
        check_bin_size(self.path_prefix, self._indexed)
        self.seq_length = seq_length
        self.seed = seed
        self.shuffle = shuffle
        self.dp_rank = dp_rank
        self.dp_world_size = dp_world_size
        self.doc_lengths = np.asarray(self._indexed.sequence_lengths, dtype=np.int64)
        self.num_tokens = int(self.doc_lengths.sum())
        if self.num_tokens < seq_length + 1:
            raise ValueError(
                f"too little data in {self.path_prefix!r}: {self.num_tokens} tokens in "
                f"{len(self.doc_lengths)} documents, need at least seq_length + 1 = {seq_length + 1}"
            )
        self.consumed_samples = 0
        """Global samples handed out so far (over all data-parallel ranks)."""
        self._epoch_cache: tuple[int, np.ndarray, np.ndarray] | None = None

    # ----- the sample stream -----

    def __len__(self) -> int:
        """Samples per epoch."""
        return (self.num_tokens - 1) // self.seq_length

    @property
    def num_documents(self) -> int:
        return len(self.doc_lengths)

    @property
    def epoch(self) -> int:
        """Epoch of the next sample to be handed out."""
        return self.consumed_samples // len(self)

    def document(self, index: int) -> np.ndarray:
        """Tokens of document `index` in file order (EOS included), int64 `[doc_len]`."""
        return np.asarray(self._indexed.get(index), dtype=np.int64)

    def document_order(self, epoch: int) -> np.ndarray:
        """Document indices in the order of `epoch`'s stream, int64 `[num_documents]`."""
        return self._epoch(epoch)[0]

    def _epoch(self, epoch: int) -> tuple[np.ndarray, np.ndarray]:
        if self._epoch_cache is None or self._epoch_cache[0] != epoch:
            if self.shuffle:
                order = np.random.default_rng([self.seed, epoch]).permutation(self.num_documents)
            else:
                order = np.arange(self.num_documents)
            ends = np.cumsum(self.doc_lengths[order])  # stream offset just past each document
            self._epoch_cache = (epoch, order, ends)
        return self._epoch_cache[1], self._epoch_cache[2]

    def __getitem__(self, global_index: int) -> np.ndarray:
        """Tokens of global sample `global_index` (any index >= 0), int64 `[seq_length + 1]`."""
        if global_index < 0:
            raise IndexError(f"sample index must be >= 0, got {global_index}")
        epoch, k = divmod(int(global_index), len(self))
        order, ends = self._epoch(epoch)
        start, stop = k * self.seq_length, k * self.seq_length + self.seq_length + 1
        out = np.empty(stop - start, dtype=np.int64)
        i = int(np.searchsorted(ends, start, side="right"))  # first document reaching past start
        pos = start
        while pos < stop:
            doc_start = int(ends[i] - self.doc_lengths[order[i]])
            take = min(stop, int(ends[i])) - pos
            out[pos - start:pos - start + take] = self._indexed.get(int(order[i]), pos - doc_start, take)
            pos += take
            i += 1
        return out

    # ----- checkpointing -----

    def state_dict(self) -> dict:
        """Position in the stream plus what defines the stream (checked on load)."""
        return {
            "consumed_samples": self.consumed_samples,
            "epoch": self.epoch,
            "seed": self.seed,
            "shuffle": self.shuffle,
            "seq_length": self.seq_length,
            "num_tokens": self.num_tokens,
            "num_documents": self.num_documents,
        }

    def load_state_dict(self, state: dict) -> None:
        """Resumes at `state["consumed_samples"]`.

        Raises:
            ValueError: the state was saved for another stream (seed, shuffle, seq_length or data).
        """
        if "blend" in state:
            raise ValueError(f"data state mismatch: the checkpoint was saved for a blend of {len(state['blend'])} "
                             f"corpora, this run reads one ({self.path_prefix!r}); the sample stream would differ")
        for key in ("seed", "shuffle", "seq_length", "num_tokens", "num_documents"):
            if key in state and state[key] != getattr(self, key):
                raise ValueError(
                    f"data state mismatch: checkpoint has {key}={state[key]!r}, this dataset has "
                    f"{key}={getattr(self, key)!r} ({self.path_prefix!r}); the sample stream would differ"
                )
        self.consumed_samples = int(state["consumed_samples"])

    def __repr__(self) -> str:
        return (f"PackedDocumentDataset({self.path_prefix!r}, documents={self.num_documents}, "
                f"tokens={self.num_tokens}, seq_length={self.seq_length}, samples/epoch={len(self)}, "
                f"dp={self.dp_rank}/{self.dp_world_size})")
