"""The prompt format a checkpoint was trained on: RUN_DIR/passkey_recipe.json.

    {"train_length": 128, "key_digits": 2, "intro": false}

Written by tools/passkey_tiny.sh (and anyone training on `eval passkey-data` documents);
`eval passkey` and `eval needle` read it from the checkpoint's run directory so that they
evaluate in the format the model was trained on, and accept lengths as multiples of the
training length ("T,4T,16T,64T"). Explicit flags win over the recipe.
"""

from __future__ import annotations

import json
import os
from typing import Optional

RECIPE_FILE = "passkey_recipe.json"


def write_recipe(run_dir: str, train_length: int, key_digits: Optional[int], intro: bool, **extra) -> str:
    path = os.path.join(run_dir, RECIPE_FILE)
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
    f = os.path.join(run_dir, RECIPE_FILE)
    if not os.path.isfile(f):
        return None
    with open(f) as fh:
        recipe = json.load(fh)
    if not isinstance(recipe, dict) or not isinstance(recipe.get("train_length"), int):
        raise ValueError(f"{f}: needs an integer train_length")
    return recipe


def parse_lengths(text: str, train_length: Optional[int]) -> list:
    """'128,4T,1k' -> [128, 4 * T, 1024]; 'T' multiples need the training length."""
    from .passkey import parse_size

    out = []
    for item in (x.strip() for x in text.split(",")):
        if not item:
            continue
        if item[-1] in "tT":
            if train_length is None:
                raise ValueError(f"length {item!r} is a multiple of the training length, but the checkpoint "
                                 f"has no {RECIPE_FILE}; give lengths in tokens")
            try:
                out.append(int(float(item[:-1] or 1) * train_length))
            except ValueError:
                raise ValueError(f"bad length {item!r}: use e.g. T, 4T, 16T") from None
        else:
            out.append(parse_size(item))
    return out
