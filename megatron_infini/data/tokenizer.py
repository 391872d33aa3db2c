"""`Tokenizer`: one interface over sentencepiece models and Hugging Face `tokenizers` files.

The kind is chosen by the file given (`load_tokenizer` / `Tokenizer(path)`):

- `*.model`: a sentencepiece model (`tools/train_tokenizer.py --kind sentencepiece`, Llama 2);
- `*.json`: a Hugging Face `tokenizers` file (`tokenizer.json` of Llama 3, or
  `tools/train_tokenizer.py --kind huggingface`);
- a directory: its `tokenizer.json`, else its `tokenizer.model` (a Hugging Face model directory).

Token ids are plain Python ints; `vocab_size` is the tokenizer's own size, which must not
exceed the model's (padded) vocabulary size (see `megatron_infini.data.dataset.check_vocab`).
`fingerprint` identifies the vocabulary (a hash of the kind and every id's piece): it is
recorded with the preprocessed shards and in checkpoints, so data tokenized with another
tokenizer is refused even when the vocabulary sizes agree.
"""

from __future__ import annotations

import hashlib
import json
import os
from typing import Dict, List, Optional, Sequence, Union

KINDS = ("sentencepiece", "huggingface")

# Special tokens looked up by name when a tokenizer.json has no tokenizer_config.json beside it
# (ours: <s> </s> <pad>; Llama 3: <|begin_of_text|> <|end_of_text|>).
_SPECIAL_NAMES = {
    "bos": ("<s>", "<|begin_of_text|>", "<bos>", "<|startoftext|>"),
    "eos": ("</s>", "<|end_of_text|>", "<|endoftext|>", "<eos>"),
    "pad": ("<pad>", "<|pad|>"),
}


def resolve_tokenizer_path(path: str | os.PathLike) -> tuple:
    """(kind, file) for a tokenizer path; raises ValueError when there is no tokenizer there."""
    path = os.fspath(path)
    if os.path.isdir(path):
        for name, kind in (("tokenizer.json", "huggingface"), ("tokenizer.model", "sentencepiece")):
            if os.path.isfile(os.path.join(path, name)):
                return kind, os.path.join(path, name)
        raise ValueError(f"tokenizer directory {path!r} has no tokenizer.json or tokenizer.model")
    if not os.path.isfile(path):
        raise ValueError(f"tokenizer model not found: {path!r} (train one with tools/train_tokenizer.py)")
    if path.endswith(".json"):
        return "huggingface", path
    return "sentencepiece", path


def load_tokenizer(path: str | os.PathLike) -> "Tokenizer":
    """The tokenizer at `path` (sentencepiece `.model`, `tokenizer.json`, or a directory)."""
    return Tokenizer(path)


