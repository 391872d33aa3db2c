"""Streaming inference with Infini-attention: load a checkpoint, read any length, generate.

- `loader`: `inference_session`, `load_model_for_inference(checkpoint, tp, overrides)`.
- `stream`: `StreamingLM` (feed segment by segment with the memory carried, generate greedy or
  top-p), `StreamingLM(memory=False)` (the ablation: every segment from an empty memory), `reference_greedy` (the full-forward oracle).
- `generate`: the `megatron-infini generate` command.
Nothing heavy is imported here.
"""
