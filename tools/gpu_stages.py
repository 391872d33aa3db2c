"""Stages of tools/gpu_check.py that run in their own process: the op, its drift against float64,
the gpu-marked tests, streaming. Each takes a `StageContext`; `ctx.smoke` selects toy sizes on CPU
(the same code, so the CPU tests keep it alive). Rows are saved as they come (`ctx.row`).

Shapes (sequence first, as the op): q [s, b, hq, d], k/v [s, b, hkv, d], gate [hq].
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from typing import Dict, List, Optional

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class StageSkipped(Exception):
    """Raised by a stage that cannot run here; the message is the recorded reason."""


@dataclass
class StageContext:
    stage_dir: str
    """Directory for this stage's logs and runs."""
    result_path: str
    """JSON rewritten after every row, read by the runner (also after a kill at the cap)."""
    deadline: float
    """Wall-clock time (time.time()) at which the runner kills this stage."""
    smoke: bool = False
    """Toy sizes on CPU."""
    rows: List[dict] = field(default_factory=list)
    peak_max: Optional[float] = None
    metrics: Dict[str, object] = field(default_factory=dict)
    skipped: Optional[str] = None
    error: Optional[str] = None

    @property
    def device(self) -> str:
        return "cpu" if self.smoke else "cuda"

    def left(self) -> float:
        return self.deadline - time.time()

    def row(self, what: str, result: str, ok: Optional[bool] = None, **numbers) -> None:
        self.rows.append(dict(what=what, result=result, **({} if ok is None else {"ok": ok}), **numbers))
        self.flush()

    def reset_peak(self) -> None:
        """Start a new peak for `peak_gib` (the stage's own peak, `peak_max`, keeps the largest)."""
        if self.smoke or "torch" not in sys.modules:  # no torch yet: nothing allocated
            return
        import torch

        if torch.cuda.is_available():
            self.peak_max = self.stage_peak()
            torch.cuda.reset_peak_memory_stats()

    def note_peak(self, gib: float) -> None:
        """A child process's peak GPU memory (a trainer run's peak_mem_gb) counts to the stage's."""
        if not self.smoke:
            self.peak_max = max(gib, self.peak_max or 0.0)

    def stage_peak(self) -> Optional[float]:
        now = self.peak_gib()
        return self.peak_max if now is None else max(now, self.peak_max or 0.0)

    def peak_gib(self) -> Optional[float]:
        """Peak GPU memory since the last `reset_peak` (None on CPU)."""
        if self.smoke or "torch" not in sys.modules:
            return None
        import torch

        if torch.cuda.is_available() and torch.cuda.is_initialized():
            return torch.cuda.max_memory_allocated() / 2**30
        return None

    def flush(self) -> None:
        data = dict(rows=self.rows, metrics=self.metrics, peak_gpu_gib=self.stage_peak(), skipped=self.skipped,
                    error=self.error)
        tmp = self.result_path + ".tmp"
        with open(tmp, "w") as fh:
            json.dump(data, fh, indent=1)
        os.replace(tmp, self.result_path)


def length(s: int) -> str:
    """8192 -> "8K", 512 -> "512"."""
    return f"{s // 1024}K" if s % 1024 == 0 else str(s)


def _sync(device: str) -> None:
    import torch

    if device == "cuda":
        torch.cuda.synchronize()


# ----------------------------------------------------------------------------- SDPA kernel
#: aten op recorded by the profiler -> the SDPA backend it is (names of torch >= 2.1).
SDPA_OPS = {
    "aten::_scaled_dot_product_flash_attention_for_cpu": "cpu-flash",
    "aten::_scaled_dot_product_flash_attention": "flash",
    "aten::_scaled_dot_product_efficient_attention": "efficient",
    "aten::_scaled_dot_product_cudnn_attention": "cudnn",
    "aten::_scaled_dot_product_attention_math": "math",
}


