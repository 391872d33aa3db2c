#!/usr/bin/env python3
"""One GPU validation run that fits one device command (~9 minutes), results saved after every stage.

Stages run in value order, each in its own process under its own cap (seconds); the caps add up
to at most the budget, and a stage whose cap no longer fits in what is left of the budget, or
whose needs are not met (2 GPUs, megatron-core), is skipped with the reason recorded:

  op        the op in bf16, fwd+bwd, 8K/32K/128K tokens: Infini against local attention only (memory
            off) and flash full causal attention; tokens/s, peak memory, SDPA kernel that ran
  drift     memory (M, z) and output of the bf16 op against a float64 reference, 8K and 128K tokens
  tests     pytest -m gpu
  train     1B preset, 32K tokens, 128K vocabulary: Infini against local only (model.memory_enabled
            false), tokens/s, MFU, peak memory
  compile   train.compile=true (Inductor) against eager: losses, time per step, compile time
  multigpu  TP=2 + SP, CP=2, ZeRO-1 over DP=2 against one GPU (>= 2 GPUs): losses, tokens/s
  stream    streaming prefill of 1M tokens through the 1B model: tokens/s, peak memory
  resume    (not in the default set) 2 steps + save + resume against 4 straight steps

gpu_check.json and gpu_check.md are written to --out (default: a new temporary directory) and to
$OUT when set, after every stage, so a run cut short keeps what it measured.

    bash tools/gpu_check.sh                        # on the GPU machine (installs carried wheels first)
    python tools/gpu_check.py --dry-run            # the plan: stages, caps, total against the budget
    python tools/gpu_check.py --cpu-smoke --only op,drift   # the stages' code at toy sizes on CPU
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass, replace
from typing import Callable, Optional

TOOLS = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(TOOLS)
DEFAULT_BUDGET_S = 520.0
"""Seconds for all stages; tools/gpu_check.sh passes 540 s less its install time."""


@dataclass(frozen=True)
class Stage:
    name: str
    cap_s: float
    """The stage's process is killed after this many seconds (rows written so far are kept)."""
    fn: str
    """"module:function" under tools/, called in the stage's process with a `StageContext`."""
    what: str
    needs: str = ""
    """Comma-separated: megatron (megatron-core and DeepSpeed import), gpus2 (>= 2 GPUs)."""


#: Value order: the op's speed and numerics first, the trainer's paths after.
STAGES = (
    Stage("op", 60, "gpu_stages:stage_op", "op fwd+bwd: Infini vs local only vs flash full causal; SDPA kernel"),
    Stage("drift", 30, "gpu_stages:stage_drift", "bf16 op's memory and output against float64, 8K and 128K"),
    Stage("tests", 50, "gpu_stages:stage_tests", "pytest -m gpu", needs="megatron"),
    Stage("train", 130, "gpu_train_stages:stage_train", "1B preset at 32K: Infini vs local only", needs="megatron"),
    Stage("compile", 100, "gpu_train_stages:stage_compile", "Inductor-compiled training vs eager", needs="megatron"),
    Stage("multigpu", 110, "gpu_train_stages:stage_multigpu", "TP=2+SP, CP=2, ZeRO-1 DP=2 vs 1 GPU",
          needs="megatron,gpus2"),
    Stage("stream", 40, "gpu_stages:stage_stream", "streaming prefill of 1M tokens, 1B model", needs="megatron"),
)
OPTIONAL = (
    Stage("resume", 60, "gpu_train_stages:stage_resume", "4 steps vs 2 + save + resume", needs="megatron"),
)
ALL = {s.name: s for s in STAGES + OPTIONAL}


def plan_text(stages, budget_s: float) -> str:
    total = sum(s.cap_s for s in stages)
    lines = [f"{'stage':<9} {'cap s':>6}  {'needs':<15} what"]
    lines += [f"{s.name:<9} {s.cap_s:>6.0f}  {s.needs or '-':<15} {s.what}" for s in stages]
    rest = [s.name for s in ALL.values() if s not in stages]
    lines.append(f"total of caps {total:.0f} s {'<=' if total <= budget_s else '>'} budget {budget_s:.0f} s"
                 + (f"; not selected: {', '.join(rest)} (--only)" if rest else ""))
    return "\n".join(lines)


# ----------------------------------------------------------------------------- report
def write_report(report: dict, dirs) -> None:
    """gpu_check.json and gpu_check.md into each of `dirs` (atomic replace)."""
    md = markdown(report)
    for d in dirs:
        for name, text in (("gpu_check.json", json.dumps(report, indent=1)), ("gpu_check.md", md)):
            tmp = os.path.join(d, f".{name}.tmp")
            with open(tmp, "w") as fh:
                fh.write(text)
            os.replace(tmp, os.path.join(d, name))


