"""nn.Modules of megatron-infini: the Infini self-attention and TP/SP-aware norms."""

from .attention import InfiniCoreAttention, InfiniSelfAttention, in_segment_rope
from .norms import Norm, allreduce_sequence_parallel_grads

__all__ = ["InfiniCoreAttention", "InfiniSelfAttention", "Norm", "allreduce_sequence_parallel_grads", "in_segment_rope"]
