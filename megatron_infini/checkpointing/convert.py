"""Convert checkpoints: ours (sharded, any TP) <-> one TP=1 torch state dict <-> Hugging Face Llama.

Legend: h hidden size, f MLP width, nh query heads, ng key/value heads (query groups),
hpg = nh // ng query heads per group, hn head dim, V (padded) vocabulary.

Megatron's fused layouts, undone here:
    linear_qkv.weight [ng * (hpg + 2) * hn, h]: per query group, its hpg query heads, then its
        key head, then its value head (so a TP split by rows keeps whole groups).
    linear_fc1.weight [2f, h] (SwiGLU): rows [0, f) the gate projection, [f, 2f) the up projection.
The Infini gate logits beta of layer i [nh] become `model.layers.{i}.self_attn.infini_gate`,
its write-gate parameters (memory_write_gate) `...self_attn.infini_write_weight` [ng, hn] and
`...self_attn.infini_write_bias` [ng].

`to-hf` writes an "infini_llama" directory (megatron_infini/hf/): config.json with our own
model_type and an auto_map to the modeling file copied beside the weights, which runs the
segments and the memory (`trust_remote_code=True`); options it cannot express are refused.
`from-hf` reads such a directory back, and plain Llama directories as before.

A "torch" file is {"model": TP=1 state dict, "config": resolved config dict, "vocab_size": V,
"step": step, "tokenizer": path of the tokenizer file (optional; copied into checkpoints made
from the blob and into Hugging Face exports)}. An imported checkpoint (from-torch / from-hf) holds model weights only
(meta.json `weights_only: true`): resuming from it starts at step 0 with a fresh optimizer.
"""

from __future__ import annotations

import json
import os
import shutil
from typing import Dict, Optional

import torch

from . import manifest as mf
from .manager import dist_save, resolve_checkpoint

Tensor = torch.Tensor
INFINI_GATE = "infini_gate"
#: our core-attention parameter -> its name in the Hugging Face layout (under self_attn.)
INFINI_PARAMS = {"gate": INFINI_GATE, "write_weight": "infini_write_weight", "write_bias": "infini_write_bias"}


# --------------------------------------------------------------------------- name mapping (pure)


def _dims(model_cfg: dict) -> tuple:
    nh = model_cfg["num_attention_heads"]
    ng = model_cfg.get("num_query_groups") or nh
    hn = model_cfg["hidden_size"] // nh
    return nh, ng, hn


def _check_llama(model_cfg: dict) -> None:
    if model_cfg.get("normalization", "RMSNorm") != "RMSNorm" or model_cfg.get("activation", "swiglu") != "swiglu":
        raise ValueError("Hugging Face Llama layout needs model.normalization=RMSNorm and model.activation=swiglu, "
                         f"got {model_cfg.get('normalization')!r} / {model_cfg.get('activation')!r}")


def megatron_to_hf(sd: Dict[str, Tensor], model_cfg: dict) -> Dict[str, Tensor]:
    """TP=1 Megatron GPTModel state dict -> Llama names (+ Infini gates)."""
    _check_llama(model_cfg)
    nh, ng, hn = _dims(model_cfg)
    hpg = nh // ng
    out = {"model.embed_tokens.weight": sd["embedding.word_embeddings.weight"],
           "model.norm.weight": sd["decoder.final_layernorm.weight"]}
    if "output_layer.weight" in sd:
        out["lm_head.weight"] = sd["output_layer.weight"]
    for i in range(model_cfg["num_layers"]):
        m, o = f"decoder.layers.{i}.", f"model.layers.{i}."
        qkv = sd[m + "self_attention.linear_qkv.weight"]  # [ng * (hpg + 2) * hn, h]
        h = qkv.shape[1]
        qkv = qkv.view(ng, hpg + 2, hn, h)
        out[o + "self_attn.q_proj.weight"] = qkv[:, :hpg].reshape(nh * hn, h)
        out[o + "self_attn.k_proj.weight"] = qkv[:, hpg].reshape(ng * hn, h)
        out[o + "self_attn.v_proj.weight"] = qkv[:, hpg + 1].reshape(ng * hn, h)
        out[o + "self_attn.o_proj.weight"] = sd[m + "self_attention.linear_proj.weight"]
        for ours, theirs in INFINI_PARAMS.items():  # absent in layers without memory (or write gate)
            if m + "self_attention.core_attention." + ours in sd:
                out[o + "self_attn." + theirs] = sd[m + "self_attention.core_attention." + ours]
        fc1 = sd[m + "mlp.linear_fc1.weight"]  # [2f, h]
        f = fc1.shape[0] // 2
        out[o + "mlp.gate_proj.weight"], out[o + "mlp.up_proj.weight"] = fc1[:f], fc1[f:]
        out[o + "mlp.down_proj.weight"] = sd[m + "mlp.linear_fc2.weight"]
        out[o + "input_layernorm.weight"] = sd[m + "input_layernorm.weight"]
        out[o + "post_attention_layernorm.weight"] = sd[m + "pre_mlp_layernorm.weight"]
    return {k: v.contiguous().clone() for k, v in out.items()}