class Tokenizer:
    """A tokenizer with BOS / EOS / PAD ids; `Tokenizer(path)` returns the subclass for the file.

    Args:
        model_path: a sentencepiece `.model`, a Hugging Face `tokenizer.json`, or a directory
            holding one of them.

    Raises:
        ValueError: the file is missing or is not a tokenizer of its kind, or it has no EOS id
            (documents are joined with EOS when packing).
    """

    kind: str = ""

    def __new__(cls, model_path: str | os.PathLike = ""):
        if cls is Tokenizer:
            kind, _ = resolve_tokenizer_path(model_path)
            cls = SentencePieceTokenizer if kind == "sentencepiece" else HuggingFaceTokenizer
        return super().__new__(cls)

    def __init__(self, model_path: str | os.PathLike) -> None:
        _, self.model_path = resolve_tokenizer_path(model_path)
        self._load()
        if self.eos_id < 0:
            raise ValueError(f"tokenizer {self.model_path!r} has no EOS id; retrain it with one")
        self._fingerprint: Optional[str] = None

    # ---------------------------------------------------------------- per kind

    def _load(self) -> None:
        raise NotImplementedError

    @property
    def vocab_size(self) -> int:
        """Number of ids; every id is in `[0, vocab_size)`."""
        raise NotImplementedError

    @property
    def bos_id(self) -> int:
        """Beginning-of-sequence id (-1 when the tokenizer has none)."""
        raise NotImplementedError

    @property
    def eos_id(self) -> int:
        """End-of-sequence id, appended to every document by preprocessing."""
        raise NotImplementedError

    @property
    def pad_id(self) -> int:
        """Padding id: the tokenizer's own pad token when it has one, else EOS."""
        raise NotImplementedError

    def _encode_plain(self, texts: List[str]) -> List[List[int]]:
        raise NotImplementedError

    def decode(self, ids: Sequence[int]) -> str:
        """Text of `ids` (special ids such as BOS / EOS / PAD decode to nothing)."""
        raise NotImplementedError

    def id_to_piece(self, token_id: int) -> str:
        """The piece string of one id (for debugging and tests)."""
        raise NotImplementedError

    def export_files(self) -> Dict[str, Union[str, dict]]:
        """Files a Hugging Face model directory needs for `AutoTokenizer`: name -> the path of
        a file to copy, or a dict to write as JSON (see `write_export_files`)."""
        raise NotImplementedError

    # ---------------------------------------------------------------- shared

    def encode(self, text: str, bos: bool = False, eos: bool = False) -> List[int]:
        """Token ids of `text`, optionally with BOS prepended and EOS appended."""
        return self.encode_batch([text], bos=bos, eos=eos)[0]

    def encode_batch(self, texts: Sequence[str], bos: bool = False, eos: bool = False) -> List[List[int]]:
        """`encode` of every text (one call into the tokenizer library)."""
        if bos and self.bos_id < 0:
            raise ValueError(f"tokenizer {self.model_path!r} has no BOS id")
        out = self._encode_plain(list(texts))
        head, tail = ([self.bos_id] if bos else []), ([self.eos_id] if eos else [])
        return [head + ids + tail for ids in out] if (head or tail) else out

    @property
    def fingerprint(self) -> str:
        """16 hex digits of a hash of the kind and the piece of every id."""
        if self._fingerprint is None:
            h = hashlib.sha256(self.kind.encode())
            for i in range(self.vocab_size):
                h.update(b"\0" + self.id_to_piece(i).encode("utf-8", "surrogatepass"))
            self._fingerprint = h.hexdigest()[:16]
        return self._fingerprint

    def source_files(self) -> Dict[str, str]:
        """The tokenizer's files under the names a directory of them needs (`Tokenizer(dir)`
        loads it): name -> path. Checkpoints keep a copy in `tokenizer/`."""
        if self.kind == "sentencepiece":
            return {"tokenizer.model": self.model_path}
        files = {"tokenizer.json": self.model_path}
        beside = os.path.join(os.path.dirname(self.model_path), "tokenizer_config.json")
        if os.path.basename(self.model_path) == "tokenizer.json" and os.path.isfile(beside):
            files["tokenizer_config.json"] = beside
        return files

    def describe(self) -> dict:
        """What preprocessing and checkpoints record about the tokenizer."""
        return {"kind": self.kind, "path": os.path.abspath(self.model_path), "vocab_size": self.vocab_size,
                "fingerprint": self.fingerprint, "bos_id": self.bos_id, "eos_id": self.eos_id}

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.model_path!r}, vocab_size={self.vocab_size})"


