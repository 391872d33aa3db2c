"""The GPU training path, checked on CPU where it can be: float32 memory under autocast,
torch.compile without graph breaks, the SDPA kernel plan, bf16 training numerics (DeepSpeed
config and a real bf16 run), the Transformer Engine / Apex / local spec choice. The `gpu`
tests run only on CUDA (tools/gpu_check.sh runs them).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from _dist import run_distributed
from torch.testing import assert_close

from megatron_infini.ops import infini_attention, infini_attention_naive
from megatron_infini.ops.sdpa import SdpaPlan, sdpa_causal, sdpa_plan

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _qkvg(s, b=1, hq=4, hkv=2, d=16, dtype=torch.float32, device="cpu", grad=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(s, b, h, d, generator=g).to(device, dtype) for h in (hq, hkv, hkv))
    gate = torch.linspace(-1, 1, hq).to(device)
    for t in (q, k, v, gate):
        t.requires_grad_(grad)
    return q, k, v, gate


# ----------------------------------------------------------------------------- autocast
@pytest.mark.parametrize("update", ["linear", "delta"])
def test_memory_is_float32_under_autocast(update):
    """Under bf16 autocast the memory path still computes in float32: the memory after 4K
    tokens matches the call without autocast (error was ~3e-3 when autocast reached it)."""
    q, k, v, gate = _qkvg(4096, d=32)
    _, (M, z) = infini_attention(q, k, v, gate, segment_length=256, update=update)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out_ac, (M_ac, z_ac) = infini_attention(q, k, v, gate, segment_length=256, update=update)
        _, (M_naive, _) = infini_attention_naive(q, k, v, gate, segment_length=256, update=update)
    assert M_ac.dtype == z_ac.dtype == torch.float32
    for ref, got in ((M, M_ac), (z, z_ac), (M, M_naive)):
        rel = ((got - ref).norm() / ref.norm()).item()
        assert rel <= 1e-5, rel
    assert out_ac.dtype == torch.float32  # q's dtype: the local attention ran in bf16, the output did not change dtype


# ----------------------------------------------------------------------------- compile
@pytest.mark.parametrize("update", ["linear", "delta"])
def test_op_compiles_without_graph_breaks(update):
    """torch.compile(fullgraph=True) traces the op forward and backward (fullgraph raises on any
    graph break or host sync such as .item()); results equal eager. Awkward sizes: GQA, a short
    last segment."""
    torch._dynamo.reset()
    q, k, v, gate = _qkvg(40, b=2, grad=True)

    def f(q, k, v, gate):
        out, (M, z) = infini_attention(q, k, v, gate, segment_length=16, update=update)
        return out.square().sum() + M.sum() + z.sum()

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    grads = []
    for fn in (compiled, f):
        loss = fn(q, k, v, gate)
        grads.append([loss.detach()] + list(torch.autograd.grad(loss, (q, k, v, gate))))
    for a, b in zip(*grads):
        assert_close(a, b, rtol=1e-5, atol=1e-6)


def _compile_layer_check(rank, world_size):
    """One Megatron transformer layer whose attention is Infini, compiled: the core attention
    with fullgraph=True in training mode (the memory statistics are made on the device), the
    whole layer via `compile_layers`; forward and backward equal eager."""
    from megatron.core.transformer.transformer_layer import TransformerLayer

    from megatron_infini import get_gpt_layer_infini_spec, llama_config
    from megatron_infini.layers import InfiniCoreAttention
    from megatron_infini.training.model import compile_layers

    cfg = llama_config(num_layers=1, hidden_size=64, num_attention_heads=4, num_query_groups=2,
                       ffn_hidden_size=128, segment_length=16, use_cpu_initialization=True)
    torch.manual_seed(0)
    layer = TransformerLayer(cfg, get_gpt_layer_infini_spec().submodules, layer_number=1)
    core = layer.self_attention.core_attention
    assert isinstance(core, InfiniCoreAttention)
    core.train()
    q, k, v, _ = _qkvg(40, b=2, hq=4, hkv=2, d=16, grad=True)

    def run(fn):
        out = fn(q, k, v, None)
        grads = torch.autograd.grad(out.square().sum(), (q, k, v, core.gate))
        return [out.detach(), core.last_memory_stats.clone(), *grads]

    torch._dynamo.reset()
    eager = run(core)
    compiled = run(torch.compile(core, fullgraph=True, backend="aot_eager"))
    for a, b in zip(eager, compiled):
        assert_close(a, b, rtol=1e-5, atol=1e-6)

    x = torch.randn(40, 2, 64, requires_grad=True)
    ref = layer(x, attention_mask=None)[0]
    ref_grad = torch.autograd.grad(ref.square().sum(), x)[0]
    assert compile_layers(layer, backend="aot_eager") == 1
    out = layer(x, attention_mask=None)[0]
    assert_close(out, ref, rtol=1e-5, atol=1e-6)
    assert_close(torch.autograd.grad(out.square().sum(), x)[0], ref_grad, rtol=1e-5, atol=1e-6)


def test_layer_compiles():
    run_distributed(_compile_layer_check, 1)


# ----------------------------------------------------------------------------- SDPA kernel
def test_sdpa_plan_never_leaves_gqa_to_the_math_kernel():
    """CUDA float32 + GQA: the memory-efficient kernel, which cannot take GQA, so k/v are
    expanded; bf16/fp16 go to flash (takes GQA); CPU kernels take everything."""
    assert sdpa_plan("cuda", torch.float32, 64, gqa=True) == SdpaPlan("efficient", True)
    assert sdpa_plan("cuda", torch.float32, 64, gqa=False) == SdpaPlan("efficient", False)
    assert sdpa_plan("cuda", torch.bfloat16, 128, gqa=True) == SdpaPlan("flash", False)
    assert sdpa_plan("cuda", torch.float16, 64, gqa=True) == SdpaPlan("flash", False)
    assert sdpa_plan("cuda", torch.bfloat16, 512, gqa=True) == SdpaPlan("efficient", True)  # flash: head dim <= 256
    assert sdpa_plan("cpu", torch.float32, 64, gqa=True) == SdpaPlan("cpu", False)


def test_expanded_kv_equals_native_gqa():
    """The expanded-k/v call is the same attention as enable_gqa, forward and backward."""
    q = torch.randn(3, 6, 20, 8, requires_grad=True)
    k = torch.randn(3, 2, 20, 8, requires_grad=True)
    v = torch.randn(3, 2, 20, 8, requires_grad=True)
    results = []
    for plan in (SdpaPlan("cpu", False), SdpaPlan("efficient", True)):
        out = sdpa_causal(q, k, v, 0.3, plan=plan)
        results.append([out.detach(), *torch.autograd.grad(out.square().sum(), (q, k, v))])
    for a, b in zip(*results):
        assert_close(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_local_attention_runs_without_the_math_kernel_on_cuda(dtype):
    """With the math backend switched off, SDPA raises instead of falling back: the op (GQA,
    fp32 and bf16, forward and backward) and the op under bf16 autocast must still run."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    q, k, v, gate = _qkvg(4096, b=2, hq=8, hkv=2, d=64, dtype=dtype, device="cuda", grad=True)
    with sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.CUDNN_ATTENTION]):
        out, (M, _) = infini_attention(q, k, v, gate, segment_length=1024)
        out.float().square().mean().backward()
        assert M.dtype == torch.float32 and q.grad is not None
        if dtype == torch.float32:
            with torch.autocast("cuda", dtype=torch.bfloat16):
                out, _ = infini_attention(q, k, v, gate, segment_length=1024)
            out.float().square().mean().backward()
    ref, _ = infini_attention_naive(q.detach().float(), k.detach().float(), v.detach().float(), gate.detach(),
                                    segment_length=1024)
    got, _ = infini_attention(q.detach(), k.detach(), v.detach(), gate.detach(), segment_length=1024)
    tol = dict(rtol=2e-2, atol=2e-2) if dtype == torch.bfloat16 else dict(rtol=1e-3, atol=1e-4)
    assert_close(got.float(), ref, **tol)


