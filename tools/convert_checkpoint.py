"""Convert megatron-infini checkpoints to and from one-file formats.

    python tools/convert_checkpoint.py to-torch  CKPT OUT.pt      # TP=1 state dict + config
    python tools/convert_checkpoint.py to-hf     CKPT OUT_DIR     # Hugging Face infini_llama directory
    python tools/convert_checkpoint.py from-torch IN.pt OUT_CKPT
    python tools/convert_checkpoint.py from-hf   HF_DIR OUT_CKPT [--config CONFIG.yaml]

CKPT is a run directory, its checkpoints/ directory or one iter_NNNNNNN directory (any
tensor-parallel size; it is verified against its manifest first). OUT_CKPT is a weights-only
checkpoint in our format that trains at any tensor-parallel size:
`checkpoint.resume=OUT_CKPT` (step 0, fresh optimizer). See megatron_infini/checkpointing/convert.py
for the layouts. Runs in one process on CPU.

`to-hf` writes a directory that transformers loads with `trust_remote_code=True`
(AutoConfig, AutoModelForCausalLM, AutoTokenizer): the modeling file copied into it runs the
segments and the memory (megatron_infini/hf/). Options it cannot express (memory_type
compressive / xl, memory_free_attention xl, LayerNorm, GELU) are refused (exit 2).
`from-hf` reads such a directory back, or a plain Llama directory.
"""

from __future__ import annotations

import argparse
import os
import sys

import torch


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    for name, a, b in (("to-torch", "ckpt", "out"), ("to-hf", "ckpt", "out"),
                       ("from-torch", "src", "out"), ("from-hf", "src", "out")):
        s = sub.add_parser(name)
        s.add_argument(a)
        s.add_argument(b)
        if name == "from-hf":
            s.add_argument("--config", default=None,
                           help="our YAML config for the non-model sections (foreign Llama checkpoints)")
    args = p.parse_args(argv)

    from megatron_infini.checkpointing import convert

    if args.cmd in ("to-torch", "to-hf"):
        blob = convert.checkpoint_to_torch(args.ckpt)
        if args.cmd == "to-torch":
            os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
            torch.save(blob, args.out)
            out = args.out
        else:
            try:
                out = convert.save_hf(blob, args.out)
            except ValueError as e:
                print(f"convert_checkpoint to-hf: error: {e}", file=sys.stderr)
                return 2
    elif args.cmd == "from-torch":
        blob = torch.load(args.src, weights_only=True, map_location="cpu")
        out = convert.torch_to_checkpoint(blob, args.out)
    else:
        base = None
        if args.config:
            from megatron_infini.training.config import load_config, to_dict

            base = to_dict(load_config(args.config))
        out = convert.torch_to_checkpoint(convert.load_hf(args.src, base), args.out)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
