"""Tokenize text / JSONL documents into a Megatron-core indexed dataset.

Output, for `--output-prefix PREFIX`:

- `PREFIX.bin`: the token ids of all documents back to back, each document followed by EOS,
  as uint16 when the vocabulary fits (else int32);
- `PREFIX.idx`: Megatron-core's index (`megatron.core.datasets.indexed_dataset`, one sequence
  per document), readable by `IndexedDataset(PREFIX)` and by Megatron's own GPT datasets;
- `PREFIX.json`: what was done (tokenizer path, kind, vocab size and fingerprint, counts), used
  by the trainer to refuse data made with another tokenizer and to check the model's vocabulary.

The tokenizer is a sentencepiece `.model`, a Hugging Face `tokenizer.json` or a directory
holding one (`megatron_infini.data.tokenizer`). `--workers N` encodes with N processes.

    python tools/preprocess_data.py --input corpus.jsonl --tokenizer tok.model --output-prefix out/train
    python tools/preprocess_data.py --input data/ --tokenizer llama3/tokenizer.json --output-prefix out/train --workers 16
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import sys
import time
from typing import Iterator, List, Optional, Sequence, Tuple

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


def check_tokenizer(meta: Optional[dict], tokenizer: Tokenizer, prefix: str) -> None:
    """Raises ValueError (one line) when the shards at `prefix`, described by `meta`
    (`read_metadata`), were made with another tokenizer: a different vocabulary size, or, where
    the shards record them, a different kind or fingerprint. Nothing to check when meta is None."""
    if meta is None:
        return
    ours = {"kind": tokenizer.kind, "vocab_size": tokenizer.vocab_size, "fingerprint": tokenizer.fingerprint}
    theirs = {k: meta.get(f"tokenizer_{k}") for k in ours}
    if all(theirs[k] in (None, ours[k]) for k in ours):
        return

    def show(d):
        return ", ".join(f"{k} {v}" for k, v in d.items() if v is not None)

    raise ValueError(
        f"{tokenizer.model_path!r} ({show(ours)}) is not the tokenizer {os.fspath(prefix)!r} was made with "
        f"({meta.get('tokenizer')!r}: {show(theirs)}); use the tokenizer the data was made with"
    )


class _Progress:
    """Progress of a run over `total` input bytes: a bar redrawn in place on a terminal, else a
    line every `interval_s` through `log`. Bytes are counted as characters read, so the bar is
    approximate for non-ASCII text."""

    def __init__(self, total: int, log, interval_s: float):
        self.total, self.log, self.interval_s = max(total, 1), log, interval_s
        self.tty = log is print and sys.stderr.isatty()
        self.start = self.last = time.time()
        self.done = self.docs = self.tokens = 0

    def update(self, chars: int, docs: int, tokens: int) -> None:
        self.done += chars
        self.docs += docs
        self.tokens += tokens
        now = time.time()
        if self.log is None or now - self.last < (0.5 if self.tty else self.interval_s):
            return
        self.last = now
        elapsed = max(now - self.start, 1e-9)
        frac = min(self.done / self.total, 0.999)
        eta = elapsed * (1 - frac) / max(frac, 1e-9)
        line = (f"{100 * frac:5.1f}% {self.docs} docs, {self.tokens} tokens, {self.tokens / elapsed:,.0f} tokens/s, "
                f"ETA {eta / 60:.1f} min")
        if self.tty:
            bar = "#" * int(30 * frac)
            print(f"\r[{bar:<30}] {line}", end="", file=sys.stderr, flush=True)
        else:
            self.log(f"  {line}")

    def close(self) -> None:
        if self.tty and self.log is not None:
            print(file=sys.stderr)


def _batches(files, json_key: str, max_chars: int, max_docs: int) -> Iterator[Tuple[List[str], int, int]]:
    """(non-empty documents, characters read, empty documents skipped), in input order."""
    texts: List[str] = []
    chars = empty = 0
    for _, text in iter_documents(files, json_key):
        chars += len(text) + 1
        if not text.strip():
            empty += 1
            continue
        texts.append(text)
        if len(texts) >= max_docs or chars >= max_chars:
            yield texts, chars, empty
            texts, chars, empty = [], 0, 0
    if texts or chars:
        yield texts, chars, empty


def _encode(tokenizer: Tokenizer, texts: List[str], dtype) -> Tuple[np.ndarray, np.ndarray]:
    """All ids of `texts`, EOS after each, concatenated; and each document's length."""
    ids = tokenizer.encode_batch(texts, eos=True)
    lengths = np.fromiter((len(x) for x in ids), dtype=np.int64, count=len(ids))
    flat = np.fromiter((t for x in ids for t in x), dtype=dtype, count=int(lengths.sum()))
    return flat, lengths


_WORKER_TOKENIZER: Optional[Tokenizer] = None


def _worker_init(tokenizer_path: str) -> None:
    global _WORKER_TOKENIZER
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # one process per core already
    _WORKER_TOKENIZER = Tokenizer(tokenizer_path)


def _worker_encode(texts: List[str], dtype) -> Tuple[np.ndarray, np.ndarray]:
    return _encode(_WORKER_TOKENIZER, texts, dtype)