def hf_to_megatron(hf: Dict[str, Tensor], model_cfg: dict) -> Dict[str, Tensor]:
    """Inverse of `megatron_to_hf`."""
    _check_llama(model_cfg)
    nh, ng, hn = _dims(model_cfg)
    hpg = nh // ng
    sd = {"embedding.word_embeddings.weight": hf["model.embed_tokens.weight"],
          "decoder.final_layernorm.weight": hf["model.norm.weight"]}
    if "lm_head.weight" in hf and model_cfg.get("untie_embeddings", True):
        sd["output_layer.weight"] = hf["lm_head.weight"]
    for i in range(model_cfg["num_layers"]):
        m, o = f"decoder.layers.{i}.", f"model.layers.{i}."
        q, k, v = (hf[o + f"self_attn.{n}_proj.weight"] for n in "qkv")
        h = q.shape[1]
        qkv = torch.cat([q.view(ng, hpg, hn, h), k.view(ng, 1, hn, h), v.view(ng, 1, hn, h)], dim=1)
        sd[m + "self_attention.linear_qkv.weight"] = qkv.reshape(ng * (hpg + 2) * hn, h)
        sd[m + "self_attention.linear_proj.weight"] = hf[o + "self_attn.o_proj.weight"]
        for ours, theirs in INFINI_PARAMS.items():
            if o + "self_attn." + theirs in hf:
                sd[m + "self_attention.core_attention." + ours] = hf[o + "self_attn." + theirs]
        sd[m + "mlp.linear_fc1.weight"] = torch.cat([hf[o + "mlp.gate_proj.weight"], hf[o + "mlp.up_proj.weight"]])
        sd[m + "mlp.linear_fc2.weight"] = hf[o + "mlp.down_proj.weight"]
        sd[m + "input_layernorm.weight"] = hf[o + "input_layernorm.weight"]
        sd[m + "pre_mlp_layernorm.weight"] = hf[o + "post_attention_layernorm.weight"]
    return {k: v.contiguous().clone() for k, v in sd.items()}


_ROPE_KEYS = (("rope_scaling_factor", "factor"), ("rope_scaling_low_freq_factor", "low_freq_factor"),
              ("rope_scaling_high_freq_factor", "high_freq_factor"),
              ("rope_scaling_original_max_position", "original_max_position_embeddings"))


def hf_rope_fields(hc: dict) -> dict:
    """Our `model.*` RoPE fields from a Hugging Face Llama config.json: `rope_theta` and
    `rope_scaling` (transformers 4) or `rope_parameters` (transformers 5).

    Raises:
        ValueError: a rope_type other than default and llama3 (linear, dynamic, yarn, ...).
    """
    params = {**(hc.get("rope_parameters") or {}), **(hc.get("rope_scaling") or {})}
    theta = hc.get("rope_theta", params.get("rope_theta", 10000.0))
    rope_type = params.get("rope_type", params.get("type", "default"))
    fields = {"rotary_base": int(theta), "rope_scaling": rope_type == "llama3"}
    if rope_type == "llama3":
        fields.update({ours: params[theirs] for ours, theirs in _ROPE_KEYS if theirs in params})
    elif rope_type not in (None, "default"):
        raise ValueError(f"rope_type {rope_type!r} is not supported (default and llama3 are)")
    return fields


