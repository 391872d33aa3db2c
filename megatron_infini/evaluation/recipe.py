"""The prompt format a checkpoint was trained on: RUN_DIR/passkey_recipe.json or
RUN_DIR/needle_recipe.json.

    {"train_length": 128, "key_digits": 2, "intro": false}                  passkey_recipe.json
    {"train_length": 128, "needles": 2, "key_digits": 2, "intro": false}    needle_recipe.json

Written by tools/passkey_tiny.sh and tools/needle_tiny.sh (and anyone training on
`eval passkey-data` / `eval needle-data` documents); `eval passkey` and `eval needle` read it
from the checkpoint's run directory so that they evaluate in the format the model was trained
on, and accept lengths as multiples of the training length, with an offset in tokens
("T,4T,16T+37,64T-5"). Explicit flags win over the recipe.
"""

from __future__ import annotations

import json
import os
import re
from typing import Optional

RECIPE_FILE = "passkey_recipe.json"
NEEDLE_RECIPE_FILE = "needle_recipe.json"


def write_recipe(run_dir: str, train_length: int, key_digits: Optional[int], intro: bool,
                 file: str = RECIPE_FILE, **extra) -> str:
    path = os.path.join(run_dir, file)
    os.makedirs(run_dir, exist_ok=True)
    with open(path, "w") as fh:
        json.dump({"train_length": int(train_length), "key_digits": key_digits, "intro": bool(intro), **extra},
                  fh, indent=1)
    return path


def find_recipe(checkpoint_path: str) -> Optional[dict]:
    """The recipe of a run directory, its checkpoints/ directory or one iter_ directory, or None."""
    path = os.path.abspath(checkpoint_path).rstrip(os.sep)
    run_dir = path
    if os.path.basename(path).startswith("iter_"):
        run_dir = os.path.dirname(os.path.dirname(path))
    elif os.path.basename(path) == "checkpoints":
        run_dir = os.path.dirname(path)
    found = [os.path.join(run_dir, name) for name in (RECIPE_FILE, NEEDLE_RECIPE_FILE)
             if os.path.isfile(os.path.join(run_dir, name))]
    if not found:
        return None
    f = found[0]
    with open(f) as fh:
        recipe = json.load(fh)
    if not isinstance(recipe, dict) or not isinstance(recipe.get("train_length"), int):
        raise ValueError(f"{f}: needs an integer train_length")
    return recipe


def parse_size(text: str) -> int:
    """'4k' -> 4096, '1m' -> 1048576, '5000' -> 5000."""
    t = text.strip().lower()
    mult = {"k": 1024, "m": 1024 ** 2}.get(t[-1:], 1)
    try:
        return int(float(t[:-1] if mult > 1 else t) * mult)
    except ValueError:
        raise ValueError(f"bad length {text!r}: use e.g. 4096, 4k, 1m") from None


def size_label(n: int) -> str:
    for unit, mult in (("m", 1024 ** 2), ("k", 1024)):
        if n >= mult and n % mult == 0:
            return f"{n // mult}{unit}"
    return str(n)


def parse_lengths(text: str, train_length: Optional[int]) -> list:
    """'128,4T,16T+37,64T-5,1k' -> [128, 4 T, 16 T + 37, 64 T - 5, 1024]; 'T' multiples need
    the training length. Any length in tokens is allowed (not only multiples of the segment)."""
    out = []
    for item in (x.strip() for x in text.split(",")):
        if not item:
            continue
        m = re.fullmatch(r"(\d*\.?\d*)[tT]\s*(?:([+-])\s*(\d+))?", item)
        if m:
            if train_length is None:
                raise ValueError(f"length {item!r} is a multiple of the training length, but the checkpoint "
                                 f"has no {RECIPE_FILE} or {NEEDLE_RECIPE_FILE}; give lengths in tokens")
            try:
                n = int(float(m.group(1) or 1) * train_length)
            except ValueError:
                raise ValueError(f"bad length {item!r}: use e.g. T, 4T, 16T+37") from None
            out.append(n + (int(m.group(3)) * (1 if m.group(2) == "+" else -1) if m.group(2) else 0))
        elif item[-1:] in "tT":
            raise ValueError(f"bad length {item!r}: use e.g. T, 4T, 16T+37")
        else:
            out.append(parse_size(item))
    if any(n <= 0 for n in out):
        raise ValueError(f"lengths must be positive, got {text!r}")
    return out