class SentencePieceTokenizer(Tokenizer):
    """A sentencepiece `.model` (ids as the model defines them)."""

    kind = "sentencepiece"

    def _load(self) -> None:
        import sentencepiece as spm

        self._sp = spm.SentencePieceProcessor()
        try:
            self._sp.Load(self.model_path)
        except (OSError, RuntimeError) as e:
            raise ValueError(f"not a sentencepiece model: {self.model_path!r} ({e})") from None

    @property
    def vocab_size(self) -> int:
        return self._sp.GetPieceSize()

    @property
    def bos_id(self) -> int:
        return self._sp.bos_id()

    @property
    def eos_id(self) -> int:
        return self._sp.eos_id()

    @property
    def pad_id(self) -> int:
        pad = self._sp.pad_id()
        return pad if pad >= 0 else self.eos_id

    def _encode_plain(self, texts: List[str]) -> List[List[int]]:
        return self._sp.EncodeAsIds(texts) if texts else []

    def decode(self, ids: Sequence[int]) -> str:
        return self._sp.DecodeIds([int(i) for i in ids])

    def id_to_piece(self, token_id: int) -> str:
        return self._sp.IdToPiece(int(token_id))

    def export_files(self) -> Dict[str, Union[str, dict]]:
        sp = self._sp

        def piece(i):
            return sp.IdToPiece(i) if i >= 0 else None

        config = {"tokenizer_class": "LlamaTokenizer", "bos_token": piece(sp.bos_id()),
                  "eos_token": piece(sp.eos_id()), "unk_token": piece(sp.unk_id()),
                  "pad_token": piece(sp.pad_id()), "add_bos_token": sp.bos_id() >= 0, "add_eos_token": False,
                  "legacy": False, "add_prefix_space": False, "clean_up_tokenization_spaces": False}
        return {"tokenizer.model": self.model_path, "tokenizer_config.json": config}


class HuggingFaceTokenizer(Tokenizer):
    """A Hugging Face `tokenizers` file (`tokenizer.json`). BOS / EOS / PAD come from a
    `tokenizer_config.json` beside it when there is one, else from their usual names."""

    kind = "huggingface"

    def _load(self) -> None:
        from tokenizers import Tokenizer as HFTokenizer

        try:
            self._tok = HFTokenizer.from_file(self.model_path)
        except Exception as e:  # tokenizers raises a bare Exception for unreadable files
            msg = str(e).splitlines()[0] if str(e) else type(e).__name__
            raise ValueError(f"not a Hugging Face tokenizer.json: {self.model_path!r} ({msg})") from None
        vocab = self._tok.get_vocab(with_added_tokens=True)
        self._size = max(vocab.values()) + 1 if vocab else 0
        self._special = {role: self._find_special(role) for role in _SPECIAL_NAMES}

    def _find_special(self, role: str) -> int:
        config = os.path.join(os.path.dirname(self.model_path), "tokenizer_config.json")
        if os.path.basename(self.model_path) == "tokenizer.json" and os.path.isfile(config):
            with open(config, encoding="utf-8") as fh:
                token = json.load(fh).get(f"{role}_token")
            if isinstance(token, dict):
                token = token.get("content")
            found = self._tok.token_to_id(token) if token else None
            return -1 if found is None else found
        for name in _SPECIAL_NAMES[role]:
            found = self._tok.token_to_id(name)
            if found is not None:
                return found
        return -1

    @property
    def vocab_size(self) -> int:
        return self._size

    @property
    def bos_id(self) -> int:
        return self._special["bos"]

    @property
    def eos_id(self) -> int:
        return self._special["eos"]

    @property
    def pad_id(self) -> int:
        return self._special["pad"] if self._special["pad"] >= 0 else self.eos_id

    def _encode_plain(self, texts: List[str]) -> List[List[int]]:
        return [e.ids for e in self._tok.encode_batch(texts, add_special_tokens=False)]

    def decode(self, ids: Sequence[int]) -> str:
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=True)

    def id_to_piece(self, token_id: int) -> str:
        return self._tok.id_to_token(int(token_id)) or ""

    def export_files(self) -> Dict[str, Union[str, dict]]:
        def token(i):
            return self._tok.id_to_token(i) if i >= 0 else None

        config = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": token(self.bos_id),
                  "eos_token": token(self.eos_id), "pad_token": token(self._special["pad"]),
                  "clean_up_tokenization_spaces": False}
        # a model directory's own tokenizer_config.json is kept as is
        return {"tokenizer_config.json": config, **self.source_files()}


def write_export_files(tokenizer: Tokenizer, out_dir: str) -> List[str]:
    """Writes the tokenizer's files for a Hugging Face model directory; returns their names."""
    import shutil

    names = []
    for name, content in tokenizer.export_files().items():
        dest = os.path.join(out_dir, name)
        if isinstance(content, dict):
            with open(dest, "w", encoding="utf-8") as fh:
                json.dump(content, fh, indent=1)
        else:
            shutil.copyfile(content, dest)
        names.append(name)
    return names