def hf_rope_config(m: dict) -> dict:
    """Inverse of `hf_rope_fields`, written as transformers 4 and 5 both read it."""
    out = {"rope_theta": float(m["rotary_base"])}
    if m.get("rope_scaling"):
        from megatron_infini.training.config import ModelConfig

        default = ModelConfig()
        out["rope_scaling"] = {"rope_type": "llama3",
                               **{theirs: m.get(ours, getattr(default, ours)) for ours, theirs in _ROPE_KEYS}}
    return out


def hf_config(cfg: dict, vocab_size: int) -> dict:
    """config.json of the plain Llama with our shape (Infini settings and our full config kept
    alongside): what it computes equals our model only with memory off on inputs of at most one
    segment; `to-hf` writes `megatron_infini.hf.export.infini_llama_config` instead."""
    from megatron_infini.training.model import ffn_size
    from megatron_infini.training.config import ModelConfig

    m = cfg["model"]
    nh, ng, _ = _dims(m)
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": m["hidden_size"],
        "intermediate_size": ffn_size(ModelConfig(**m)),
        "num_hidden_layers": m["num_layers"],
        "num_attention_heads": nh,
        "num_key_value_heads": ng,
        "head_dim": m["hidden_size"] // nh,
        "vocab_size": vocab_size,
        "max_position_embeddings": cfg["train"]["seq_length"],
        "rms_norm_eps": 1e-5,
        **hf_rope_config(m),
        "hidden_act": "silu",
        "tie_word_embeddings": not m.get("untie_embeddings", True),
        "attention_bias": False,
        "mlp_bias": False,
        "initializer_range": m["init_method_std"],
        "torch_dtype": "float32",
        "infini_attention": {k: m[k] for k in ("segment_length", "memory_update", "memory_enabled", "gate_init")
                             if k in m},
        "megatron_infini_config": cfg,
    }


# --------------------------------------------------------------------------- files


def read_checkpoint_config(ckpt: str) -> dict:
    """The resolved config saved with a checkpoint (or in its run directory)."""
    import yaml

    for path in (os.path.join(ckpt, "config.yaml"), os.path.join(ckpt, "..", "..", "config.yaml")):
        if os.path.isfile(path):
            with open(path) as fh:
                return yaml.safe_load(fh)
    raise FileNotFoundError(f"{ckpt}: no config.yaml in the checkpoint or its run directory")


def _build_tp1_model(cfg_dict: dict, vocab_size: int):
    """Single process: torch.distributed (world 1), Megatron groups with TP=1, the model."""
    from megatron_infini.training.config import _build, Config
    from megatron_infini.training.distributed import init_distributed
    from megatron_infini.training.model import build_model

    cfg = _build(Config, cfg_dict)
    cfg.parallel.tensor_model_parallel_size = 1
    cfg.parallel.sequence_parallel = False
    cfg.model.vocab_size = vocab_size
    cfg.model.recompute_layers = False
    init_distributed(cfg.validate())
    return cfg, build_model(cfg, vocab_size, bf16=False)


def _plain_state(model) -> Dict[str, Tensor]:
    return {k: v.detach().cpu().clone() for k, v in model.state_dict().items()
            if not k.endswith("_extra_state")}


