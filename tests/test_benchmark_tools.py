"""The benchmark commands of docs/benchmarks.md, docs/context-parallel.md and docs/checkpoints.md
run at toy sizes, so the documented commands keep working. Timings are not asserted (the
machines are shared); what the tools derive from them is: FLOP rates are the counted FLOPs over
the measured time, the printed ratios are quotients of the measured throughputs, the relay's
bytes are whole [M | z] states, a checkpoint holds at least weights and both Adam moments."""

import json
import os
import re
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _tool(name, *args, timeout=300):
    env = dict(os.environ, OMP_NUM_THREADS="1", WANDB_MODE="disabled", PYTHONWARNINGS="ignore")
    r = subprocess.run([sys.executable, os.path.join(REPO, "tools", name), *map(str, args)], cwd=REPO, env=env,
                       capture_output=True, text=True, timeout=timeout)
    assert r.returncode == 0, f"{name} failed:\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
    return r.stdout


def test_bench_attention_reports_times_and_ratios(tmp_path):
    out = tmp_path / "attn.json"
    _tool("bench_attention.py", "--lengths", 256, "--segment", 64, "--heads", 2, "--head-dim", 16, "--repeats", 1,
          "--updates", "linear", "--impls", "fast,naive", "--malloc", "default", "--json", out)
    rows = json.loads(out.read_text())["results"]
    assert {r["impl"] for r in rows} == {"fast", "naive"}, rows
    for r in rows:
        assert r["s"] == 256 and r["time_s"] > 0 and r["flops"] > 0, r
        assert r["flops_per_s"] == pytest.approx(r["flops"] / r["time_s"]), r


def test_bench_train_reports_tokens_per_second(tmp_path):
    out = tmp_path / "train.json"
    text = _tool("bench_train.py", "--lengths", 256, "--steps", 3, "--json", out)
    res = json.loads(out.read_text())
    assert set(res) == {"infini-256", "causal-256"}, res
    assert all(r["tokens_per_s"] > 0 for r in res.values()), res
    printed = float(re.search(r"^\| 256 \| \d+ \| \d+ \| ([\d.]+)x", text, re.M).group(1))
    assert printed == pytest.approx(res["infini-256"]["tokens_per_s"] / res["causal-256"]["tokens_per_s"], abs=0.006)


def test_bench_context_parallel_counts_relay_bytes():
    heads, dk = 2, 16
    text = _tool("bench_context_parallel.py", "--lengths", 512, "--full-max", 512, "--heads", heads, "--kv-heads", heads,
                 "--head-dim", dk, "--segment", 64, "--time-lengths", 256, "--t-heads", 2, "--t-head-dim", 16,
                 "--t-segment", 64, "--repeats", 1)
    rows = re.findall(r"^(linear|delta)\s+512\s+([\d,]+)\s+([\d,]+)\s+([\d,]+)", text, re.M)
    assert {r[0] for r in rows} == {"linear", "delta"}, text
    linear = next(int(r[1].replace(",", "")) for r in rows if r[0] == "linear")
    # the linear relay all-gathers one float32 [M | z] per kv head, forward and backward
    assert linear % (heads * dk * (dk + 1) * 4) == 0 and linear > 0, (linear, text)


def test_bench_checkpoint_writes_and_reads_the_model(tmp_path):
    text = _tool("bench_checkpoint.py", "--hidden", 64, "--layers", 1, "--vocab", 512, "--dir", tmp_path / "ck")
    res = json.loads([line for line in text.splitlines() if line.startswith("{")][-1])
    assert res["params"] > 0 and res["save_s"] > 0 and res["load_s"] > 0, res
    assert res["checkpoint_gb"] >= 3 * res["params"] * 4 / 1e9 * 0.99, res  # fp32 weights + exp_avg + exp_avg_sq


def test_bench_loss_memory_reports_ratios(tmp_path):
    out = tmp_path / "loss.json"
    text = _tool("bench_loss_memory.py", "--before", 256, "--after", 256, "--vocab", 4096, "--hidden", 16,
                 "--chunk", 64, "--json", out)
    rows = {r["impl"]: r for r in json.loads(out.read_text())["results"]}
    assert rows.keys() == {"before", "after"} and rows["before"]["extra_mib"] > 0, rows
    assert abs(rows["before"]["loss"] - rows["after"]["loss"]) < 1e-2  # the same loss, both ways
    ratio = rows["after"]["extra_mib"] / rows["before"]["extra_mib"]
    assert re.search(rf"^\s+256\s+\S+\s+\S+\s+{ratio:.3f}\s", text, re.M), text


def test_bench_packed_reports_both_times_and_their_ratio():
    text = _tool("bench_packed.py", "--length", 512, "--mean-doc", 64, "--segment-length", 32, "--heads", 2,
                 "--kv-heads", 1, "--head-dim", 16, "--rounds", 1, "--clock", "cpu")
    m = re.search(r"unpacked ([\d.]+) ms, packed \(cu_seqlens\) ([\d.]+) ms, ratio ([\d.]+)x", text)
    assert m, text
    assert float(m.group(3)) == pytest.approx(float(m.group(2)) / float(m.group(1)), rel=0.02, abs=0.01), text
