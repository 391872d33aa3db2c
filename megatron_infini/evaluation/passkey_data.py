"""Passkey prompts (Landmark Attention's protocol, used by the Infini-attention paper), as token ids.

    INTRO + filler[: d] + NEEDLE(K) + filler[d:] + QUESTION      -> the model continues with " K."

The filler repeats FILLER; the needle sits at depth `d / len(filler)` in [0, 1] (0: right after
the intro, 1: right before the question). Everything is built at the token level so that a
prompt has exactly the requested length. Used by `passkey.py` (evaluation), by the fine-tuning
data generator and by the synthetic recall task (`recall.py`).
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass
from typing import List, Optional

INTRO = ("There is an important info hidden inside a lot of irrelevant text. Find it and memorize them. "
         "I will quiz you about the important information there.")
FILLER = " The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
NEEDLE = " The pass key is {key}. Remember it. {key} is the pass key."
QUESTION = " What is the pass key? The pass key is"
ANSWER = " {key}."


@dataclass
class PasskeySample:
    ids: List[int]
    """Prompt token ids (ends with the question; the answer is not included)."""
    key: int
    needle_start: int
    """Token index of the first needle token."""
    needle_end: int
    """Token index just past the needle."""
    question_start: int
    """Token index of the first question token."""
    answer_ids: List[int]
    """Ids of the expected continuation " K." (for training data and teacher forcing)."""


class PasskeyBuilder:
    """Builds passkey prompts of an exact token length with a given tokenizer."""

    def __init__(self, tokenizer, intro: bool = True):
        self.tok = tokenizer
        bos = [tokenizer.bos_id] if tokenizer.bos_id >= 0 else []
        self.intro = tokenizer.encode(INTRO, bos=tokenizer.bos_id >= 0) if intro else bos
        self.filler_unit = tokenizer.encode(FILLER)
        self.question = tokenizer.encode(QUESTION)

    def needle(self, key: int) -> List[int]:
        return self.tok.encode(NEEDLE.format(key=key))

    def answer(self, key: int) -> List[int]:
        return self.tok.encode(ANSWER.format(key=key))

    def fixed_tokens(self, key: int) -> int:
        """Tokens that are not filler in a prompt with this key."""
        return len(self.intro) + len(self.needle(key)) + len(self.question)

    def filler(self, n: int) -> List[int]:
        reps = -(-n // len(self.filler_unit)) if n > 0 else 0
        return (self.filler_unit * reps)[:n]

    def build(self, length: int, depth: float, key: int, cut: Optional[int] = None) -> PasskeySample:
        """A prompt of exactly `length` tokens, the needle at `depth` (0..1) of the filler (or
        after exactly `cut` filler tokens when given)."""
        if not 0.0 <= depth <= 1.0:
            raise ValueError(f"depth must be in [0, 1], got {depth}")
        needle = self.needle(key)
        n_fill = length - self.fixed_tokens(key)
        if n_fill < 0:
            raise ValueError(f"length {length} is too short for a passkey prompt (needs >= {self.fixed_tokens(key)})")
        cut = int(round(depth * n_fill)) if cut is None else min(max(cut, 0), n_fill)
        fill = self.filler(n_fill)
        ids = self.intro + fill[:cut] + needle + fill[cut:] + self.question
        start = len(self.intro) + cut
        return PasskeySample(ids=ids, key=key, needle_start=start, needle_end=start + len(needle),
                             question_start=len(ids) - len(self.question), answer_ids=self.answer(key))


def random_key(rng: random.Random, digits: Optional[int] = None) -> int:
    """The protocol's key: uniform in 1..50000, or uniform over `digits`-digit numbers."""
    if digits is None:
        return rng.randint(1, 50000)
    low = 10 ** (digits - 1) if digits > 1 else 0
    return rng.randint(low, 10 ** digits - 1)


def parse_key(text: str) -> Optional[int]:
    """The first integer in generated text, or None."""
    m = re.search(r"\d+", text)
    return int(m.group(0)) if m else None