# ----------------------------------------------------------------------------- bf16 training
def test_deepspeed_config_keeps_fp32_gradients_with_bf16():
    from megatron_infini.training.config import Config, ConfigError, load_config
    from megatron_infini.training.engine import deepspeed_config

    ds = deepspeed_config(load_config(None, ["deepspeed.precision=bf16"]), dp_size=1)
    assert ds["bf16"]["enabled"] and ds["data_types"] == {"grad_accum_dtype": "fp32"}
    assert ds["communication_data_type"] == "fp32"
    assert ds["optimizer"]["params"]["torch_adam"] and "fused" not in ds["optimizer"]["params"]  # auto on CPU: torch
    ds = deepspeed_config(load_config(None, ["deepspeed.precision=bf16", "deepspeed.zero_stage=0",
                                             "deepspeed.communication_data_type=bf16"]), dp_size=1)
    assert ds["data_types"] == {"grad_accum_dtype": "bf16"} and ds["communication_data_type"] == "bf16"
    ds = deepspeed_config(load_config(None, ["optimizer.impl=torch_fused"]), dp_size=1)
    assert ds["optimizer"]["params"]["fused"] is True and "data_types" not in ds  # fp32 on CPU
    with pytest.raises(ConfigError, match="deepspeed.grad_accum_dtype"):
        load_config(None, ["deepspeed.precision=bf16", "deepspeed.zero_stage=0", "deepspeed.grad_accum_dtype=fp32"])
    with pytest.raises(ConfigError, match="optimizer.impl"):
        load_config(None, ["optimizer.impl=apex"])
    with pytest.raises(ConfigError, match="model.fp8"):
        load_config(None, ["model.fp8=e5m2"])
    with pytest.raises(ConfigError, match="model.fp8 needs Transformer Engine"):
        load_config(None, ["model.fp8=hybrid", "model.transformer_impl=local"])
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="optimizer.impl=deepspeed"):
            deepspeed_config(load_config(None, ["optimizer.impl=deepspeed"]), dp_size=1)
    assert Config().train.compile is False