def markdown(report: dict) -> str:
    head = (f"## gpu_check: {report['device']}, torch {report['torch']}, {report['started']}, "
            f"{report['elapsed_s']:.0f} s of {report['budget_s']:.0f} s budget\n\n"
            "| stage | cap s | status | time s | peak GPU GiB | what | result |\n|---|---:|---|---:|---:|---|---|\n")
    lines = []
    for st in report["stages"]:
        peak = "" if st.get("peak_gpu_gib") is None else f"{st['peak_gpu_gib']:.1f}"
        first = (st["name"], f"{st['cap_s']:.0f}", st["status"], f"{st.get('seconds', 0):.0f}", peak)
        rows = st.get("rows") or [{"what": st.get("reason", ""), "result": ""}]
        for i, row in enumerate(rows):
            cells = first if i == 0 else ("", "", "", "", "")
            lines.append(_md_row(*cells, row["what"], row["result"]))
        if st.get("reason") and st.get("rows"):
            lines.append(_md_row("", "", "", "", "", "reason", st["reason"]))
    return head + "\n".join(lines) + "\n"


def _md_row(*cells: str) -> str:
    return "| " + " | ".join(c.replace("|", "\\|").replace("\n", " / ") for c in cells) + " |"


# ----------------------------------------------------------------------------- runner
class Runner:
    """Runs stages in child processes under their caps and rewrites the report after each."""

    def __init__(self, stages, budget_s: float, work: str, report_dirs, smoke: bool, env_info: dict):
        self.stages, self.budget_s, self.work, self.smoke = stages, budget_s, work, smoke
        self.report_dirs = report_dirs
        self.t0 = time.monotonic()
        self.report = dict(env_info, budget_s=budget_s, elapsed_s=0.0, smoke=smoke,
                           started=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
                           caps_total_s=sum(s.cap_s for s in stages), stages=[])

    def left(self) -> float:
        return self.budget_s - (time.monotonic() - self.t0)

    def unmet(self, stage: Stage) -> Optional[str]:
        needs = set(filter(None, stage.needs.split(",")))
        if "megatron" in needs:
            missing = [m for m in ("megatron.core", "deepspeed") if not _importable(m)]
            if missing:
                return f"{', '.join(missing)} not importable (carry wheels: tools/gpu_wheels.sh)"
        if "gpus2" in needs and not self.smoke and self.report["gpus"] < 2:
            return f"{self.report['gpus']} GPU visible, needs 2 (torchrun with nccl)"
        return None

    def run_all(self) -> dict:
        for stage in self.stages:
            entry = dict(name=stage.name, cap_s=stage.cap_s, what=stage.what, status="skipped", rows=[])
            reason = self.unmet(stage)
            if reason is None and stage.cap_s > self.left():
                reason = f"its cap {stage.cap_s:.0f} s does not fit in the {self.left():.0f} s left of the budget"
            if reason:
                entry["reason"] = reason
            else:
                entry.update(self.run_stage(stage))
            print(f"[gpu_check] {stage.name}: {entry['status']} after {entry.get('seconds', 0):.0f} s"
                  + (f" ({entry['reason']})" if entry.get("reason") else ""), flush=True)
            self.report["stages"].append(entry)
            self.report["elapsed_s"] = time.monotonic() - self.t0
            write_report(self.report, self.report_dirs)
        return self.report

    def run_stage(self, stage: Stage) -> dict:
        out = os.path.join(self.work, stage.name)
        os.makedirs(out, exist_ok=True)
        result, log = os.path.join(out, "result.json"), os.path.join(out, "stage.log")
        deadline = time.time() + stage.cap_s
        cmd = [sys.executable, os.path.abspath(__file__), "--worker", stage.fn, "--result", result,
               "--stage-dir", out, "--deadline", f"{deadline:.3f}"] + (["--smoke"] if self.smoke else [])
        t0 = time.monotonic()
        with open(log, "w") as fh:
            proc = subprocess.Popen(cmd, cwd=REPO, env=_env(), stdout=fh, stderr=subprocess.STDOUT,
                                    start_new_session=True)  # its own process group: killed whole at the cap
            try:
                code = proc.wait(timeout=stage.cap_s)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
                code = "timeout"
        got = json.load(open(result)) if os.path.exists(result) else {}
        entry = dict(seconds=time.monotonic() - t0, rows=got.get("rows", []), metrics=got.get("metrics", {}),
                     peak_gpu_gib=got.get("peak_gpu_gib"), log=log)
        if code == "timeout":
            entry.update(status="timeout", reason=f"killed at its cap of {stage.cap_s:.0f} s (rows so far kept)")
        elif got.get("skipped"):
            entry.update(status="skipped", reason=got["skipped"])
        elif code != 0:
            entry.update(status="error", reason=got.get("error") or f"exit {code}; log tail: {_tail(log)}")
        else:
            entry["status"] = "fail" if any(r.get("ok") is False for r in entry["rows"]) else "pass"
        if entry["status"] in ("error", "fail", "timeout"):
            entry["log_tail"] = _tail(log, 40)
        return entry


