"""Tokenize text / JSONL documents into a Megatron-core indexed dataset.

Output, for `--output-prefix PREFIX`:

- `PREFIX.bin`: the token ids of all documents back to back, each document followed by EOS,
  as uint16 when the vocabulary fits (else int32);
- `PREFIX.idx`: Megatron-core's index (`megatron.core.datasets.indexed_dataset`, one sequence
  per document), readable by `IndexedDataset(PREFIX)` and by Megatron's own GPT datasets;
- `PREFIX.json`: what was done (tokenizer path and vocab size, counts), used by the training
  dataset to check the tokenizer against the model's vocabulary.

    python tools/preprocess_data.py --input corpus.jsonl --tokenizer tok.model --output-prefix out/train
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Sequence

import numpy as np

from megatron_infini.data.documents import iter_documents, resolve_inputs
from megatron_infini.data.tokenizer import Tokenizer

METADATA_SUFFIX = ".json"


def indexed_dataset_module():
    """`megatron.core.datasets.indexed_dataset`, imported on first use (it imports megatron.core,
    whose "Transformer Engine and Apex are not installed" warnings are noise here)."""
    import warnings

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Transformer Engine and Apex are not installed")
        from megatron.core.datasets import indexed_dataset
    return indexed_dataset


def read_metadata(prefix: str | os.PathLike) -> dict | None:
    """The `PREFIX.json` written by `preprocess`, or None when there is none."""
    path = os.fspath(prefix) + METADATA_SUFFIX
    if not os.path.isfile(path):
        return None
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def preprocess(
    inputs: Sequence[str | os.PathLike],
    tokenizer: Tokenizer | str | os.PathLike,
    output_prefix: str | os.PathLike,
    json_key: str = "text",
    log_interval_s: float = 5.0,
    log=print,
) -> dict:
    """Tokenizes documents into `{output_prefix}.bin/.idx/.json`; returns the metadata dict.

    Empty documents are skipped. The files are written under temporary names and renamed at
    the end, so a failed run leaves no half-written dataset.

    Raises:
        ValueError: bad inputs or tokenizer (checked before any work), or no non-empty document.
    """
    files = resolve_inputs(inputs, json_key)
    if not isinstance(tokenizer, Tokenizer):
        tokenizer = Tokenizer(tokenizer)
    output_prefix = os.fspath(output_prefix)
    out_dir = os.path.dirname(output_prefix) or "."
    os.makedirs(out_dir, exist_ok=True)
    if not os.access(out_dir, os.W_OK):
        raise ValueError(f"output directory is not writable: {out_dir!r}")

    indexed = indexed_dataset_module()
    dtype = indexed.DType.optimal_dtype(tokenizer.vocab_size)
    tmp = f"{output_prefix}.tmp{os.getpid()}"
    builder = indexed.IndexedDatasetBuilder(tmp + ".bin", dtype=dtype)
    n_docs = n_empty = n_tokens = 0
    start = last_log = time.time()
    try:
        for _, text in iter_documents(files, json_key):
            if not text.strip():
                n_empty += 1
                continue
            ids = tokenizer.encode(text, eos=True)
            builder.add_document(np.asarray(ids, dtype=dtype), [len(ids)])
            n_docs += 1
            n_tokens += len(ids)
            if log is not None and time.time() - last_log >= log_interval_s:
                last_log = time.time()
                elapsed = last_log - start
                log(f"  {n_docs} docs, {n_tokens} tokens ({n_docs / elapsed:.0f} docs/s, "
                    f"{n_tokens / elapsed:.0f} tokens/s)")
        if n_docs == 0:
            raise ValueError(f"no non-empty documents in {[str(f) for f in files]}")
        builder.finalize(tmp + ".idx")
        metadata = {
            "format": "megatron.core.datasets.indexed_dataset (one sequence per document)",
            "inputs": [str(f) for f in files],
            "json_key": json_key,
            "tokenizer": tokenizer.model_path,
            "tokenizer_vocab_size": tokenizer.vocab_size,
            "eos_id": tokenizer.eos_id,
            "eos_appended": True,
            "dtype": np.dtype(dtype).name,
            "num_documents": n_docs,
            "num_empty_documents_skipped": n_empty,
            "num_tokens": n_tokens,
        }
        with open(tmp + METADATA_SUFFIX, "w", encoding="utf-8") as f:
            json.dump(metadata, f, indent=1)
        for suffix in (".bin", ".idx", METADATA_SUFFIX):
            os.replace(tmp + suffix, output_prefix + suffix)
    finally:
        builder.data_file.close()
        for suffix in (".bin", ".idx", METADATA_SUFFIX):
            if os.path.exists(tmp + suffix):
                os.remove(tmp + suffix)
    if log is not None:
        elapsed = max(time.time() - start, 1e-9)
        log(f"wrote {output_prefix}.bin/.idx/.json: {n_docs} docs, {n_tokens} tokens "
            f"({n_tokens / n_docs:.0f} tokens/doc, {n_empty} empty skipped) in {elapsed:.1f} s "
            f"({n_tokens / elapsed:.0f} tokens/s)")
    return metadata


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        prog="preprocess_data", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--input", nargs="+", required=True,
                        help="text files (one document each), JSONL files, or directories of them")
    parser.add_argument("--tokenizer", required=True, help="sentencepiece .model file")
    parser.add_argument("--output-prefix", required=True, help="writes PREFIX.bin, PREFIX.idx, PREFIX.json")
    parser.add_argument("--json-key", default="text", help="JSONL field with the document text")
    parser.add_argument("--log-interval", type=float, default=5.0, help="seconds between progress lines")
    args = parser.parse_args(argv)
    try:
        preprocess(args.input, args.tokenizer, args.output_prefix, args.json_key, args.log_interval)
    except ValueError as e:
        print(f"preprocess_data: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