def test_bf16_training_on_cpu(tmp_path):
    """The debug config trains in bf16 on CPU (ZeRO-1, torch's fused AdamW): bf16 weights,
    fp32 accumulated gradients, fp32 master weights that the bf16 weights are the rounding of,
    fp32 Infini memory."""
    out = tmp_path / "report.json"
    env = dict(os.environ, OMP_NUM_THREADS="1", WANDB_MODE="disabled", PYTHONWARNINGS="ignore")
    env = {k: v for k, v in env.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    proc = subprocess.run(
        [sys.executable, os.path.join(REPO, "tests", "fixtures", "bf16_probe.py"), str(tmp_path / "run"), str(out),
         "train.steps=2", "train.global_batch_size=4", "train.micro_batch_size=2", "deepspeed.precision=bf16",
         "deepspeed.zero_stage=1", "optimizer.impl=torch_fused", "checkpoint.save_at_end=false"],
        cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:]
    r = json.loads(out.read_text())
    assert r["exit_code"] == 0
    assert r["wrapper"] == "BF16_Optimizer" and r["adamw_fused"] is True
    assert r["param_dtypes"] == ["bfloat16"] and r["activation_dtype"] == "bfloat16"
    assert r["master_dtypes"] == ["float32"] and r["bf16_is_rounded_master"] is True
    assert r["grad_dtypes"] == ["float32"] and r["grad_nonzero"]
    assert r["memory_dtypes"] == ["float32"] and r["memory_stats_dtypes"] == ["float32"]
    metrics = [json.loads(line) for line in open(tmp_path / "run" / "metrics.jsonl")]
    losses = [m["loss"] for m in metrics if "loss" in m]
    assert len(losses) == 2 and all(l == l and 0 < l < 20 for l in losses)


# ----------------------------------------------------------------------------- specs
def test_transformer_impl_choice():
    from megatron_infini.spec import choose_transformer_impl, have_transformer_engine

    assert choose_transformer_impl("auto", te_available=True) == "transformer_engine"
    assert choose_transformer_impl("auto", te_available=False) == "local"
    assert choose_transformer_impl("local", te_available=True) == "local"
    assert choose_transformer_impl("transformer_engine", te_available=True) == "transformer_engine"
    with pytest.raises(ValueError, match="transformer_engine does not import"):
        choose_transformer_impl("transformer_engine", te_available=False)
    with pytest.raises(ValueError, match="transformer_impl must be one of"):
        choose_transformer_impl("te")
    assert choose_transformer_impl() == ("transformer_engine" if have_transformer_engine() else "local")


def test_final_norm_choice():
    """Megatron's final-norm pick is replaced when it is torch's norm (no sequence parallel) or
    Apex's FusedLayerNorm (no RMSNorm); Transformer Engine's and ours are kept."""
    from megatron.core.fusions.fused_layer_norm import FusedLayerNorm
    from megatron.core.transformer.torch_norm import WrappedTorchNorm

    from megatron_infini.compat import final_norm_replacement
    from megatron_infini.layers import Norm

    class TENormStandIn:  # what transformer_block.LayerNormImpl is with TE
        pass

    assert final_norm_replacement(WrappedTorchNorm) is Norm
    assert final_norm_replacement(FusedLayerNorm) is Norm
    assert final_norm_replacement(TENormStandIn) is None
    assert final_norm_replacement(Norm) is None


def _apex_only_check(rank, world_size):
    """As with Apex installed and TE absent (Megatron then picks Apex's FusedLayerNorm as the final
    norm of a layer-spec model): the README's RMSNorm model builds and runs."""
    from megatron.core.fusions.fused_layer_norm import FusedLayerNorm
    from megatron.core.models.gpt import GPTModel
    from megatron.core.transformer import transformer_block

    from megatron_infini import get_gpt_layer_infini_spec, llama_config
    from megatron_infini.layers import Norm

    cfg = llama_config(num_layers=1, hidden_size=64, num_attention_heads=4, num_query_groups=2,
                       ffn_hidden_size=128, segment_length=16, use_cpu_initialization=True)
    transformer_block.LayerNormImpl = FusedLayerNorm  # Megatron's pick when `import apex` works
    try:
        FusedLayerNorm(cfg, 64)
        raise AssertionError("FusedLayerNorm accepted RMSNorm: the case this test reproduces is gone")
    except AssertionError as e:
        assert "not supported in FusedLayerNorm" in str(e)
    spec = get_gpt_layer_infini_spec(transformer_impl="local")
    model = GPTModel(config=cfg, transformer_layer_spec=spec, vocab_size=128, max_sequence_length=32,
                     position_embedding_type="rope")
    assert type(model.decoder.final_layernorm) is Norm and model.decoder.final_layernorm.rms
    ids = torch.randint(0, 128, (1, 32))
    loss = model(ids, torch.arange(32).unsqueeze(0), None, labels=ids).mean()
    loss.backward()
    assert torch.isfinite(loss)


def test_apex_only_rmsnorm_model_builds():
    run_distributed(_apex_only_check, 1)


def test_gpu_check_script_is_ready():
    """tools/gpu_check.sh parses, and without a GPU says so and exits 0 without running anything."""
    script = os.path.join(REPO, "tools", "gpu_check.sh")
    subprocess.run(["bash", "-n", script], check=True)
    help_text = subprocess.run(["bash", script, "--help"], capture_output=True, text=True, check=True).stdout
    assert "summary table" in help_text
    if not torch.cuda.is_available():
        proc = subprocess.run(["bash", script], capture_output=True, text=True, cwd=REPO,
                              env=dict(os.environ, PYTHON=sys.executable))
        assert proc.returncode == 0 and "no CUDA device" in proc.stdout + proc.stderr
    plan = subprocess.run([sys.executable, os.path.join(REPO, "tools", "gpu_check.py"), "--dry-run", "--only",
                           "op,train,stream"], capture_output=True, text=True, cwd=REPO, check=True).stdout
    assert [line.split()[0] for line in plan.splitlines()[1:4]] == ["op", "train", "stream"]  # more: test_gpu_check.py


# ----------------------------------------------------------------------------- inference dtype
def test_inference_dtype(debug_run, tmp_path):
    """--dtype: auto is bf16 on GPU and fp32 on CPU; a bf16 evaluation of the debug run gives the
    fp32 perplexity within bf16's precision, and says which dtype it loaded."""
    from train_utils import run_cli

    from megatron_infini.inference.loader import resolve_dtype

    assert resolve_dtype("auto", cuda=True) == torch.bfloat16 and resolve_dtype("auto", cuda=False) == torch.float32
    assert resolve_dtype("fp32", cuda=True) == torch.float32
    with pytest.raises(ValueError, match="dtype must be one of"):
        resolve_dtype("fp16")
    ppl = {}
    for dtype in ("fp32", "bf16"):
        out = tmp_path / f"{dtype}.json"
        text = run_cli("eval", "perplexity", "--checkpoint", debug_run, "--max-tokens", "300", "--no-ablation",
                       "--dtype", dtype, "--json", str(out))
        assert f"{dtype} weights" in text and "float32 memory state" in text
        ppl[dtype] = json.loads(out.read_text())["overall"]["ppl_memory_on"]
    assert abs(ppl["bf16"] / ppl["fp32"] - 1) < 0.05, ppl
    assert ppl["bf16"] != ppl["fp32"]  # bf16 really ran
