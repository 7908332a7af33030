"""Checkpoints: sharded torch.distributed.checkpoint folders, resume, resharding, consolidation."""
from memtrain.checkpoint.sharded import (
    consolidate,
    is_complete_checkpoint,
    load_sharded,
    save_sharded,
)
from memtrain.checkpoint.state import load_training_state, training_state

__all__ = [
    "consolidate", "is_complete_checkpoint", "load_sharded", "load_training_state", "save_sharded",
    "training_state",
]
