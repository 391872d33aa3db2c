"""Evaluation of Infini-attention checkpoints, all streamed segment by segment with the memory
carried, each with a memory-off ablation (every segment starts from an empty memory):

- `passkey`: passkey retrieval accuracy per length x needle depth (+ fine-tuning data);
- `needle`: needle in a haystack (natural text, distractor keys), same shape as `passkey`;
  `needle_data`: its prompts and training documents (`needle-data`);
- `recipe`: the prompt format a checkpoint was trained on (passkey_recipe.json, needle_recipe.json);
- `retrieval_stats`: the needle's share of the memory's retrieval weights (why retrieval fails);
- `perplexity`: long-document perplexity per segment position;
- `recall`: the synthetic recall task (a key >= 4 segments before the question) used to show,
  on CPU, that the memory carries information local attention cannot see.
`cli` dispatches `megatron-infini eval <passkey|passkey-data|needle|needle-data|perplexity>`; the recall task runs
from `tools/recall_task.py`.
"""