def checkpoint_to_torch(ckpt: str) -> dict:
    """Our checkpoint (any TP) -> {"model": TP=1 state dict, "config", "vocab_size", "step"}.
    Needs torch.distributed uninitialised or world size 1."""
    from megatron.core import dist_checkpointing

    from megatron_infini.training.distributed import destroy_distributed

    ckpt = resolve_checkpoint(ckpt)
    mf.verify(ckpt)
    cfg_dict = read_checkpoint_config(ckpt)
    with open(os.path.join(ckpt, "meta.json")) as fh:
        meta = json.load(fh)
    vocab = meta.get("vocab_size") or cfg_dict["model"].get("vocab_size")
    if not vocab:
        raise ValueError(f"{ckpt}/meta.json has no vocab_size")
    try:
        _, model = _build_tp1_model(cfg_dict, vocab)
        state = dist_checkpointing.load(model.sharded_state_dict(), os.path.join(ckpt, "model"))
        model.load_state_dict({k: v for k, v in state.items() if not k.startswith("infini_memory.")}, strict=True)
        blob = {"model": _plain_state(model), "config": cfg_dict, "vocab_size": vocab, "step": meta["step"]}
        tokenizer = checkpoint_tokenizer(ckpt, cfg_dict)
        if tokenizer:
            blob["tokenizer"] = tokenizer
        return blob
    finally:
        destroy_distributed()


def torch_to_checkpoint(blob: dict, out_dir: str) -> str:
    """{"model", "config", "vocab_size"} -> a weights-only checkpoint directory `out_dir`
    (dist_checkpointing, so it loads at any tensor-parallel size)."""
    import yaml

    from megatron_infini.training.distributed import destroy_distributed

    out_dir = os.path.abspath(out_dir)
    tmp = out_dir + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(os.path.join(tmp, "model"))
    try:
        _, model = _build_tp1_model(blob["config"], blob["vocab_size"])
        missing, unexpected = model.load_state_dict(blob["model"], strict=False)
        missing = [k for k in missing if not k.endswith("_extra_state")]
        if missing or unexpected:
            raise ValueError(f"state dict does not match the model: missing {missing[:5]}, unexpected {unexpected[:5]}")
        dist_save(model.sharded_state_dict(), os.path.join(tmp, "model"))
        meta = {"step": 0, "source_step": blob.get("step"), "weights_only": True, "consumed_tokens": 0,
                "world_size": 1, "tensor_model_parallel_size": 1, "vocab_size": blob["vocab_size"]}
        with open(os.path.join(tmp, "meta.json"), "w") as fh:
            json.dump(meta, fh, indent=1)
        with open(os.path.join(tmp, "config.yaml"), "w") as fh:
            yaml.safe_dump(blob["config"], fh, sort_keys=False)
        if blob.get("tokenizer"):  # kept beside the weights, as training runs do
            from megatron_infini.data.tokenizer import Tokenizer

            os.makedirs(os.path.join(tmp, "tokenizer"))
            for name, src in Tokenizer(blob["tokenizer"]).source_files().items():
                shutil.copyfile(src, os.path.join(tmp, "tokenizer", name))
        mf.write_manifest(tmp, {"step": 0})
    finally:
        destroy_distributed()
    if os.path.exists(out_dir):
        shutil.rmtree(out_dir)
    os.replace(tmp, out_dir)
    return out_dir


def save_hf(blob: dict, out_dir: str) -> str:
    """Write an infini_llama directory (megatron_infini/hf/): config.json (auto_map to the
    copied configuration / modeling files), generation_config.json, model.safetensors
    (pytorch_model.bin without safetensors) and, when the blob names its tokenizer, the
    tokenizer files (tokenizer.json or tokenizer.model, and tokenizer_config.json).

    Raises:
        ValueError: an option the modeling file cannot express (`megatron_infini.hf.export`).
    """
    from megatron_infini.hf import export

    hc = export.infini_llama_config(blob["config"], blob["vocab_size"])  # refuses before writing anything
    os.makedirs(out_dir, exist_ok=True)
    tensors = megatron_to_hf(blob["model"], blob["config"]["model"])
    export.write_model_files(out_dir)
    special, tokenizer_vocab = (None, None, None), None
    if blob.get("tokenizer"):  # AutoTokenizer loads out_dir as is
        from megatron_infini.data.tokenizer import Tokenizer, write_export_files

        tok = Tokenizer(blob["tokenizer"])
        write_export_files(tok, out_dir)
        export.unbounded_tokenizer_config(out_dir)
        special = (tok.bos_id if tok.bos_id >= 0 else None, tok.eos_id, tok.pad_id)
        tokenizer_vocab = tok.vocab_size
        hc.update(bos_token_id=special[0], eos_token_id=special[1], pad_token_id=special[2])
    export.write_generation_config(out_dir, *special, tokenizer_vocab, blob["vocab_size"])
    with open(os.path.join(out_dir, "config.json"), "w") as fh:
        json.dump(hc, fh, indent=1)
    try:
        from safetensors.torch import save_file
    except ImportError:
        path = os.path.join(out_dir, "pytorch_model.bin")
        torch.save(tensors, path)
    else:
        path = os.path.join(out_dir, "model.safetensors")
        save_file(tensors, path, metadata={"format": "pt"})
    return path


