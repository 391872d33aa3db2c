"""Load a trained checkpoint for inference and evaluation (one process, TP=1 by default).

    with inference_session():                       # gloo world of 1 + Megatron groups
        model, cfg, tok = load_model_for_inference("runs/debug")

`checkpoint_path` is a run directory, its `checkpoints/` directory or one `iter_NNNNNNN`
directory (`megatron_infini.checkpointing.resolve_checkpoint`). The weights are read from the
reshardable `model/` copy (Megatron dist_checkpointing), so a checkpoint written at any
tensor-parallel size loads here at any other.
"""

from __future__ import annotations

import contextlib
import json
import os
from typing import Iterator, Optional, Sequence, Tuple

import torch

#: `--dtype` choices of the inference and evaluation commands.
DTYPES = ("auto", "bf16", "fp32")


def resolve_dtype(dtype: str = "auto", cuda: Optional[bool] = None) -> torch.dtype:
    """Weights and activations dtype for inference: auto is bf16 on GPU (fused flash attention,
    half the memory), fp32 on CPU. The Infini memory is float32 either way."""
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {DTYPES}, got {dtype!r}")
    if dtype == "auto":
        dtype = "bf16" if (torch.cuda.is_available() if cuda is None else cuda) else "fp32"
    return torch.bfloat16 if dtype == "bf16" else torch.float32


def add_dtype_arg(parser) -> None:
    """The `--dtype` option shared by the inference and evaluation commands."""
    parser.add_argument("--dtype", default="auto", choices=DTYPES,
                        help="weights and activations: auto = bf16 on GPU, fp32 on CPU (memory state always fp32)")


def read_run_config(ckpt_dir: str, overrides: Sequence[str] = ()):
    """The resolved `Config` saved with an iteration directory (or in its run directory),
    with dotted `overrides` (e.g. "model.segment_length=128") applied."""
    from megatron_infini.training.config import load_config

    for path in (os.path.join(ckpt_dir, "config.yaml"), os.path.join(ckpt_dir, "..", "..", "config.yaml")):
        if os.path.isfile(path):
            return load_config(path, overrides)
    raise FileNotFoundError(f"{ckpt_dir}: no config.yaml in the checkpoint or its run directory")


@contextlib.contextmanager
def inference_session(tp: int = 1, timeout_minutes: float = 10.0) -> Iterator[None]:
    """torch.distributed (gloo on CPU; a world of 1 unless launched by torchrun) and Megatron's
    parallel state with tensor-parallel size `tp`; torn down on exit. Re-entrant: when a
    process group already exists, nothing is created or destroyed."""
    import torch.distributed as dist

    from megatron_infini.training.config import Config
    from megatron_infini.training.distributed import destroy_distributed, init_distributed

    if dist.is_available() and dist.is_initialized():
        yield
        return
    cfg = Config()
    cfg.parallel.tensor_model_parallel_size = tp
    cfg.parallel.timeout_minutes = timeout_minutes
    init_distributed(cfg)
    try:
        yield
    finally:
        destroy_distributed()


def load_model_for_inference(
    checkpoint_path: str, tp: int = 1, overrides: Sequence[str] = (), tokenizer_path: Optional[str] = None,
    dtype: str = "auto",
) -> Tuple[torch.nn.Module, "object", "object"]:
    """Build the model of a checkpoint and load its weights; needs `inference_session(tp)`.

    Args:
        checkpoint_path: run dir, its checkpoints/ dir or an iter_ dir.
        tp: tensor-parallel size to build at (must match the session's).
        overrides: dotted config overrides applied to the saved config (e.g.
            "model.segment_length=128"; shape fields must not change).
        tokenizer_path: sentencepiece `.model` or Hugging Face `tokenizer.json` (or a directory);
            default the copy kept in the checkpoint's `tokenizer/`, else the run's
            `data.tokenizer`, else the shipped Shakespeare tokenizer.
        dtype: auto (bf16 on GPU, fp32 on CPU) | bf16 | fp32; the memory state is float32.

    Returns:
        (model in eval mode in `dtype`, resolved `Config`, `Tokenizer`).
    """
    from megatron.core import dist_checkpointing

    from megatron_infini.checkpointing.manager import resolve_checkpoint
    from megatron_infini.data import SHAKESPEARE_TOKENIZER
    from megatron_infini.data.tokenizer import Tokenizer
    from megatron_infini.training.model import build_model, padded_vocab_size

    ckpt = resolve_checkpoint(checkpoint_path)
    cfg = read_run_config(ckpt, [f"parallel.tensor_model_parallel_size={tp}", "parallel.sequence_parallel=false",
                                 "model.recompute_layers=false", "train.compile=false", *overrides])
    saved = os.path.join(ckpt, "tokenizer")  # the copy a training run keeps with its checkpoints
    tokenizer = Tokenizer(tokenizer_path or (saved if os.path.isdir(saved) else cfg.data.tokenizer)
                          or SHAKESPEARE_TOKENIZER)
    meta_path = os.path.join(ckpt, "meta.json")
    meta = json.load(open(meta_path)) if os.path.isfile(meta_path) else {}
    vocab = meta.get("vocab_size") or cfg.model.vocab_size or padded_vocab_size(tokenizer.vocab_size, tp)
    bf16 = resolve_dtype(dtype) == torch.bfloat16
    model = build_model(cfg, vocab, bf16=bf16)
    state = dist_checkpointing.load(model.sharded_state_dict(), os.path.join(ckpt, "model"))
    model.load_state_dict({k: v for k, v in state.items() if not k.startswith("infini_memory.")}, strict=True)
    model.eval()
    model.checkpoint_dir = ckpt  # for reports
    _say(f"[inference] {ckpt}: {'bf16' if bf16 else 'fp32'} weights on {next(model.parameters()).device}, "
              "float32 memory state")
    return model, cfg, tokenizer


def _say(message: str) -> None:
    """One line on stderr; also turns on this package's INFO log (the attention kernel choice)."""
    import sys

    from megatron_infini.log import enable_package_log

    enable_package_log()
    print(message, file=sys.stderr, flush=True)