def sdpa_backends(fn) -> List[str]:
    """The SDPA backends that really ran during `fn()` (forward and backward), read from the op
    names the profiler records; "math" means the slow fallback that materialises the scores."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    names = {e.key for e in prof.key_averages()}
    return sorted({backend for op, backend in SDPA_OPS.items() if op in names})


# ----------------------------------------------------------------------------- op
def op_cases(smoke: bool) -> dict:
    if smoke:
        return dict(dtype="fp32", lengths=[512, 1024], b=1, hq=4, hkv=2, d=16, N=128, rounds=2)
    return dict(dtype="bf16", lengths=[8192, 32768, 131072], b=1, hq=32, hkv=8, d=64, N=2048, rounds=5)


def _op_step(impl: str, q, k, v, gate, N: int, update: str):
    """One forward+backward of `impl`: fast (Infini), local (the same segment-local attention, no
    memory), full (one causal attention over the whole input)."""
    import torch.nn.functional as F

    from megatron_infini.ops import infini_attention, local_attention

    for t in (q, k, v, gate):
        t.grad = None  # every case starts without gradients (same peak memory whatever ran before)
    if impl == "fast":
        out, _ = infini_attention(q, k, v, gate, segment_length=N, update=update)
    elif impl == "local":
        out = local_attention(q, k, v, segment_length=N)
    else:  # (b, h, s, d) for SDPA
        out = F.scaled_dot_product_attention(q.permute(1, 2, 0, 3), k.permute(1, 2, 0, 3), v.permute(1, 2, 0, 3),
                                             is_causal=True, enable_gqa=q.shape[2] != k.shape[2])
    out.float().square().mean().backward()


def stage_op(ctx: StageContext) -> None:
    """Per length: the Infini op (linear and delta) against local attention only (memory off, same
    shapes) and flash full causal attention, timed round-robin; ratios are medians of per-round
    ratios. Peak memory per case, tokens/s (fwd+bwd), and the SDPA kernels that ran."""
    import torch

    from megatron_infini.flops import causal_attention_flops, infini_attention_flops

    c = op_cases(ctx.smoke)
    dev, dt = ctx.device, {"fp32": torch.float32, "bf16": torch.bfloat16}[c["dtype"]]
    b, hq, hkv, d, N = c["b"], c["hq"], c["hkv"], c["d"], c["N"]
    cases = [("fast", "linear"), ("fast", "delta"), ("local", "-"), ("full", "-")]
    ctx.metrics["shape"] = dict(c, device=dev)
    for s in c["lengths"]:
        if ctx.left() < 10:
            ctx.row(f"op {length(s)}", f"skipped: {ctx.left():.0f} s left of the stage's cap")
            continue
        torch.manual_seed(0)
        q = torch.randn(s, b, hq, d, device=dev, dtype=dt, requires_grad=True)
        k, v = (torch.randn(s, b, hkv, d, device=dev, dtype=dt, requires_grad=True) for _ in range(2))
        gate = torch.zeros(hq, device=dev, requires_grad=True)
        peak, kernels, times = {}, {}, {case: [] for case in cases}
        for impl, update in cases:  # warm-up, peak memory and kernels per case
            ctx.reset_peak()
            kernels[impl, update] = sdpa_backends(lambda: _op_step(impl, q, k, v, gate, N, update))
            _sync(dev)
            peak[impl, update] = ctx.peak_gib()
        for _ in range(c["rounds"]):
            for case in cases:
                _sync(dev)
                t0 = time.perf_counter()
                _op_step(case[0], q, k, v, gate, N, case[1])
                _sync(dev)
                times[case].append(time.perf_counter() - t0)
        med = {case: statistics.median(t) for case, t in times.items()}

        def ratio(a, bb):  # median over rounds of times[a] / times[bb]
            return statistics.median(x / y for x, y in zip(times[a], times[bb]))

        full, local = ("full", "-"), ("local", "-")
        full_flops = 3.5 * causal_attention_flops(s, b, hq, d, d)  # fwd + bwd
        for case in cases[:2]:
            flops = 3.5 * infini_attention_flops(s, b, hq, hkv, d, d, N, case[1])  # fwd + bwd (2.5x fwd)
            nums = dict(s=s, update=case[1], ms=med[case] * 1e3, local_ms=med[local] * 1e3, full_ms=med[full] * 1e3,
                        tokens_per_s=b * s / med[case], local_tokens_per_s=b * s / med[local],
                        full_over_fast=ratio(full, case), fast_over_local=ratio(case, local),
                        tflops=flops / med[case] / 1e12, full_tflops=full_flops / med[full] / 1e12,
                        peak_gib=peak[case], local_peak_gib=peak[local], full_peak_gib=peak[full],
                        sdpa=kernels[case], full_sdpa=kernels[full])
            math_used = "math" in kernels[case] or "math" in kernels[local]
            ctx.row(f"op {length(s)} {case[1]} ({c['dtype']}, {hq}/{hkv} heads, d {d}, segment {N})",
                    f"Infini {nums['ms']:.1f} ms ({nums['tokens_per_s']:,.0f} tok/s, {nums['tflops']:.3g} TFLOP/s); "
                    f"local only {nums['local_ms']:.1f} ms: Infini/local {nums['fast_over_local']:.2f}x; "
                    f"full causal {nums['full_ms']:.1f} ms ({nums['full_tflops']:.3g} TFLOP/s): "
                    f"full/Infini {nums['full_over_fast']:.1f}x; "
                    f"SDPA {'+'.join(kernels[case]) or 'none'} (full: {'+'.join(kernels[full]) or 'none'})"
                    + (f"; peak {peak[case]:.1f} GiB (full {peak[full]:.1f})" if peak[case] is not None else ""),
                    ok=not math_used, **nums)
        del q, k, v, gate


# ----------------------------------------------------------------------------- drift
def infini_reference_fp64(q, k, v, gate, N: int, update: str, eps: float = 1e-6):
    """The paper's segment loop in float64 (Munkhdalai et al. 2024, eqs. 1-10), written
    independently of ops/naive.py: q [s, b, hq, d], k/v [s, b, hkv, d] -> out [s, b, hq, d],
    M [b, hkv, d, d], z [b, hkv, d], all float64."""
    import torch
    import torch.nn.functional as F

    s, b, hq, d = q.shape
    hkv, g = k.shape[2], hq // k.shape[2]
    q, k, v = (x.double() for x in (q, k, v))
    beta = torch.sigmoid(gate.double()).view(1, hq, 1, 1)  # (1, hq, 1, 1)
    M = q.new_zeros(b, hkv, d, d)
    z = q.new_zeros(b, hkv, d)
    outs = []
    for start in range(0, s, N):
        qs, ks, vs = (x[start:start + N].permute(1, 2, 0, 3) for x in (q, k, v))  # (b, h, T, d)
        kq, vq = ks.repeat_interleave(g, 1), vs.repeat_interleave(g, 1)  # (b, hq, T, d): head i reads i // g
        T = qs.shape[2]
        scores = (qs @ kq.transpose(-1, -2)) / d**0.5  # (b, hq, T, T)
        scores = scores.masked_fill(torch.ones(T, T, dtype=torch.bool, device=q.device).triu(1), float("-inf"))
        a_dot = scores.softmax(-1) @ vq
        sq, sk = F.elu(qs) + 1, F.elu(ks) + 1
        Mq, zq = M.repeat_interleave(g, 1), z.repeat_interleave(g, 1)  # (b, hq, d, d), (b, hq, d)
        a_mem = (sq @ Mq) / ((sq @ zq.unsqueeze(-1)) + eps)
        outs.append((beta * a_mem + (1 - beta) * a_dot).permute(2, 0, 1, 3))  # (T, b, hq, d)
        if update == "delta":
            vs = vs - (sk @ M) / ((sk @ z.unsqueeze(-1)) + eps)
        M = M + sk.transpose(-1, -2) @ vs
        z = z + sk.sum(2)
    return torch.cat(outs), M, z


def rel_errors(got, ref) -> dict:
    """max |got - ref| / max |ref| and ||got - ref|| / ||ref|| (float64)."""
    diff = got.double() - ref
    return dict(max=(diff.abs().max() / ref.abs().max()).item(), fro=(diff.norm() / ref.norm()).item())


#: A row fails when the memory (M, z) or the output drifts further than this (max-abs relative).
DRIFT_LIMITS = dict(memory=1e-3, out=3e-2)


def stage_drift(ctx: StageContext) -> None:
    """The bf16 op (float32 memory) against the float64 reference fed the same bf16 values."""
    import torch

    from megatron_infini.ops import infini_attention

    dev = ctx.device
    lengths, (hq, hkv, d, N) = ([256, 1024], (4, 2, 16, 64)) if ctx.smoke else ([8192, 131072], (32, 8, 64, 2048))
    for s in lengths:
        for update in ("linear", "delta"):
            if ctx.left() < 5:
                ctx.row(f"drift {length(s)} {update}", f"skipped: {ctx.left():.0f} s left")
                continue
            g = torch.Generator(device=dev).manual_seed(0)
            q, k, v = (torch.randn(s, 1, h, d, device=dev, generator=g).bfloat16() for h in (hq, hkv, hkv))
            gate = torch.linspace(-2, 2, hq, device=dev)
            with torch.no_grad():
                out, (M, z) = infini_attention(q, k, v, gate, segment_length=N, update=update)
                ref_out, ref_M, ref_z = infini_reference_fp64(q, k, v, gate, N, update)
            e = dict(M=rel_errors(M, ref_M), z=rel_errors(z, ref_z), out=rel_errors(out, ref_out))
            ok = max(e["M"]["max"], e["z"]["max"]) <= DRIFT_LIMITS["memory"] and e["out"]["max"] <= DRIFT_LIMITS["out"]
            ctx.row(f"drift {length(s)} {update}: bf16 op (fp32 memory) vs float64",
                    f"max rel. error M {e['M']['max']:.1e}, z {e['z']['max']:.1e}, out {e['out']['max']:.1e} "
                    f"(Frobenius: M {e['M']['fro']:.1e}, out {e['out']['fro']:.1e})", ok=ok, s=s, update=update,
                    errors=e)
            del q, k, v, out, M, z, ref_out, ref_M, ref_z


# ----------------------------------------------------------------------------- tests
def stage_tests(ctx: StageContext) -> None:
    """pytest -m gpu over the suite (in smoke mode: the marker's selection is only collected)."""
    cmd = [sys.executable, "-m", "pytest", "-q", "-m", "gpu", "-p", "no:cacheprovider", "tests/"]
    if ctx.smoke:
        cmd.append("--collect-only")
    log = os.path.join(ctx.stage_dir, "pytest.log")
    with open(log, "w") as fh:
        try:
            env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "4"))
            code = subprocess.run(cmd, cwd=REPO, stdout=fh, stderr=subprocess.STDOUT, env=env,
                                  timeout=max(1, ctx.left() - 3)).returncode
        except subprocess.TimeoutExpired:
            code = "timeout"
    lines = open(log, errors="replace").read().strip().splitlines()
    summary = next((l for l in reversed(lines) if any(w in l for w in (" passed", " failed", " error", "selected"))),
                   "no summary")
    ctx.row("pytest -m gpu", summary.strip("= "), ok=code == 0, exit=code)