def load_hf(hf_dir: str, base_config: Optional[dict] = None) -> dict:
    """An infini_llama directory (`save_hf`) or a Llama directory (ours or foreign) -> the
    "torch" blob. Our own exports carry the full config; otherwise `base_config` (a resolved
    config dict) gives the non-model sections."""
    with open(os.path.join(hf_dir, "config.json")) as fh:
        hc = json.load(fh)
    st = os.path.join(hf_dir, "model.safetensors")
    if os.path.isfile(st):
        from safetensors.torch import load_file

        tensors = load_file(st)
    else:
        tensors = torch.load(os.path.join(hf_dir, "pytorch_model.bin"), weights_only=True, map_location="cpu")
    cfg = hc.get("megatron_infini_config") or base_config
    if cfg is None:
        from megatron_infini.training.config import Config, to_dict

        cfg = to_dict(Config())
    cfg = json.loads(json.dumps(cfg))  # a private copy
    m = cfg["model"]
    if hc.get("model_type") == "infini_llama":  # our export: its full config, else the modeling file's fields
        from megatron_infini.hf.export import model_fields

        if "megatron_infini_config" not in hc:
            m.update(model_fields(hc))
    else:
        m.update(num_layers=hc["num_hidden_layers"], hidden_size=hc["hidden_size"],
                 ffn_hidden_size=hc["intermediate_size"], num_attention_heads=hc["num_attention_heads"],
                 num_query_groups=hc.get("num_key_value_heads", hc["num_attention_heads"]),
                 untie_embeddings=not hc.get("tie_word_embeddings", False),
                 normalization="RMSNorm", activation="swiglu", vocab_size=hc["vocab_size"], **hf_rope_fields(hc))
        m.update(hc.get("infini_attention", {}))
        if not any(k.endswith(INFINI_GATE) for k in tensors):
            m["memory_enabled"] = False  # a plain Llama: no gates, no memory
    blob = {"model": hf_to_megatron(tensors, m), "config": cfg, "vocab_size": hc["vocab_size"], "step": 0}
    if hf_tokenizer_path(hf_dir):
        blob["tokenizer"] = hf_tokenizer_path(hf_dir)
    return blob


def hf_tokenizer_path(hf_dir: str) -> Optional[str]:
    """The tokenizer file of a Hugging Face model directory (tokenizer.json, else
    tokenizer.model), or None."""
    from megatron_infini.data.tokenizer import resolve_tokenizer_path

    try:
        return resolve_tokenizer_path(hf_dir)[1]
    except ValueError:
        return None


def checkpoint_tokenizer(ckpt: str, cfg_dict: dict) -> Optional[str]:
    """The tokenizer of a checkpoint: the copy kept in it, else the run's data.tokenizer, else
    (data.tokenizer empty) the shipped one; None when the configured file is gone."""
    from megatron_infini.data import SHAKESPEARE_TOKENIZER
    from megatron_infini.data.tokenizer import resolve_tokenizer_path

    saved = os.path.join(ckpt, "tokenizer")
    configured = cfg_dict.get("data", {}).get("tokenizer") or str(SHAKESPEARE_TOKENIZER)
    for path in (saved, configured):
        try:
            return resolve_tokenizer_path(path)[1]
        except ValueError:
            continue
    return None
