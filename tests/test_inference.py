"""Streaming inference: the streamed model equals one full forward; peak memory does not grow
with the input; the `generate` command end to end on a checkpoint written by the trainer."""

import json
import os

import torch

from _dist import run_distributed
from train_utils import run_cli

VOCAB = 256


def _tiny_model(segment_length=8, std=0.3, seed=0, update="linear"):
    """A random Llama-style Infini model whose greedy outputs depend on the context."""
    from megatron_infini.training.config import load_config
    from megatron_infini.training.model import build_model

    cfg = load_config(None, ["model.num_layers=2", "model.hidden_size=32", "model.num_attention_heads=4",
                             "model.num_query_groups=2", f"model.segment_length={segment_length}",
                             f"model.init_method_std={std}", f"model.memory_update={update}",
                             "model.gate_init=1.0", "train.seq_length=64"])
    torch.manual_seed(seed)
    return build_model(cfg, VOCAB).eval()


def _check_streaming_matches_full_forward(rank, world_size):
    from megatron_infini.inference.stream import StreamingLM, reference_greedy

    results = []
    for update in ("linear", "delta"):
        model = _tiny_model(update=update)
        g = torch.Generator().manual_seed(1)
        for plen, chunk_segments in ((5, 1), (8, 1), (21, 2), (40, 3)):
            prompt = torch.randint(0, VOCAB, (2, plen), generator=g)
            ref = reference_greedy(model, prompt, 19, VOCAB)  # crosses 2-3 segment boundaries
            lm = StreamingLM(model, chunk_segments=chunk_segments, vocab_limit=VOCAB)
            lm.feed(prompt)
            out = lm.generate(19)
            lm.close()
            assert torch.equal(out, ref), (update, plen, chunk_segments, out, ref)
            results.append(len(set(out[0].tolist())))
        # logits after streaming pieces cut anywhere == last logits of one forward call
        x = torch.randint(0, VOCAB, (1, 61), generator=g)
        lm = StreamingLM(model, chunk_segments=2, vocab_limit=VOCAB)
        streamed = lm.feed(iter([x[:, :3], x[:, 3:30], x[:, 30:31], x[:, 31:]]))
        assert lm.committed_segments == 7 and lm.pending.shape[1] == 5
        lm.close()
        with torch.no_grad():
            full = model(x, torch.arange(61)[None], None)[:, -1, :VOCAB].float()
        torch.testing.assert_close(streamed[:, :VOCAB], full, atol=1e-4, rtol=1e-4)
        # the ablation: with memory off, the last logits depend on the last segment only
        off = StreamingLM(model, chunk_segments=2, vocab_limit=VOCAB, memory=False)
        got = off.feed(x)
        off.close()
        with torch.no_grad():
            alone = model(x[:, 56:], torch.arange(5)[None], None)[:, -1, :VOCAB].float()
            with_mem = model(x, torch.arange(61)[None], None)[:, -1, :VOCAB].float()
        torch.testing.assert_close(got[:, :VOCAB], alone, atol=1e-4, rtol=1e-4)
        assert (with_mem - alone).abs().max() > 1e-3  # the memory does change the output
    return results


def test_streaming_generation_equals_full_forward_greedy():
    (distinct,) = run_distributed(_check_streaming_matches_full_forward, 1)
    assert max(distinct) > 3, "degenerate model: greedy outputs do not depend on the context"


def test_top_p_sampling_keeps_the_nucleus():
    from megatron_infini.inference.stream import sample_next

    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    g = torch.Generator().manual_seed(0)
    draws = {int(sample_next(logits, 1.0, 0.7, g)) for _ in range(200)}
    assert draws == {0, 1}
    assert int(sample_next(logits, 0.0)) == 0


def _generate(*args):
    return run_cli("generate", *args)


def test_generate_cli_accepts_run_checkpoints_and_iter_dirs(debug_run, tmp_path):
    prompt = tmp_path / "prompt.txt"
    prompt.write_text("Enter PROSPERO and MIRANDA. " * 20)
    for ckpt in (debug_run, os.path.join(debug_run, "checkpoints"),
                 os.path.join(debug_run, "checkpoints", "iter_0000020")):
        out = tmp_path / "gen.json"
        _generate("--checkpoint", ckpt, "--prompt-file", str(prompt), "--max-new-tokens", "5", "--json", str(out))
        res = json.loads(out.read_text())
        assert res["new_tokens"] <= 5 and res["prompt_tokens"] > 64 and res["memory_state_floats"] == 2 * 2 * 16 * 17
    _generate("--checkpoint", debug_run, "--prompt", "To be", "--max-new-tokens", "3", "--temperature", "0.8",
              "--top-p", "0.9", "--no-memory")


def test_peak_memory_does_not_grow_with_input_length(debug_run, tmp_path):
    """16K vs 128K random tokens through the debug model: peak RSS within 5%."""
    peaks = {}
    for n in (16384, 131072):
        out = tmp_path / f"gen{n}.json"
        _generate("--checkpoint", debug_run, "--random-prompt-tokens", str(n), "--max-new-tokens", "2",
                  "--threads", "1", "--json", str(out))
        peaks[n] = json.loads(out.read_text())["peak_rss_mib"]
    assert peaks[131072] <= peaks[16384] * 1.05, peaks


def test_reset_at_eos_reads_each_document_from_an_empty_memory():
    """Documents joined by EOS, streamed with reset_at_eos, give each document's logits as if it
    were streamed alone (and the logits right after an EOS are the previous document's)."""
    assert run_distributed(_check_reset_at_eos, 1) == [True]


def _check_reset_at_eos(rank, world_size):
    from megatron_infini.inference.stream import StreamingLM

    model = _tiny_model()
    g = torch.Generator().manual_seed(3)
    eos = 2
    docs = [torch.randint(3, VOCAB, (1, n), generator=g) for n in (19, 5, 30)]
    joined = torch.cat([torch.cat([d, torch.tensor([[eos]])], dim=1) for d in docs[:2]] + [docs[2]], dim=1)

    def alone(tokens):
        lm = StreamingLM(model, chunk_segments=2, vocab_limit=VOCAB)
        out = lm.feed(tokens)
        lm.close()
        return out

    want = [alone(docs[2]), alone(torch.cat([docs[2], torch.tensor([[eos]])], dim=1))]  # (close: carry off)
    lm = StreamingLM(model, chunk_segments=2, vocab_limit=VOCAB, reset_at_eos=eos)
    got = lm.feed(iter([joined[:, :7], joined[:, 7:26], joined[:, 26:]]))  # cut inside and at an EOS
    torch.testing.assert_close(got, want[0], atol=1e-5, rtol=1e-5)
    after_eos = lm.feed(torch.tensor([[eos]]))  # ends the third document
    torch.testing.assert_close(after_eos, want[1], atol=1e-5, rtol=1e-5)
    lm.close()
    plain = StreamingLM(model, chunk_segments=2, vocab_limit=VOCAB)
    assert (plain.feed(joined) - got).abs().max() > 1e-3  # without the reset the context carries over
    plain.close()
    return True
