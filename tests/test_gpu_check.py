"""tools/gpu_check.sh / gpu_check.py, the one prepared script for a lent GPU machine, checked on CPU:
the stages' caps fit the budget and the dry run lists them; the runner saves its report after every
stage and records timeouts, skips and errors; the op, drift and train stages run at toy sizes
(`--cpu-smoke`), with the numbers they print derived from what they measured; the float64 reference
of the drift stage equals the naive op; the SDPA kernel is read from the profiler."""

import json
import os
import re
import subprocess
import sys

import pytest
import torch
from torch.testing import assert_close

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, "tools"))

import gpu_check  # noqa: E402
from gpu_check import Stage  # noqa: E402
from gpu_stages import infini_reference_fp64, sdpa_backends  # noqa: E402

SLOW = pytest.mark.skipif(not os.environ.get("MEGATRON_INFINI_SLOW"), reason="slow: set MEGATRON_INFINI_SLOW=1")
ENV = dict(os.environ, OMP_NUM_THREADS="1", WANDB_MODE="disabled", PYTHONWARNINGS="ignore", PYTHON=sys.executable)


def test_caps_fit_the_budget_and_the_dry_run_lists_every_stage():
    total = sum(s.cap_s for s in gpu_check.STAGES)
    assert total <= gpu_check.DEFAULT_BUDGET_S
    sh = open(os.path.join(REPO, "tools", "gpu_check.sh")).read()
    whole = int(re.search(r"GPU_CHECK_TOTAL_S:-(\d+)", sh).group(1))
    assert gpu_check.DEFAULT_BUDGET_S <= whole - 10 and whole <= 560  # install included, under a 600 s command
    out = subprocess.run(["bash", os.path.join(REPO, "tools", "gpu_check.sh"), "--dry-run"], cwd=REPO, env=ENV,
                         capture_output=True, text=True, check=True).stdout
    for stage in gpu_check.STAGES:
        assert re.search(rf"^{stage.name}\s+{stage.cap_s:.0f}\s", out, re.M), (stage.name, out)
    assert f"total of caps {total:.0f} s <= budget {gpu_check.DEFAULT_BUDGET_S:.0f} s" in out
    assert "not selected: resume" in out


def _report(path):
    report = json.load(open(os.path.join(path, "gpu_check.json")))
    return report, {s["name"]: s for s in report["stages"]}


def test_runner_saves_the_report_after_every_stage(tmp_path, monkeypatch):
    """Each stage sees the report of all stages before it on disk; a hung stage is killed at its cap
    with its first row kept; skips, errors and failures are recorded with their reasons; a stage
    whose cap no longer fits in the budget is skipped."""
    fixtures = os.path.join(REPO, "tests", "fixtures")
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([fixtures, os.environ.get("PYTHONPATH", "")]))
    work, out = tmp_path / "work", tmp_path / "out"
    work.mkdir(), out.mkdir()
    monkeypatch.setenv("FAKE_REPORT_DIR", str(out))
    fake = "gpu_fake_stages:"
    stages = [Stage("first", 60, fake + "reports_seen", "-"), Stage("hang", 5, fake + "hangs", "-"),
              Stage("skip", 60, fake + "skips", "-"), Stage("boom", 60, fake + "raises", "-"),
              Stage("fail", 60, fake + "fails", "-"), Stage("second", 60, fake + "reports_seen", "-"),
              Stage("too_big", 10_000, fake + "reports_seen", "-"),
              Stage("two_gpus", 5, fake + "reports_seen", "-", needs="gpus2")]
    info = dict(device="test", gpus=1, torch=torch.__version__)
    gpu_check.Runner(stages, 600, str(work), [str(work), str(out)], smoke=False, env_info=info).run_all()
    report, st = _report(out)
    assert {k: v["status"] for k, v in st.items()} == dict(
        first="pass", hang="timeout", skip="skipped", boom="error", fail="fail", second="pass", too_big="skipped",
        two_gpus="skipped")
    assert st["first"]["rows"][0]["seen"] == []
    assert st["second"]["rows"][0]["seen"] == ["first", "hang", "skip", "boom", "fail"]
    assert [r["what"] for r in st["hang"]["rows"]] == ["first row"] and st["hang"]["seconds"] < 30
    assert st["skip"]["reason"] == "not here" and "broken on purpose" in st["boom"]["reason"]
    assert "does not fit" in st["too_big"]["reason"] and "needs 2" in st["two_gpus"]["reason"]
    assert _report(work)[0] == report
    md = open(out / "gpu_check.md").read()
    assert all(f"| {name} |" in md for name in st)
    table = [line for line in md.splitlines() if line.startswith("|")]
    assert all(len(re.split(r"(?<!\\)\|", line)) == 9 for line in table), md  # 7 cells, pipes in text escaped