def _encoded(files, json_key, tokenizer: Tokenizer, dtype, workers: int, batch_chars: int):
    """((flat ids, lengths), characters read, empty documents) per batch, in input order; with
    workers > 1 the batches are encoded by a pool of processes, at most 2 per worker in flight."""
    batches = _batches(files, json_key, batch_chars, max_docs=4096)
    if workers <= 1:
        for texts, chars, empty in batches:
            yield _encode(tokenizer, texts, dtype), chars, empty
        return
    import multiprocessing as mp

    # fork where there is one: workers start at once and callers need no `__main__` guard
    ctx = mp.get_context("fork" if "fork" in mp.get_all_start_methods() else "spawn")
    with ctx.Pool(workers, _worker_init, (tokenizer.model_path,)) as pool:
        pending: collections.deque = collections.deque()
        for texts, chars, empty in batches:
            pending.append((pool.apply_async(_worker_encode, (texts, dtype)), chars, empty))
            if len(pending) >= 2 * workers:
                result, c, e = pending.popleft()
                yield result.get(), c, e
        while pending:
            result, c, e = pending.popleft()
            yield result.get(), c, e


def preprocess(
    inputs: Sequence[str | os.PathLike],
    tokenizer: Tokenizer | str | os.PathLike,
    output_prefix: str | os.PathLike,
    json_key: str = "text",
    log_interval_s: float = 5.0,
    log=print,
    workers: int = 1,
    batch_chars: int = 1 << 20,
) -> dict:
    """Tokenizes documents into `{output_prefix}.bin/.idx/.json`; returns the metadata dict.

    Empty documents are skipped. Documents are encoded in batches of about `batch_chars`
    characters, by `workers` processes when > 1 (the output does not depend on it). The files
    are written under temporary names and renamed at the end, so a failed run leaves no
    half-written dataset. `log` (None: silent) gets progress lines and a summary with tokens/s;
    with `print` on a terminal the progress is a bar on stderr.

    Raises:
        ValueError: bad inputs or tokenizer (checked before any work), or no non-empty document.
    """
    files = resolve_inputs(inputs, json_key)
    if not isinstance(tokenizer, Tokenizer):
        tokenizer = Tokenizer(tokenizer)
    if workers < 1:
        raise ValueError(f"workers must be >= 1, got {workers}")
    output_prefix = os.fspath(output_prefix)
    out_dir = os.path.dirname(output_prefix) or "."
    os.makedirs(out_dir, exist_ok=True)
    if not os.access(out_dir, os.W_OK):
        raise ValueError(f"output directory is not writable: {out_dir!r}")

    indexed = indexed_dataset_module()
    dtype = indexed.DType.optimal_dtype(tokenizer.vocab_size)
    tmp = f"{output_prefix}.tmp{os.getpid()}"
    builder = indexed.IndexedDatasetBuilder(tmp + ".bin", dtype=dtype)
    progress = _Progress(sum(f.stat().st_size for f in files), log, log_interval_s)
    n_empty = 0
    try:
        for (flat, lengths), chars, empty in _encoded(files, json_key, tokenizer, dtype, workers, batch_chars):
            n_empty += empty
            ends = np.cumsum(lengths)
            for end, n in zip(ends.tolist(), lengths.tolist()):
                builder.add_document(flat[end - n:end], [n])
            progress.update(chars, len(lengths), len(flat))
        progress.close()
        n_docs, n_tokens = progress.docs, progress.tokens
        if n_docs == 0:
            raise ValueError(f"no non-empty documents in {[str(f) for f in files]}")
        builder.finalize(tmp + ".idx")
        metadata = {
            "format": "megatron.core.datasets.indexed_dataset (one sequence per document)",
            "inputs": [str(f) for f in files],
            "json_key": json_key,
            "tokenizer": tokenizer.model_path,
            "tokenizer_kind": tokenizer.kind,
            "tokenizer_vocab_size": tokenizer.vocab_size,
            "tokenizer_fingerprint": tokenizer.fingerprint,
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
        elapsed = max(time.time() - progress.start, 1e-9)
        log(f"wrote {output_prefix}.bin/.idx/.json: {n_docs} docs, {n_tokens} tokens "
            f"({n_tokens / n_docs:.0f} tokens/doc, {n_empty} empty skipped) in {elapsed:.1f} s "
            f"({n_tokens / elapsed:,.0f} tokens/s, {tokenizer.kind} tokenizer, {workers} worker(s))")
    return metadata


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        prog="preprocess_data", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--input", nargs="+", required=True,
                        help="text files (one document each), JSONL files, or directories of them")
    parser.add_argument("--tokenizer", required=True,
                        help="sentencepiece .model, Hugging Face tokenizer.json, or a directory holding one")
    parser.add_argument("--output-prefix", required=True, help="writes PREFIX.bin, PREFIX.idx, PREFIX.json")
    parser.add_argument("--json-key", default="text", help="JSONL field with the document text")
    parser.add_argument("--log-interval", type=float, default=5.0,
                        help="seconds between progress lines (when stderr is not a terminal)")
    parser.add_argument("--workers", type=int, default=0,
                        help="encoding processes; 0: one per CPU core, at most one per 4 MB of input")
    args = parser.parse_args(argv)
    try:
        workers = args.workers
        if workers == 0:
            size = sum(f.stat().st_size for f in resolve_inputs(args.input, args.json_key))
            workers = max(1, min(os.cpu_count() or 1, size // (4 << 20)))
        preprocess(args.input, args.tokenizer, args.output_prefix, args.json_key, args.log_interval,
                   workers=workers)
    except ValueError as e:
        print(f"preprocess_data: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
