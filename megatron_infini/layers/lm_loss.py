"""A Megatron `GPTModel` whose LM head and loss run in chunks of tokens when labels are given.

    model = GPTModel(...)
    enable_chunked_lm_loss(model, chunk=4096)
    loss = model(ids, position_ids, None, labels=labels)  # [b, s] float32, as before
    logits = model(ids, position_ids, None)               # unchanged: Megatron's output layer

`GPTModel.forward` calls `output_layer(hidden)` and then `compute_language_model_loss(labels,
logits)`. With labels, the output layer here returns the per-token loss of
`ops.linear_cross_entropy` ([s, b] float32, no [s, b, V] logits) and the loss method hands it on;
without labels (generation, evaluation of logits) both are Megatron's. The output layer's
parameters, its tied embedding and the checkpoints are unchanged.

Shape legend: s sequence, b batch, h hidden, v vocabulary rows on this rank.
"""

from __future__ import annotations

import torch
from megatron.core.tensor_parallel.mappings import (
    copy_to_tensor_model_parallel_region,
    gather_from_sequence_parallel_region,
)

from megatron_infini.ops.cross_entropy import DEFAULT_CHUNK, linear_cross_entropy


def enable_chunked_lm_loss(model: torch.nn.Module, chunk: int = DEFAULT_CHUNK) -> None:
    """Make `model(..., labels=labels)` compute the LM head and loss in chunks of `chunk`
    tokens (peak extra memory O(chunk x V / tp) instead of O(s x b x V / tp)). Same per-token
    loss [b, s] and gradients as Megatron's path (tests/test_lm_loss.py). Raises ValueError
    for a model with multi-token prediction (its extra heads call the output layer again)."""
    if isinstance(chunk, bool) or not isinstance(chunk, int) or chunk < 1:
        raise ValueError(f"chunk must be an integer >= 1, got {chunk!r}")
    if getattr(model.config, "mtp_num_layers", None):
        raise ValueError("the chunked LM loss does not support multi-token prediction (mtp_num_layers)")
    head = model.output_layer
    if getattr(head, "_chunked_loss", None) is not None:  # enabled before: only the chunk changes
        head._chunked_loss["chunk"] = chunk
        return
    state = head._chunked_loss = {"chunk": chunk, "labels": None, "loss": None}
    head_forward, model_loss = head.forward, model.compute_language_model_loss

    def take_labels(module, args, kwargs):  # GPTModel.forward(input_ids, position_ids, mask, decoder_input, labels)
        state["labels"] = kwargs.get("labels", args[4] if len(args) > 4 else None)

    def drop_labels(module, args, kwargs, output):
        state["labels"] = state["loss"] = None

    def forward(hidden, weight=None, runtime_gather_output=None):
        labels = state["labels"]
        if labels is None or not isinstance(hidden, torch.Tensor) or hidden.dim() != 3:
            return head_forward(hidden, weight=weight, runtime_gather_output=runtime_gather_output)
        state["labels"] = None
        group = head.tp_group
        if head.sequence_parallel:  # [s / tp, b, h] -> [s, b, h]; backward: reduce-scatter
            hidden = gather_from_sequence_parallel_region(hidden, tensor_parallel_output_grad=True, group=group)
        else:  # identity; backward: all-reduce of hidden's gradient over the vocabulary shards
            hidden = copy_to_tensor_model_parallel_region(hidden, group=group)
        s, b, h = hidden.shape
        flat_labels = labels.transpose(0, 1).reshape(s * b)  # [b, s] -> [s * b]
        loss = linear_cross_entropy(hidden.reshape(s * b, h), head.weight if weight is None else weight,
                                    flat_labels, chunk=state["chunk"], tp_group=group)
        state["loss"] = loss.view(s, b)  # [s, b]
        return state["loss"], None

    def compute_language_model_loss(labels, logits):
        if logits is not None and logits is state["loss"]:
            state["loss"] = None
            return logits.transpose(0, 1).contiguous()  # [s, b] -> [b, s]
        return model_loss(labels, logits)

    head.forward = forward
    model.compute_language_model_loss = compute_language_model_loss
    model.register_forward_pre_hook(take_labels, with_kwargs=True)
    model.register_forward_hook(drop_labels, with_kwargs=True, always_call=True)
