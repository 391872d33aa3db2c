"""Synthetic recall task: is a fact several segments back retrieved through the memory?

Every training document is one passkey prompt (`passkey_data`; by default without the
protocol's introduction, to leave room for filler) of exactly `seq_length` tokens with its
answer and EOS:

    [INTRO] filler NEEDLE("The pass key is 73. Remember it. 73 is the pass key.") filler
    QUESTION("What is the pass key? The pass key is") ANSWER(" 73.") EOS

The needle is placed at a random position such that its last token lies at least `min_back`
segments before the segment of the question, so local (in-segment) attention can never see
it: only the compressive memory can carry the key to the question. Documents have exactly
`seq_length` tokens, so each training window of the packed dataset is one whole document.

Evaluation streams each held-out prompt *one segment per forward call* (the memory is carried
between calls) and generates greedily; accuracy = share of exact keys. The ablation runs the
same trained model with an empty memory at the start of every segment
(`StreamingLM(memory=False)`): the computation every first segment of a training sequence
sees, so the model stays in distribution and only the information carried between segments
is removed. Chance is 1/90 for 2-digit keys (1/10 for 1 digit).
"""

from __future__ import annotations

import json
import os
import random
from typing import Iterable, List, Optional, Sequence

import numpy as np

from .passkey_data import PasskeyBuilder, PasskeySample, random_key


def recall_sample(builder: PasskeyBuilder, rng: random.Random, seq_length: int, segment_length: int,
                  min_back: int, digits: int) -> PasskeySample:
    """One prompt of `seq_length - len(answer) - 1` tokens, needle >= `min_back` segments back."""
    key = random_key(rng, digits)
    prompt_len = seq_length - len(builder.answer(key)) - 1
    n_fill = prompt_len - builder.fixed_tokens(key)
    q_seg = (prompt_len - len(builder.question)) // segment_length
    # last needle token in segment <= q_seg - min_back  <=>  needle_end <= (q_seg - min_back + 1) * N
    cut_max = min(n_fill, (q_seg - min_back + 1) * segment_length - len(builder.intro) - len(builder.needle(key)))
    if cut_max < 0:
        raise ValueError(
            f"seq_length {seq_length} is too short to put the needle {min_back} segments of "
            f"{segment_length} tokens before the question; use a longer sequence or fewer segments back")
    s = builder.build(prompt_len, 0.0, key, cut=rng.randint(0, cut_max))
    assert s.question_start // segment_length - (s.needle_end - 1) // segment_length >= min_back
    return s


def recall_samples(tokenizer, n: int, seq_length: int, segment_length: int, min_back: int = 4,
                   digits: int = 2, seed: int = 0, intro: bool = False) -> List[PasskeySample]:
    builder = PasskeyBuilder(tokenizer, intro=intro)
    rng = random.Random(seed)
    return [recall_sample(builder, rng, seq_length, segment_length, min_back, digits) for _ in range(n)]


def write_documents(prefix: str, docs: Iterable[List[int]], tokenizer, note: str = "") -> dict:
    """Token documents -> `{prefix}.bin/.idx/.json`, the format `megatron_infini.data.preprocess`
    writes (the ids are used as given: no EOS is appended)."""
    from megatron_infini.data.preprocess import METADATA_SUFFIX, indexed_dataset_module

    indexed = indexed_dataset_module()
    os.makedirs(os.path.dirname(os.path.abspath(prefix)), exist_ok=True)
    dtype = indexed.DType.optimal_dtype(tokenizer.vocab_size)
    builder = indexed.IndexedDatasetBuilder(prefix + ".bin", dtype=dtype)
    n_docs = n_tokens = 0
    for ids in docs:
        builder.add_document(np.asarray(ids, dtype=dtype), [len(ids)])
        n_docs += 1
        n_tokens += len(ids)
    builder.finalize(prefix + ".idx")
    meta = {"format": "megatron.core.datasets.indexed_dataset (one sequence per document)",
            "inputs": [note or "megatron_infini.evaluation.recall"], "json_key": None,
            "tokenizer": tokenizer.model_path, "tokenizer_vocab_size": tokenizer.vocab_size,
            "eos_id": tokenizer.eos_id, "eos_appended": True, "dtype": np.dtype(dtype).name,
            "num_documents": n_docs, "num_empty_documents_skipped": 0, "num_tokens": n_tokens}
    with open(prefix + METADATA_SUFFIX, "w") as fh:
        json.dump(meta, fh, indent=1)
    return meta


def write_recall_data(out_dir: str, tokenizer, seq_length: int, segment_length: int, train_samples: int,
                      valid_samples: int = 64, min_back: int = 4, digits: int = 2, seed: int = 0,
                      intro: bool = False) -> dict:
    """`{out_dir}/train` and `{out_dir}/valid` shards of whole recall documents (seq_length tokens each)."""
    out = {}
    for split, n, s in (("train", train_samples, seed), ("valid", valid_samples, seed + 1)):
        samples = recall_samples(tokenizer, n, seq_length, segment_length, min_back, digits, s, intro)
        docs = (x.ids + x.answer_ids + [tokenizer.eos_id] for x in samples)
        out[split] = write_documents(os.path.join(out_dir, split), docs, tokenizer,
                                     note=f"recall task L={seq_length} N={segment_length} back>={min_back} "
                                          f"digits={digits} seed={s}")
    return out


def recall_accuracy(model, tokenizer, samples: Sequence[PasskeySample], memory: bool = True,
                    chunk_segments: int = 1, batch_size: int = 64) -> dict:
    """Accuracy of the generated keys; prompts are streamed `chunk_segments` segments per call."""
    from .passkey import score_samples

    preds = score_samples(model, tokenizer, samples, chunk_segments, batch_size, memory)
    correct = sum(int(p == s.key) for p, s in zip(preds, samples))
    return {"memory": "on" if memory else "off", "accuracy": correct / len(samples), "correct": correct,
            "samples": len(samples)}


def evaluate_recall(model, cfg, tokenizer, samples: int = 200, min_back: Optional[int] = None,
                    digits: int = 2, seed: int = 12345, chunk_segments: int = 1, intro: bool = False) -> dict:
    """Memory on vs memory off on `samples` held-out prompts of the model's training length."""
    N, L = cfg.model.segment_length, cfg.train.seq_length
    min_back = min_back if min_back is not None else 4
    held_out = recall_samples(tokenizer, samples, L, N, min_back, digits, seed, intro)
    backs = [s.question_start // N - (s.needle_end - 1) // N for s in held_out]
    on = recall_accuracy(model, tokenizer, held_out, True, chunk_segments)
    off = recall_accuracy(model, tokenizer, held_out, False, chunk_segments)
    return {"seq_length": L, "segment_length": N, "digits": digits, "chance": 1 / (9 * 10 ** (digits - 1) if digits > 1 else 10),
            "min_segments_back": min(backs), "mean_segments_back": sum(backs) / len(backs),
            "memory_on": on, "memory_off": off}
