"""Reading raw documents: plain text files (one document per file) or JSONL (one per line).

`resolve_inputs` checks every input up front (exists, non-empty, known kind, JSONL key
present in the first record) so that bad inputs fail before any work with a `ValueError`
naming the file; `iter_documents` then streams the documents.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Iterator, List, Sequence, Tuple

TEXT_SUFFIXES = (".txt", ".text", ".md")
JSONL_SUFFIXES = (".jsonl", ".json", ".ndjson")


def _kind(path: Path) -> str:
    if path.suffix in TEXT_SUFFIXES:
        return "text"
    if path.suffix in JSONL_SUFFIXES:
        return "jsonl"
    raise ValueError(
        f"input {str(path)!r}: unknown file kind {path.suffix!r}; expected a text file "
        f"({', '.join(TEXT_SUFFIXES)}, one document per file) or JSONL ({', '.join(JSONL_SUFFIXES)})"
    )


def _parse_jsonl_line(path: Path, line_no: int, line: str, json_key: str) -> str:
    try:
        record = json.loads(line)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}:{line_no}: not valid JSON ({e.msg})") from None
    if not isinstance(record, dict) or json_key not in record:
        keys = sorted(record) if isinstance(record, dict) else type(record).__name__
        raise ValueError(f"{path}:{line_no}: no key {json_key!r} in the record (found {keys}); set --json-key")
    text = record[json_key]
    if not isinstance(text, str):
        raise ValueError(f"{path}:{line_no}: {json_key!r} is a {type(text).__name__}, expected a string")
    return text


def resolve_inputs(paths: Sequence[str | os.PathLike], json_key: str = "text") -> List[Path]:
    """Expands directories (their text / JSONL files, sorted) and checks every input file.

    Raises:
        ValueError: no inputs, a missing path, an empty file or directory, an unknown file
            kind, or a first JSONL record that is not JSON or lacks `json_key`.
    """
    if not paths:
        raise ValueError("no input files given")
    files: List[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            found = sorted(f for f in p.iterdir() if f.suffix in TEXT_SUFFIXES + JSONL_SUFFIXES)
            if not found:
                raise ValueError(f"input directory {str(p)!r} has no text or JSONL files")
            files.extend(found)
        elif p.is_file():
            files.append(p)
        else:
            raise ValueError(f"input not found: {str(p)!r}")
    for f in files:
        kind = _kind(f)
        if f.stat().st_size == 0:
            raise ValueError(f"input file is empty: {str(f)!r}")
        if kind == "jsonl":
            with open(f, encoding="utf-8") as fh:
                for line_no, line in enumerate(fh, 1):
                    if line.strip():
                        _parse_jsonl_line(f, line_no, line, json_key)
                        break
                else:
                    raise ValueError(f"input file has no JSON records: {str(f)!r}")
    return files


def iter_documents(files: Sequence[Path], json_key: str = "text") -> Iterator[Tuple[Path, str]]:
    """Yields `(file, document text)` in input order; blank JSONL lines are skipped."""
    for f in files:
        if _kind(f) == "text":
            yield f, f.read_text(encoding="utf-8")
            continue
        with open(f, encoding="utf-8") as fh:
            for line_no, line in enumerate(fh, 1):
                if line.strip():
                    yield f, _parse_jsonl_line(f, line_no, line, json_key)
