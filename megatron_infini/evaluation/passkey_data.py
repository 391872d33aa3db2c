"""Passkey prompts (Landmark Attention's protocol, used by the Infini-attention paper), as token ids.

    INTRO + filler[: d] + NEEDLE(K) + filler[d:] + QUESTION      -> the model continues with " K."

The filler repeats FILLER; the needle sits at depth `d / len(filler)` in [0, 1] (0: right after
the intro, 1: right before the question). Everything is built at the token level so that a
prompt has exactly the requested length. Used by `passkey.py` (evaluation), by the fine-tuning
data generator and by the synthetic recall task (`recall.py`).

Two hardenings shared with the needle builder (`needle_data.py`): `segment_cut` moves a needle
to a uniform random offset inside the segment its depth puts it in (a needle placed by depth
alone sits at the same in-segment offset at every length that is a multiple of the segment),
and `Haystack.window(..., numbers=R)` puts about R numbers of the key's form per 100 haystack
tokens, so that a model which simply stores every digit is not rewarded.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

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
    distractors: List[int] = field(default_factory=list)
    """Keys of the other needles in the prompt (an answer giving one of them is a distractor hit)."""
    needle_spans: List[Tuple[int, int]] = field(default_factory=list)
    """(start, end) token indices of every needle in the prompt, the asked one first (empty:
    only the asked needle, `needle_start` .. `needle_end`)."""


#: Short phrases that put a number into a haystack (the number has the keys' form).
NUMBER_PHRASES = (" {n}", " {n},", " ({n})", " number {n}", " {n} ducats", " at {n}")


class Haystack:
    """A token sequence read as a circular text, with windows optionally sprinkled with numbers."""

    def __init__(self, tokenizer, ids: Sequence[int]):
        if len(ids) < 2:
            raise ValueError("the haystack text is empty")
        self.tok = tokenizer
        self.ids = list(ids)
        pieces: Dict[int, str] = {t: tokenizer.decode([t]) for t in set(self.ids)}
        self._piece_starts: Dict[int, bool] = {t: piece.startswith(" ") for t, piece in pieces.items()}
        self.word_start = [self._piece_starts[t] for t in self.ids]
        """Tokens that begin a word: numbers are inserted before them (never inside a word)."""
        self.line_starts = [i + 1 for i, t in enumerate(self.ids) if "\n" in pieces[t]] or [0]
        """Indices just past a newline (where a window may start)."""
        self._word_share = max(sum(self.word_start) / len(self.ids), 1e-6)

    def window(self, start: int, n: int, rng: Optional[random.Random] = None, numbers: float = 0.0,
               digits: Optional[int] = None, avoid: Sequence[int] = ()) -> List[int]:
        """`n` tokens from index `start` (wrapping around); with `numbers` R > 0, about R numbers
        per 100 tokens (keys of `digits` digits other than `avoid`, in NUMBER_PHRASES) are inserted
        before word starts, drawn from `rng` (a phrase that would not fit whole is left out)."""
        if numbers < 0:
            raise ValueError(f"numbers must be >= 0, got {numbers}")
        out: List[int] = []
        p = min(1.0, numbers / 100 / self._word_share)
        i = start
        while len(out) < n:
            j = i % len(self.ids)
            if p and self.word_start[j] and rng.random() < p:
                k = random_key(rng, digits)
                while k in avoid:
                    k = random_key(rng, digits)
                phrase = self.tok.encode(rng.choice(NUMBER_PHRASES).format(n=k))
                if len(out) + len(phrase) < n:
                    out += phrase
            out.append(self.ids[j])
            i += 1
        return out[:n]

    def snap(self, window: Sequence[int], cut: int) -> int:
        """The first cut >= `cut` before a word start of `window` (or its end): a needle inserted
        there never splits a word or a number."""
        while cut < len(window) and not self._starts_word(window[cut]):
            cut += 1
        return cut

    def _starts_word(self, token: int) -> bool:
        if token not in self._piece_starts:
            self._piece_starts[token] = self.tok.decode([token]).startswith(" ")
        return self._piece_starts[token]


def segment_cut(nominal: int, n_max: int, base: int, segment_length: Optional[int], rng: random.Random) -> int:
    """A cut (haystack tokens before the needle) in the segment where `base + nominal` falls, at a
    uniform random offset in it, clamped to 0..`n_max` (`base`: prompt tokens before the haystack).
    Without a segment length, `nominal` itself."""
    if not segment_length:
        return nominal
    cut = nominal - (base + nominal) % segment_length + rng.randrange(segment_length)
    return min(max(cut, 0), n_max)


class PasskeyBuilder:
    """Builds passkey prompts of an exact token length with a given tokenizer."""

    def __init__(self, tokenizer, intro: bool = True):
        self.tok = tokenizer
        bos = [tokenizer.bos_id] if tokenizer.bos_id >= 0 else []
        self.intro = tokenizer.encode(INTRO, bos=tokenizer.bos_id >= 0) if intro else bos
        self.filler_unit = tokenizer.encode(FILLER)
        self.question = tokenizer.encode(QUESTION)
        self._hay: Optional[Haystack] = None

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

    def build(self, length: int, depth: float, key: int, cut: Optional[int] = None,
              rng: Optional[random.Random] = None, segment_length: Optional[int] = None,
              numbers: float = 0.0, key_digits: Optional[int] = None) -> PasskeySample:
        """A prompt of exactly `length` tokens, the needle at `depth` (0..1) of the filler (or
        after exactly `cut` filler tokens when given). With `rng`: `segment_length` moves the
        needle to a random offset in its segment (`segment_cut`) and `numbers` puts about that
        many numbers of `key_digits` digits per 100 filler tokens (`Haystack.window`)."""
        if not 0.0 <= depth <= 1.0:
            raise ValueError(f"depth must be in [0, 1], got {depth}")
        if (segment_length or numbers) and rng is None:
            raise ValueError("random offsets and haystack numbers need an rng")
        needle = self.needle(key)
        n_fill = length - self.fixed_tokens(key)
        if n_fill < 0:
            raise ValueError(f"length {length} is too short for a passkey prompt (needs >= {self.fixed_tokens(key)})")
        hardened = cut is None and (segment_length or numbers)
        if cut is None:
            cut = segment_cut(int(round(depth * n_fill)), n_fill, len(self.intro), segment_length, rng)
        cut = min(max(cut, 0), n_fill)
        if hardened:  # the needle before a word start of the filler (never inside a number)
            self._hay = self._hay or Haystack(self.tok, self.filler_unit)
            fill = self._hay.window(0, n_fill, rng, numbers, key_digits, avoid=(key,))
            cut = self._hay.snap(fill, cut)
        else:
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
