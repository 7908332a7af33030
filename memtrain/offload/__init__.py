"""Offload (ZeRO-Offload / ZeRO-Infinity, Fuyou): optimizer state and stage 3 parameters on host memory and NVMe.

``apply_param_offload`` (after sharding) and ``apply_optimizer_offload`` (after ZeRO-1) are applied by the
engine; the state moves through ``memtrain.swap``.
"""
from memtrain.offload.apply import (
    OffloadResources,
    apply_optimizer_offload,
    apply_param_offload,
    param_offload_of,
)
from memtrain.offload.optimizer import OffloadedAdam, offload_state

__all__ = [
    "OffloadResources",
    "OffloadedAdam",
    "apply_optimizer_offload",
    "apply_param_offload",
    "offload_state",
    "param_offload_of",
]
