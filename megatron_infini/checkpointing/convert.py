"""Convert checkpoints: ours (sharded, any TP) <-> one TP=1 torch state dict <-> Hugging Face Llama.

Legend: h hidden size, f MLP width, nh query heads, ng key/value heads (query groups),
hpg = nh // ng query heads per group, hn head dim, V (padded) vocabulary.

Megatron's fused layouts, undone here:
    linear_qkv.weight [ng * (hpg + 2) * hn, h]: per query group, its hpg query heads, then its
        key head, then its value head (so a TP split by rows keeps whole groups).
    linear_fc1.weight [2f, h] (SwiGLU): rows [0, f) the gate projection, [f, 2f) the up projection.
The Infini gate logits beta of layer i [nh] become `model.layers.{i}.self_attn.infini_gate`.

A "torch" file is {"model": TP=1 state dict, "config": resolved config dict, "vocab_size": V,
"step": step}. An imported checkpoint (from-torch / from-hf) holds model weights only
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
        gate = sd.get(m + "self_attention.core_attention.gate")
        if gate is not None:  # absent when memory is disabled
            out[o + "self_attn." + INFINI_GATE] = gate
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
        if o + "self_attn." + INFINI_GATE in hf:
            sd[m + "self_attention.core_attention.gate"] = hf[o + "self_attn." + INFINI_GATE]
        sd[m + "mlp.linear_fc1.weight"] = torch.cat([hf[o + "mlp.gate_proj.weight"], hf[o + "mlp.up_proj.weight"]])
        sd[m + "mlp.linear_fc2.weight"] = hf[o + "mlp.down_proj.weight"]
        sd[m + "input_layernorm.weight"] = hf[o + "input_layernorm.weight"]
        sd[m + "pre_mlp_layernorm.weight"] = hf[o + "post_attention_layernorm.weight"]
    return {k: v.contiguous().clone() for k, v in sd.items()}


def hf_config(cfg: dict, vocab_size: int) -> dict:
    """config.json of the Llama model (Infini settings and our full config kept alongside)."""
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
        "rope_theta": float(m["rotary_base"]),
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
        return {"model": _plain_state(model), "config": cfg_dict, "vocab_size": vocab, "step": meta["step"]}
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
        mf.write_manifest(tmp, {"step": 0})
    finally:
        destroy_distributed()
    if os.path.exists(out_dir):
        shutil.rmtree(out_dir)
    os.replace(tmp, out_dir)
    return out_dir


def save_hf(blob: dict, out_dir: str) -> str:
    """Write config.json and model.safetensors (pytorch_model.bin without safetensors)."""
    os.makedirs(out_dir, exist_ok=True)
    tensors = megatron_to_hf(blob["model"], blob["config"]["model"])
    with open(os.path.join(out_dir, "config.json"), "w") as fh:
        json.dump(hf_config(blob["config"], blob["vocab_size"]), fh, indent=1)
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
    """A Llama directory (ours or foreign) -> the "torch" blob. Our own exports carry the full
    config; otherwise `base_config` (a resolved config dict) gives the non-model sections."""
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
    m.update(num_layers=hc["num_hidden_layers"], hidden_size=hc["hidden_size"],
             ffn_hidden_size=hc["intermediate_size"], num_attention_heads=hc["num_attention_heads"],
             num_query_groups=hc.get("num_key_value_heads", hc["num_attention_heads"]),
             rotary_base=int(hc.get("rope_theta", 10000)), untie_embeddings=not hc.get("tie_word_embeddings", False),
             normalization="RMSNorm", activation="swiglu", vocab_size=hc["vocab_size"])
    m.update(hc.get("infini_attention", {}))
    if not any(k.endswith(INFINI_GATE) for k in tensors):
        m["memory_enabled"] = False  # a plain Llama: no gates, no memory
    return {"model": hf_to_megatron(tensors, m), "config": cfg, "vocab_size": hc["vocab_size"], "step": 0}
