"""`Tokenizer`: a small wrapper over a sentencepiece model.

Token ids are plain Python ints; `vocab_size` is the tokenizer's own size, which must not
exceed the model's (padded) vocabulary size (see `megatron_infini.data.dataset.check_vocab`).
"""

from __future__ import annotations

import os
from typing import List, Sequence


class Tokenizer:
    """A sentencepiece tokenizer with BOS / EOS / PAD ids.

    Args:
        model_path: path to a sentencepiece `.model` file (see `tools/train_tokenizer.py`).

    Raises:
        ValueError: the file is missing or is not a sentencepiece model, or the model has no
            EOS id (documents are joined with EOS when packing).
    """

    def __init__(self, model_path: str | os.PathLike) -> None:
        import sentencepiece as spm

        self.model_path = os.fspath(model_path)
        if not os.path.isfile(self.model_path):
            raise ValueError(
                f"tokenizer model not found: {self.model_path!r} "
                "(train one with tools/train_tokenizer.py)"
            )
        self._sp = spm.SentencePieceProcessor()
        try:
            self._sp.Load(self.model_path)
        except (OSError, RuntimeError) as e:
            raise ValueError(f"not a sentencepiece model: {self.model_path!r} ({e})") from None
        if self._sp.eos_id() < 0:
            raise ValueError(f"tokenizer {self.model_path!r} has no EOS id; retrain it with one")

    @property
    def vocab_size(self) -> int:
        """Number of pieces; every id is in `[0, vocab_size)`."""
        return self._sp.GetPieceSize()

    @property
    def bos_id(self) -> int:
        """Beginning-of-sequence id (-1 when the model has none)."""
        return self._sp.bos_id()

    @property
    def eos_id(self) -> int:
        """End-of-sequence id, appended to every document by preprocessing."""
        return self._sp.eos_id()

    @property
    def pad_id(self) -> int:
        """Padding id: the model's `<pad>` when it has one, else EOS."""
        pad = self._sp.pad_id()
        return pad if pad >= 0 else self.eos_id

    def encode(self, text: str, bos: bool = False, eos: bool = False) -> List[int]:
        """Token ids of `text`, optionally with BOS prepended and EOS appended."""
        ids = self._sp.EncodeAsIds(text)
        if bos:
            if self.bos_id < 0:
                raise ValueError(f"tokenizer {self.model_path!r} has no BOS id")
            ids = [self.bos_id] + ids
        if eos:
            ids = ids + [self.eos_id]
        return ids

    def decode(self, ids: Sequence[int]) -> str:
        """Text of `ids` (control ids such as BOS / EOS / PAD decode to nothing)."""
        return self._sp.DecodeIds([int(i) for i in ids])

    def id_to_piece(self, token_id: int) -> str:
        """The piece string of one id (for debugging and tests)."""
        return self._sp.IdToPiece(int(token_id))

    def __repr__(self) -> str:
        return f"Tokenizer({self.model_path!r}, vocab_size={self.vocab_size})"
