"""Train a tokenizer from text / JSONL documents: sentencepiece or Hugging Face `tokenizers`.

Both kinds are lossless (`decode(encode(text)) == text`), split every digit into its own
piece (passkey retrieval reads numbers) and fix the special ids: unk 0, bos 1, eos 2, pad 3
(`<unk> <s> </s> <pad>`).

- `--kind sentencepiece` (default) writes PREFIX.model and PREFIX.vocab: identity
  normalisation, whitespace kept as is, no dummy prefix, byte fallback for unseen characters
  (newlines included); printable ASCII characters are always pieces.
- `--kind huggingface` writes PREFIX.json, a `tokenizer.json` (the format of Llama 3): byte-level
  BPE, so every byte is a token and nothing is unknown.

    python tools/train_tokenizer.py --input corpus.jsonl --vocab-size 4096 --output-prefix out/tok
    python tools/train_tokenizer.py --input corpus.jsonl --vocab-size 4096 --output-prefix out/tok --kind huggingface
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
KINDS = ("sentencepiece", "huggingface")
SPECIAL_TOKENS = ("<unk>", "<s>", "</s>", "<pad>")  # ids 0..3 in both kinds
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
    kind: str = "sentencepiece",
) -> str:
    """Trains a tokenizer; returns the path of the written `.model` (sentencepiece) or `.json`
    (Hugging Face) file.

    Args:
        inputs: text files (one document each), JSONL files, or directories of them.
        vocab_size: number of pieces, including the 4 special and 256 byte pieces.
        output_prefix: writes `{output_prefix}.model` and `{output_prefix}.vocab`.
        model_type: "bpe" or "unigram" (sentencepiece only).
        json_key: JSONL field holding the document text.
        kind: "sentencepiece" (PREFIX.model + PREFIX.vocab) or "huggingface" (PREFIX.json).

    Raises:
        ValueError: bad arguments or inputs (checked before training starts), or a vocabulary
            too large for the corpus.
    """
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    if model_type not in MODEL_TYPES:
        raise ValueError(f"model_type must be one of {MODEL_TYPES}, got {model_type!r}")
    if kind == "huggingface" and model_type != "bpe":
        raise ValueError(f"model_type {model_type!r} needs kind sentencepiece (huggingface trains byte-level BPE)")
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
    if kind == "huggingface":
        return _train_huggingface(files, vocab_size, output_prefix, json_key, verbose)

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


def _train_huggingface(files, vocab_size: int, output_prefix: str, json_key: str, verbose: bool) -> str:
    """Byte-level BPE with `tokenizers`; digits split before the byte-level split."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
    ])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(SPECIAL_TOKENS),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=verbose)
    tok.train_from_iterator((text for _, text in iter_documents(files, json_key)), trainer=trainer)
    if tok.get_vocab_size() != vocab_size:  # the corpus ran out of merges
        raise ValueError(f"Vocabulary size too high ({vocab_size}): the corpus gives {tok.get_vocab_size()} "
                         "tokens; set it to a value <= that")
    # Hugging Face's `tokenizer(text)` prepends <s> as Llama's does; our encode(bos=...) decides itself.
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B",
                                                       special_tokens=[("<s>", SPECIAL_TOKENS.index("<s>"))])
    path = output_prefix + ".json"
    tmp = f"{path}.tmp{os.getpid()}"
    tok.save(tmp)
    os.replace(tmp, path)
    return path


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        prog="train_tokenizer", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--input", nargs="+", required=True, help="text / JSONL files or directories")
    parser.add_argument("--vocab-size", type=int, required=True)
    parser.add_argument("--output-prefix", required=True,
                        help="writes PREFIX.model and PREFIX.vocab (sentencepiece) or PREFIX.json (huggingface)")
    parser.add_argument("--kind", default="sentencepiece", choices=KINDS,
                        help="sentencepiece model or Hugging Face tokenizers file (tokenizer.json format)")
    parser.add_argument("--model-type", default="bpe", choices=MODEL_TYPES, help="sentencepiece only")
    parser.add_argument("--json-key", default="text", help="JSONL field with the document text")
    parser.add_argument("--num-threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--verbose", action="store_true", help="show sentencepiece's own log")
    args = parser.parse_args(argv)
    start = time.time()
    try:
        path = train_tokenizer(
            args.input, args.vocab_size, args.output_prefix, args.model_type, args.json_key,
            args.num_threads, args.verbose, args.kind,
        )
    except ValueError as e:
        print(f"train_tokenizer: error: {e}", file=sys.stderr)
        return 2
    from megatron_infini.data.tokenizer import Tokenizer

    tok = Tokenizer(path)
    print(
        f"trained a {tok.kind} {args.model_type} tokenizer in {time.time() - start:.1f} s: {path} "
        f"(vocab_size={tok.vocab_size}, bos={tok.bos_id}, eos={tok.eos_id}, pad={tok.pad_id}, "
        f"inputs={len(args.input)})"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