def _importable(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def _env() -> dict:
    path = os.pathsep.join(filter(None, [REPO, TOOLS, os.environ.get("PYTHONPATH", "")]))
    return dict(os.environ, PYTHONPATH=path, WANDB_MODE="disabled", PYTHONWARNINGS="ignore", PYTHONUNBUFFERED="1")


def _tail(path: str, n: int = 5) -> str:
    try:
        return "\n".join(open(path, errors="replace").read().strip().splitlines()[-n:])
    except OSError:
        return ""


# ----------------------------------------------------------------------------- worker
def run_worker(a) -> int:
    """In the stage's process: call the stage function ("module:function"); its rows are saved as they come."""
    sys.path.insert(0, TOOLS)
    from gpu_stages import StageContext, StageSkipped

    ctx = StageContext(stage_dir=a.stage_dir, result_path=a.result, deadline=a.deadline, smoke=a.smoke)
    module, fn = a.worker.split(":")
    func: Callable = getattr(importlib.import_module(module), fn)
    try:
        ctx.reset_peak()
        func(ctx)
    except StageSkipped as e:
        ctx.skipped = str(e)
    except Exception as e:  # the report says what broke; the process exits non-zero
        traceback.print_exc()
        ctx.error = f"{type(e).__name__}: {e}"[:2000]
        ctx.flush()
        return 1
    ctx.flush()
    return 0


def environment(smoke: bool) -> dict:
    import torch

    cuda = torch.cuda.is_available()
    gpus = torch.cuda.device_count() if cuda else 0
    name = torch.cuda.get_device_name() if cuda else "CPU (smoke run)"
    mem = torch.cuda.get_device_properties(0).total_memory / 2**30 if cuda else 0.0
    return dict(device=f"{gpus} x {name} ({mem:.0f} GiB)" if cuda else name, gpus=gpus,
                torch=torch.__version__, cuda=torch.version.cuda, python=sys.version.split()[0])


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--budget-s", type=float, default=DEFAULT_BUDGET_S,
                   help=f"seconds for all stages (default {DEFAULT_BUDGET_S:.0f})")
    p.add_argument("--out", default=None, help="directory for logs, runs and the report (default: a new temporary one)")
    p.add_argument("--only", default=",".join(s.name for s in STAGES),
                   help=f"comma-separated stages, run in value order; choose from {list(ALL)}")
    p.add_argument("--dry-run", action="store_true", help="print the stages, caps and total; run nothing")
    p.add_argument("--cpu-smoke", action="store_true", help="run the stages at toy sizes on CPU (tests the code)")
    p.add_argument("--cap-scale", type=float, default=1.0,
                   help="multiply every cap and the budget (e.g. 4 for --cpu-smoke on a slow CPU)")
    for hidden in ("--worker", "--result", "--stage-dir"):
        p.add_argument(hidden, default=None, help=argparse.SUPPRESS)
    p.add_argument("--deadline", type=float, default=0.0, help=argparse.SUPPRESS)
    p.add_argument("--smoke", action="store_true", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.worker:
        return run_worker(a)
    names = [s for s in a.only.split(",") if s]
    bad = [s for s in names if s not in ALL]
    if bad:
        p.error(f"--only: unknown stage(s) {bad}; choose from {list(ALL)}")
    stages = [replace(s, cap_s=s.cap_s * a.cap_scale) for s in STAGES + OPTIONAL if s.name in names]
    a.budget_s *= a.cap_scale
    if a.dry_run:
        print(plan_text(stages, a.budget_s))
        return 0
    info = environment(a.cpu_smoke)
    if not info["gpus"] and not a.cpu_smoke:
        print("gpu_check: no CUDA device here (torch.cuda.is_available() is False): nothing to check "
              "(--cpu-smoke runs the stages' code at toy sizes on CPU)")
        return 0
    work = a.out or tempfile.mkdtemp(prefix="gpu_check_")
    os.makedirs(work, exist_ok=True)
    dirs = [work] + ([os.environ["OUT"]] if os.environ.get("OUT") and os.path.isdir(os.environ["OUT"]) else [])
    print(plan_text(stages, a.budget_s), flush=True)
    report = Runner(stages, a.budget_s, work, dirs, a.cpu_smoke, info).run_all()
    print("\n" + markdown(report))
    print(f"report: {', '.join(os.path.join(d, 'gpu_check.json') for d in dirs)}; logs and runs in {work}")
    return 1 if any(s["status"] in ("fail", "error", "timeout") for s in report["stages"]) else 0


if __name__ == "__main__":
    sys.exit(main())
