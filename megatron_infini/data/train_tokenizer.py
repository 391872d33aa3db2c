"""Train a sentencepiece tokenizer from text / JSONL documents.

The model is lossless (`decode(encode(text)) == text`): identity normalisation, whitespace
kept as is, no dummy prefix, byte fallback for unseen characters (newlines included). Every
digit is its own piece (passkey retrieval reads numbers), and ids are fixed:
unk 0, bos 1, eos 2, pad 3. Printable ASCII characters are always pieces.

    python tools/train_tokenizer.py --input corpus.jsonl --vocab-size 4096 --output-prefix out/tok
"""

from __future__ import annotations

import argparse
import io
import os
import string
import sys
import time
from typing import Iterator, Sequence

from megatron_infini.data.documents import iter_documents, resolve_inputs

MODEL_TYPES = ("bpe", "unigram")
# sentencepiece's limit on one training "sentence" (bytes); longer lines are split.
_MAX_SENTENCE_BYTES = 4096
# Printable ASCII always gets its own pieces (digits above all), even when the corpus lacks it.
_REQUIRED_CHARS = string.digits + string.ascii_letters + string.punctuation
# unk, bos, eos, pad, the 256 byte-fallback pieces and the required characters.
_RESERVED_PIECES = 4 + 256 + len(_REQUIRED_CHARS)


def _training_lines(files, json_key: str) -> Iterator[str]:
    """Documents split into lines: sentencepiece trains on newline-free sentences."""
    for _, text in iter_documents(files, json_key):
        for line in text.split("\n"):
            while line:
                yield line[:_MAX_SENTENCE_BYTES // 4]
                line = line[_MAX_SENTENCE_BYTES // 4:]


def train_tokenizer(
    inputs: Sequence[str | os.PathLike],
    vocab_size: int,
    output_prefix: str | os.PathLike,
    model_type: str = "bpe",
    json_key: str = "text",
    num_threads: int = 2,
    verbose: bool = False,
) -> str:
    """Trains a sentencepiece model; returns the path of the written `.model` file.

    Args:
        inputs: text files (one document each), JSONL files, or directories of them.
        vocab_size: number of pieces, including the 4 special and 256 byte pieces.
        output_prefix: writes `{output_prefix}.model` and `{output_prefix}.vocab`.
        model_type: "bpe" or "unigram".
        json_key: JSONL field holding the document text.

    Raises:
        ValueError: bad arguments or inputs (checked before training starts), or a vocabulary
            too large for the corpus.
    """
    if model_type not in MODEL_TYPES:
        raise ValueError(f"model_type must be one of {MODEL_TYPES}, got {model_type!r}")
    if vocab_size <= _RESERVED_PIECES:
        raise ValueError(
            f"vocab_size must be > {_RESERVED_PIECES} (4 specials, 256 bytes, printable ASCII), got {vocab_size}"
        )
    files = resolve_inputs(inputs, json_key)
    output_prefix = os.fspath(output_prefix)
    out_dir = os.path.dirname(output_prefix) or "."
    os.makedirs(out_dir, exist_ok=True)
    if not os.access(out_dir, os.W_OK):
        raise ValueError(f"output directory is not writable: {out_dir!r}")

    import sentencepiece as spm

    try:
        spm.SentencePieceTrainer.Train(
            sentence_iterator=_training_lines(files, json_key),
            model_writer=(model := io.BytesIO()),
            vocab_size=vocab_size,
            model_type=model_type,
            character_coverage=1.0,
            byte_fallback=True,
            split_digits=True,
            required_chars=_REQUIRED_CHARS,
            normalization_rule_name="identity",
            remove_extra_whitespaces=False,
            add_dummy_prefix=False,
            unk_id=0, bos_id=1, eos_id=2, pad_id=3,
            max_sentence_length=_MAX_SENTENCE_BYTES,
            num_threads=num_threads,
            minloglevel=0 if verbose else 2,
        )
    except RuntimeError as e:
        # e.g. "Vocabulary size too high (5000). Please set it to a value <= 3712."
        raise ValueError(f"sentencepiece training failed: {e}") from None
    model_path = output_prefix + ".model"
    with open(model_path, "wb") as f:
        f.write(model.getvalue())
    proto = spm.SentencePieceProcessor(model_proto=model.getvalue())
    with open(output_prefix + ".vocab", "w", encoding="utf-8") as f:
        for i in range(proto.GetPieceSize()):
            f.write(f"{proto.IdToPiece(i)}\t{proto.GetScore(i)}\n")
    return model_path


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        prog="train_tokenizer", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--input", nargs="+", required=True, help="text / JSONL files or directories")
    parser.add_argument("--vocab-size", type=int, required=True)
    parser.add_argument("--output-prefix", required=True, help="writes PREFIX.model and PREFIX.vocab")
    parser.add_argument("--model-type", default="bpe", choices=MODEL_TYPES)
    parser.add_argument("--json-key", default="text", help="JSONL field with the document text")
    parser.add_argument("--num-threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--verbose", action="store_true", help="show sentencepiece's own log")
    args = parser.parse_args(argv)
    start = time.time()
    try:
        path = train_tokenizer(
            args.input, args.vocab_size, args.output_prefix, args.model_type, args.json_key,
            args.num_threads, args.verbose,
        )
    except ValueError as e:
        print(f"train_tokenizer: error: {e}", file=sys.stderr)
        return 2
    from megatron_infini.data.tokenizer import Tokenizer

    tok = Tokenizer(path)
    print(
        f"trained a {args.model_type} tokenizer in {time.time() - start:.1f} s: {path} "
        f"(vocab_size={tok.vocab_size}, bos={tok.bos_id}, eos={tok.eos_id}, pad={tok.pad_id}, "
        f"inputs={len(args.input)})"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
