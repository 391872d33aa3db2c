"""Our resolved config <-> the config.json of an "infini_llama" model directory.

The directory's modeling file (`modeling_infini_llama.py`, copied here from this package)
computes our model for the options below; any other option is refused at export, never
dropped: memory_type compressive / xl, memory_free_attention xl, LayerNorm, GELU.
Training-only options (memory_repeat_max, memory_write_l1, checkpoint_segments,
recompute_layers) do not change what a trained model computes and are kept in the copy of
our full config only.
"""

from __future__ import annotations

import json
import os
import shutil
from typing import List, Optional

#: = configuration_infini_llama.UNBOUNDED_LENGTH (that file stands alone and imports transformers;
#: tests check the two are equal): any length works, outside tools must not truncate.
UNBOUNDED_LENGTH = 2 ** 30

HERE = os.path.dirname(os.path.abspath(__file__))
#: The files written next to the weights; config.json's auto_map points into them.
MODEL_FILES = ("configuration_infini_llama.py", "modeling_infini_llama.py")
AUTO_MAP = {"AutoConfig": "configuration_infini_llama.InfiniLlamaConfig",
            "AutoModelForCausalLM": "modeling_infini_llama.InfiniLlamaForCausalLM"}
MODEL_TYPE = "infini_llama"


def check_exportable(m: dict) -> None:
    """ValueError naming the `model.*` option that an infini_llama directory cannot express."""
    refused = {
        "memory_type": (m.get("memory_type", "infini"), "infini"),
        "memory_free_attention": (m.get("memory_free_attention", "segment"), "segment"),
        "normalization": (m.get("normalization", "RMSNorm"), "RMSNorm"),
        "activation": (m.get("activation", "swiglu"), "swiglu"),
    }
    for key, (got, supported) in refused.items():
        if got != supported:
            raise ValueError(f"model.{key}={got!r} cannot be exported to a Hugging Face infini_llama directory "
                             f"(its modeling file implements model.{key}={supported!r} only)")


def infini_llama_config(cfg: dict, vocab_size: int) -> dict:
    """config.json of an infini_llama directory for our resolved config `cfg` (kept whole
    under "megatron_infini_config", for `from-hf`)."""
    from megatron_infini.training.config import ModelConfig
    from megatron_infini.training.model import ffn_size

    m = cfg["model"]
    check_exportable(m)
    mc = ModelConfig(**m)
    nh = mc.num_attention_heads
    scaling = None
    if mc.rope_scaling:
        scaling = {"factor": mc.rope_scaling_factor, "low_freq_factor": mc.rope_scaling_low_freq_factor,
                   "high_freq_factor": mc.rope_scaling_high_freq_factor,
                   "original_max_position_embeddings": mc.rope_scaling_original_max_position}
    return {
        "architectures": ["InfiniLlamaForCausalLM"],
        "model_type": MODEL_TYPE,
        "auto_map": AUTO_MAP,
        "vocab_size": vocab_size,
        "hidden_size": mc.hidden_size,
        "intermediate_size": ffn_size(mc),
        "num_hidden_layers": mc.num_layers,
        "num_attention_heads": nh,
        "num_key_value_heads": mc.num_query_groups or nh,
        "head_dim": mc.hidden_size // nh,
        "rms_norm_eps": 1e-5,
        "rope_theta": float(mc.rotary_base),
        "llama3_rope_scaling": scaling,
        # any length works: the memory is constant-size (configuration_infini_llama.UNBOUNDED_LENGTH)
        "max_position_embeddings": UNBOUNDED_LENGTH,
        "initializer_range": mc.init_method_std,
        "tie_word_embeddings": not mc.untie_embeddings,
        "segment_length": mc.segment_length,
        "memory_update": mc.memory_update,
        "memory_enabled": mc.memory_enabled,
        "memory_layers": None if mc.memory_layers is None else list(mc.memory_layers),
        "memory_write_gate": mc.memory_write_gate,
        "torch_dtype": "float32",
        "megatron_infini_config": cfg,
    }


def model_fields(hc: dict) -> dict:
    """Our `model.*` fields from an infini_llama config.json (inverse of `infini_llama_config`)."""
    fields = {"num_layers": hc["num_hidden_layers"], "hidden_size": hc["hidden_size"],
              "ffn_hidden_size": hc["intermediate_size"], "num_attention_heads": hc["num_attention_heads"],
              "num_query_groups": hc.get("num_key_value_heads", hc["num_attention_heads"]),
              "untie_embeddings": not hc.get("tie_word_embeddings", False), "normalization": "RMSNorm",
              "activation": "swiglu", "vocab_size": hc["vocab_size"], "rotary_base": int(hc["rope_theta"]),
              "rope_scaling": bool(hc.get("llama3_rope_scaling")), "memory_type": "infini",
              "memory_free_attention": "segment"}
    for key in ("segment_length", "memory_update", "memory_enabled", "memory_layers", "memory_write_gate"):
        fields[key] = hc[key]
    sc = hc.get("llama3_rope_scaling")
    if sc:
        fields.update(rope_scaling_factor=sc["factor"], rope_scaling_low_freq_factor=sc["low_freq_factor"],
                      rope_scaling_high_freq_factor=sc["high_freq_factor"],
                      rope_scaling_original_max_position=sc["original_max_position_embeddings"])
    return fields


def write_model_files(out_dir: str) -> List[str]:
    """Copy the configuration and modeling files into `out_dir`; returns their names."""
    for name in MODEL_FILES:
        shutil.copyfile(os.path.join(HERE, name), os.path.join(out_dir, name))
    return list(MODEL_FILES)


def write_generation_config(out_dir: str, bos: Optional[int], eos: Optional[int], pad: Optional[int],
                            tokenizer_vocab: Optional[int], vocab_size: int) -> None:
    """generation_config.json: special ids, and Megatron's padding ids (tokenizer_vocab..vocab_size-1,
    never real tokens) suppressed, as `megatron-infini generate` masks them."""
    gen = {"bos_token_id": bos, "eos_token_id": eos, "pad_token_id": pad}
    if tokenizer_vocab is not None and tokenizer_vocab < vocab_size:
        gen["suppress_tokens"] = list(range(tokenizer_vocab, vocab_size))
    with open(os.path.join(out_dir, "generation_config.json"), "w") as fh:
        json.dump({k: v for k, v in gen.items() if v is not None or k == "suppress_tokens"}, fh, indent=1)


def unbounded_tokenizer_config(out_dir: str) -> None:
    """Set model_max_length in the directory's tokenizer_config.json to `UNBOUNDED_LENGTH`
    (outside tools truncate inputs to it; the model reads any length)."""
    path = os.path.join(out_dir, "tokenizer_config.json")
    if not os.path.isfile(path):
        return
    with open(path, encoding="utf-8") as fh:
        tc = json.load(fh)
    tc["model_max_length"] = UNBOUNDED_LENGTH
    with open(path, "w", encoding="utf-8") as fh:
        json.dump(tc, fh, indent=1)