# ----------------------------------------------------------------------------- stream
LLAMA_1B = os.path.join(REPO, "configs", "llama-1b-infini.yaml")
VOCAB = 128256  # Llama 3's vocabulary, so the output layer has its real size


def stage_stream(ctx: StageContext) -> None:
    """Random-weight 1B model (bf16), 1M random tokens streamed in chunks (StreamingLM); smoke: the
    debug model, 2K tokens, fp32 on CPU."""
    import torch

    from megatron_infini.inference.loader import inference_session
    from megatron_infini.inference.stream import StreamingLM, memory_numbers
    from megatron_infini.training.config import load_config
    from megatron_infini.training.model import build_model

    config, vocab, tokens = (None, 512, 2048) if ctx.smoke else (LLAMA_1B, VOCAB, 1 << 20)
    with inference_session():
        cfg = load_config(config, [f"model.vocab_size={vocab}"])
        model = build_model(cfg, vocab, bf16=not ctx.smoke).eval()
        lm = StreamingLM(model, chunk_segments=16)
        g = torch.Generator().manual_seed(0)
        lm.feed(torch.randint(0, vocab, (1, lm.chunk), generator=g))  # warm-up (not counted)
        lm.reset()
        pieces = (torch.randint(0, vocab, (1, lm.chunk), generator=g) for _ in range(tokens // lm.chunk))
        _sync(ctx.device)
        ctx.reset_peak()
        t0 = time.perf_counter()
        lm.feed(pieces)
        _sync(ctx.device)
        dt = time.perf_counter() - t0
    n = tokens // lm.chunk * lm.chunk
    peak = ctx.peak_gib()
    ctx.row(f"{'debug' if ctx.smoke else '1B'} model, streaming prefill of {n:,} tokens (chunks of {lm.chunk})",
            f"{n / dt:,.0f} tokens/s, {dt:.1f} s" + (f"; peak {peak:.1f} GiB" if peak is not None else "")
            + f"; memory state {memory_numbers(model) * 4 / 2**20:.1f} MiB", tokens=n, seconds=dt,
            tokens_per_s=n / dt, peak_gib=peak)
