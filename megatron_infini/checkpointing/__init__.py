"""Sharded, atomic, verified checkpoints (see manager.py for the layout)."""

from .manager import CheckpointManager, complete_checkpoints, read_tracker, resolve_checkpoint, restore_rng
from .manifest import CheckpointCorrupt, verify

__all__ = [
    "CheckpointCorrupt",
    "CheckpointManager",
    "complete_checkpoints",
    "read_tracker",
    "resolve_checkpoint",
    "restore_rng",
    "verify",
]
