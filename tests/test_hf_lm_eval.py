"""lm-evaluation-harness on an export: the shipped `infini_passkey` task (megatron_infini/hf/
lm_eval_passkey.py) scores the prompts of `megatron-infini eval passkey` with the same answers,
prompt by prompt, at batch size 1 and 4 (left-padded batches). Skipped where lm_eval is not
installed (`pip install -e .[eval]`)."""

import glob
import json
import os
import subprocess
import sys

import pytest

from test_hf_export import to_hf
from train_utils import run_cli

pytest.importorskip("lm_eval")
pytest.importorskip("accelerate")  # lm_eval --model hf needs it (lm-eval[hf], in the eval extra)

ARGS = dict(lengths="200,300", depths="0,0.5", samples=5, key_digits=5)  # 20 prompts


def lm_eval(export, task_dir, out, batch_size):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore", HF_DATASETS_OFFLINE="1",
               HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    p = subprocess.run([sys.executable, "-m", "lm_eval", "--model", "hf", "--model_args",
                        f"pretrained={export},trust_remote_code=True,add_bos_token=True,dtype=float32",
                        "--device", "cpu", "--include_path", task_dir, "--tasks", "infini_passkey",
                        "--batch_size", str(batch_size), "--log_samples", "--output_path", str(out)],
                       env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=900)
    assert p.returncode == 0, p.stdout[-4000:]
    (samples,) = glob.glob(os.path.join(out, "**", "samples_infini_passkey_*.jsonl"), recursive=True)
    rows = [json.loads(line) for line in open(samples)]
    (results,) = glob.glob(os.path.join(out, "**", "results_*.json"), recursive=True)
    acc = json.load(open(results))["results"]["infini_passkey"]["exact_match,first_integer"]
    answers = {(r["doc"]["length"], r["doc"]["depth"], r["doc"]["key"]): r["filtered_resps"][0] for r in rows}
    return acc, {k: str(int(a)) if a.isdigit() else a for k, a in answers.items()}  # eval passkey's int()


def test_lm_eval_passkey_equals_eval_passkey(debug_run, tmp_path):
    from megatron_infini.data.tokenizer import Tokenizer
    from megatron_infini.hf.lm_eval_passkey import write_task

    export = to_hf(debug_run, tmp_path / "export")
    write_task(Tokenizer(export), str(tmp_path / "task"), [200, 300], [0.0, 0.5], ARGS["samples"],
               key_digits=ARGS["key_digits"])
    ours = tmp_path / "passkey.json"
    run_cli("eval", "passkey", "--checkpoint", debug_run, "--lengths", ARGS["lengths"], "--depths", ARGS["depths"],
            "--samples", str(ARGS["samples"]), "--key-digits", str(ARGS["key_digits"]), "--dtype", "fp32",
            "--json", str(ours))
    cells = json.load(open(ours))["results"]["on"]["cells"]
    want = {(c["length"], c["depth"], str(k)): ("[none]" if a is None else str(a))
            for c in cells for k, a in zip(c["keys"], c["answers"])}
    accuracy = sum(a == k[2] for k, a in want.items()) / len(want)
    assert len(want) == 20
    for batch_size in (1, 4):
        acc, got = lm_eval(export, str(tmp_path / "task"), tmp_path / f"out{batch_size}", batch_size)
        assert got == want, batch_size
        assert acc == pytest.approx(accuracy)