def test_cpu_smoke_runs_the_op_drift_and_train_stages(tmp_path):
    """The real stage code at toy sizes on CPU; the report lands in $OUT too."""
    out = tmp_path / "out"
    out.mkdir()
    proc = subprocess.run([sys.executable, os.path.join(REPO, "tools", "gpu_check.py"), "--cpu-smoke",
                           "--only", "op,drift,train", "--cap-scale", "4", "--out", str(tmp_path / "work")],
                          cwd=REPO, env=dict(ENV, OUT=str(out)), capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    _, st = _report(out)
    assert [st[n]["status"] for n in ("op", "drift", "train")] == ["pass"] * 3, json.dumps(st, indent=1)[-3000:]
    op = st["op"]["rows"]
    assert [(r["s"], r["update"]) for r in op] == [(512, "linear"), (512, "delta"), (1024, "linear"), (1024, "delta")]
    for r in op:
        assert r["sdpa"] == r["full_sdpa"] == ["cpu-flash"], r
        assert r["tokens_per_s"] == pytest.approx(r["s"] / (r["ms"] / 1e3)), r
        assert r["local_tokens_per_s"] == pytest.approx(r["s"] / (r["local_ms"] / 1e3)), r
        assert r["fast_over_local"] > 0 and r["full_over_fast"] > 0
    for r in st["drift"]["rows"]:
        assert r["ok"] and r["errors"]["M"]["max"] < 1e-5 and 0 < r["errors"]["out"]["max"] < 1e-2, r
    train = {r.get("variant", "ratio"): r for r in st["train"]["rows"]}
    assert set(train) == {"infini", "local", "ratio"}, train
    assert train["ratio"]["ratio"] == pytest.approx(train["infini"]["tokens_per_s"] / train["local"]["tokens_per_s"])


@pytest.mark.parametrize("update", ["linear", "delta"])
def test_float64_reference_equals_the_naive_op(update):
    """The drift stage's float64 reference against ops' float32 naive op: GQA, odd head dim, a short
    last segment."""
    from megatron_infini.ops import infini_attention_naive

    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(90, 2, h, 12, generator=g) for h in (6, 2, 2))
    gate = torch.linspace(-1.5, 1.5, 6)
    ref_out, (ref_M, ref_z) = infini_attention_naive(q, k, v, gate, segment_length=32, update=update)
    out, M, z = infini_reference_fp64(q, k, v, gate, 32, update)
    assert out.dtype == M.dtype == torch.float64
    for got, ref in ((out, ref_out), (M, ref_M), (z, ref_z)):
        assert_close(got.float(), ref, rtol=1e-5, atol=1e-5)


def test_sdpa_backend_is_read_from_the_profiler():
    from torch.nn.attention import SDPBackend, sdpa_kernel

    q = torch.randn(1, 2, 64, 16, requires_grad=True)

    def step():
        torch.nn.functional.scaled_dot_product_attention(q, q, q, is_causal=True).sum().backward()

    assert sdpa_backends(step) == ["cpu-flash"]
    with sdpa_kernel([SDPBackend.MATH]):
        assert sdpa_backends(step) == ["math"]


@SLOW
def test_cpu_smoke_runs_the_trainer_stages(tmp_path):
    """compile (Inductor on CPU), several ranks (gloo), stream, resume and the tests stage's
    collection, at toy sizes."""
    proc = subprocess.run([sys.executable, os.path.join(REPO, "tools", "gpu_check.py"), "--cpu-smoke", "--only",
                           "tests,compile,multigpu,stream,resume", "--cap-scale", "8", "--out", str(tmp_path)],
                          cwd=REPO, env=ENV, capture_output=True, text=True, timeout=3600)
    _, st = _report(tmp_path)
    assert {k: v["status"] for k, v in st.items()} == dict.fromkeys(
        ("tests", "compile", "multigpu", "stream", "resume"), "pass"), proc.stdout[-5000:]
    assert len(st["multigpu"]["rows"]) == 4 and all(r.get("ok", True) for r in st["multigpu"]["rows"])
    assert proc.returncode == 0


def test_train_stage_recomputes_only_where_the_estimate_does_not_fit():
    from gpu_train_stages import LLAMA_1B, VOCAB, needs_recompute

    model = [f"model.vocab_size={VOCAB}"]
    assert not needs_recompute(LLAMA_1B, model, 32768, gpu_gib=1000.0)
    assert needs_recompute(LLAMA_1B, model, 32768, gpu_gib=8.0)


def test_gpu_check_sh_installs_carried_wheels_and_passes_the_rest_of_the_budget(tmp_path):
    """With a stand-in python that has CUDA but no megatron-core: the wheels in .whl are installed
    into /tmp/gpu_check_site (put on PYTHONPATH), and gpu_check.py gets 540 s less the time spent
    and 10 s of margin as its budget; a budget given on the command line is kept."""
    repo = tmp_path / "repo"
    (repo / "tools").mkdir(parents=True)
    (repo / ".whl").mkdir()
    (repo / ".whl" / "x-1-py3-none-any.whl").write_text("")
    script = repo / "tools" / "gpu_check.sh"
    script.write_text(open(os.path.join(REPO, "tools", "gpu_check.sh")).read())
    fake = tmp_path / "python"
    fake.write_text('#!/bin/sh\ncase "$*" in\n  *cuda.is_available*) exit 0 ;;\n  *megatron.core*) exit 1 ;;\n'
                    '  *) echo "CALLED $* PYTHONPATH=$PYTHONPATH" ;;\nesac\n')
    fake.chmod(0o755)
    env = dict(ENV, PYTHON=str(fake), PATH="/usr/bin:/bin")
    out = subprocess.run(["bash", str(script), "--only", "op"], cwd=repo, env=env, capture_output=True, text=True,
                         check=True).stdout
    calls = [line for line in out.splitlines() if line.startswith("CALLED")]
    assert "-m pip install" in calls[0] and "--no-index" in calls[0] and "--target /tmp/gpu_check_site" in calls[0]
    budget = int(re.search(r"tools/gpu_check.py --budget-s (\d+) --only op", calls[1]).group(1))
    assert 520 <= budget <= 530 and calls[1].rstrip().endswith(":/tmp/gpu_check_site"), calls
    out = subprocess.run(["bash", str(script), "--budget-s", "100"], cwd=repo, env=env, capture_output=True,
                         text=True, check=True).stdout
    assert "tools/gpu_check.py --budget-s 100 PYTHONPATH" in out, out
