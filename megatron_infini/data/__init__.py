"""Data pipeline: tokenizer, preprocessing into indexed shards, packed training sequences.

- `tokenizer`: `Tokenizer`, one interface over sentencepiece models and Hugging Face
  `tokenizer.json` files, chosen by the file given.
- `train_tokenizer`: trains either kind from text / JSONL files (`main(argv)` is the CLI).
- `preprocess`: text / JSONL -> Megatron-core indexed dataset (`.bin` + `.idx`) (`main(argv)`).
- `dataset`: `PackedDocumentDataset`, fixed-length sequences cut from whole documents packed
  back to back in a seeded per-epoch order, sharded over data-parallel ranks, resumable.
- `blend`: `BlendedDataset`, Megatron's weighted list of corpora, sampled deterministically.
- `packing`: document boundaries of a micro batch from EOS (Megatron's reset_attention_mask,
  reset_position_ids, eod_mask_loss), as THD `cu_seqlens` for packed sequences.

The shipped demo corpus (7 Shakespeare plays for training, The Tempest held out) and its
tokenizer live in `corpus/`; see `corpus/README.md`. Nothing heavy is imported here.
"""

from pathlib import Path

CORPUS_DIR = Path(__file__).resolve().parent / "corpus"
"""Directory of the shipped demo corpus, its tokenizer and its preprocessed shards."""
SHAKESPEARE_TOKENIZER = CORPUS_DIR / "tokenizer.model"
"""The shipped sentencepiece model (BPE, 4096 pieces) trained on the training plays."""
SHAKESPEARE_TRAIN_PREFIX = CORPUS_DIR / "shakespeare_train"
"""Path prefix of the shipped training shards (`.bin` + `.idx`, Megatron-core format)."""
SHAKESPEARE_VALID_PREFIX = CORPUS_DIR / "shakespeare_valid"
"""Path prefix of the shipped held-out validation document (The Tempest)."""
