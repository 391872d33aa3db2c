"""Start continual pre-training from a Hugging Face Llama: HF directory -> our checkpoint.

    python tools/convert_hf_llama.py --hf path/to/llama --config configs/llama-1b-infini.yaml \\
        --out runs/llama-1b-infini/init [section.key=value ...]
    megatron-infini train --config configs/llama-1b-infini.yaml checkpoint.resume=runs/llama-1b-infini/init

Reads `config.json` and `model.safetensors` (or sharded `model-*.safetensors`, or
`pytorch_model.bin`). The model shape comes from the HF config; the Infini settings
(segment_length, memory_update, memory_enabled, gate_init) and every other section come from
`--config` (+ overrides). Every layer's gates are set to `model.gate_init` (a plain Llama has
none). The output is a weights-only checkpoint in Megatron dist_checkpointing format, so the
trainer loads it at any tensor-parallel size (`--tp` checks that the heads divide) and starts
at step 0 with a fresh optimizer. The weight mapping is
`megatron_infini.checkpointing.convert.hf_to_megatron` (fused QKV per query group, SwiGLU
fc1 = [gate; up]).

RoPE: `rope_theta` and the Llama 3.1 / 3.2 `rope_scaling` ("rope_type": "llama3", or
transformers 5's `rope_parameters`) become `model.rotary_base` and `model.rope_scaling*`, so
with memory off and one segment as long as the input the logits equal Hugging Face's. The
directory's tokenizer (tokenizer.json, else tokenizer.model) is copied into the checkpoint's
`tokenizer/`, where `megatron-infini generate` and `eval` find it.

Not supported (refused or warned): other RoPE types (linear, dynamic, yarn: refused), attention
/ MLP biases, rms_norm_eps other than 1e-5 (warned: our RMSNorm uses 1e-5). The model section
of `--config` must agree with the printed shape for training to load the checkpoint.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import sys

import torch


def read_hf_tensors(hf_dir: str) -> dict:
    files = sorted(glob.glob(os.path.join(hf_dir, "*.safetensors")))
    if files:
        from safetensors.torch import load_file

        out = {}
        for f in files:
            out.update(load_file(f))
        return out
    path = os.path.join(hf_dir, "pytorch_model.bin")
    if os.path.isfile(path):
        return torch.load(path, weights_only=True, map_location="cpu")
    raise FileNotFoundError(f"{hf_dir}: no *.safetensors or pytorch_model.bin")


def convert(hf_dir: str, base_config: str, out_dir: str, overrides=(), tp: int = 1, log=print) -> str:
    from megatron_infini.checkpointing.convert import (hf_rope_fields, hf_to_megatron, hf_tokenizer_path,
                                                       torch_to_checkpoint)
    from megatron_infini.training.config import load_config, to_dict

    with open(os.path.join(hf_dir, "config.json")) as fh:
        hc = json.load(fh)
    if hc.get("model_type") not in (None, "llama"):
        raise ValueError(f"{hf_dir}: model_type {hc.get('model_type')!r} is not llama")
    if hc.get("attention_bias") or hc.get("mlp_bias"):
        raise ValueError(f"{hf_dir}: attention_bias / mlp_bias are not supported (Llama has none)")
    if abs(hc.get("rms_norm_eps", 1e-5) - 1e-5) > 1e-12:
        log(f"WARNING: rms_norm_eps {hc['rms_norm_eps']} differs from our RMSNorm's 1e-5")
    nh = hc["num_attention_heads"]
    ng = hc.get("num_key_value_heads") or nh
    head_dim = hc.get("head_dim") or hc["hidden_size"] // nh
    if head_dim * nh != hc["hidden_size"]:
        raise ValueError(f"head_dim {head_dim} x heads {nh} != hidden_size {hc['hidden_size']}: not supported")
    if nh % tp or ng % tp:
        raise ValueError(f"--tp {tp} must divide the query heads ({nh}) and key/value heads ({ng})")
    shape = [f"model.num_layers={hc['num_hidden_layers']}", f"model.hidden_size={hc['hidden_size']}",
             f"model.ffn_hidden_size={hc['intermediate_size']}", f"model.num_attention_heads={nh}",
             f"model.num_query_groups={ng}", f"model.vocab_size={hc['vocab_size']}",
             *(f"model.{k}={str(v).lower() if isinstance(v, bool) else v}" for k, v in hf_rope_fields(hc).items()),
             f"model.untie_embeddings={str(not hc.get('tie_word_embeddings', False)).lower()}",
             "model.normalization=RMSNorm", "model.activation=swiglu"]
    cfg = load_config(base_config, [*shape, *overrides])
    m = to_dict(cfg)["model"]
    sd = hf_to_megatron(read_hf_tensors(hf_dir), m)
    if m["untie_embeddings"] and "output_layer.weight" not in sd:
        raise ValueError(f"{hf_dir}: no lm_head.weight but tie_word_embeddings is false")
    if m["memory_enabled"]:
        for i in range(m["num_layers"]):
            sd[f"decoder.layers.{i}.self_attention.core_attention.gate"] = torch.full((nh,), float(m["gate_init"]))
    blob = {"model": sd, "config": to_dict(cfg), "vocab_size": hc["vocab_size"], "step": 0,
            "tokenizer": hf_tokenizer_path(hf_dir)}
    path = torch_to_checkpoint(blob, out_dir)
    rope = f"rope_scaling llama3 x{m['rope_scaling_factor']}" if m["rope_scaling"] else "no rope_scaling"
    log(f"wrote {path}: {m['num_layers']} layers, {nh} heads ({ng} kv), vocab {hc['vocab_size']}, "
        f"memory {'on, gates ' + str(m['gate_init']) if m['memory_enabled'] else 'off'}, "
        f"segment_length {m['segment_length']}, rotary_base {m['rotary_base']}, {rope}, "
        f"tokenizer {blob['tokenizer'] or 'none found'}")
    return path


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--hf", required=True, help="Hugging Face Llama directory (config.json + weights)")
    p.add_argument("--config", required=True, help="our training config (Infini settings, data, ...)")
    p.add_argument("--out", required=True, help="checkpoint directory to write")
    p.add_argument("--tp", type=int, default=1, help="tensor-parallel size it will be trained at (checked)")
    p.add_argument("overrides", nargs="*", help="section.key=value overrides of --config")
    args = p.parse_args(argv)
    try:
        convert(args.hf, args.config, args.out, args.overrides, args.tp)
    except (ValueError, FileNotFoundError) as e:
        print(f"convert_hf_llama: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
