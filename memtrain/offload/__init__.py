"""Offload (ZeRO-Offload / ZeRO-Infinity, Fuyou): optimizer state and stage 3 parameters on host memory and NVMe.

``apply_param_offload`` (after sharding) and ``apply_optimizer_offload`` (after ZeRO-1) are applied by the
engine; the state moves through ``memtrain.swap``.
"""
from __future__ import annotations

from pathlib import Path

import torch

from memtrain.offload.apply import (
    OffloadResources,
    apply_optimizer_offload,
    apply_param_offload,
    param_offload_of,
)
from memtrain.offload.optimizer import OffloadedAdam, offload_state


def mapped_files(model: torch.nn.Module, optimizer: torch.optim.Optimizer | None) -> list[tuple[torch.Tensor, Path]]:
    """(shared mapping, file) of every NVMe swap file behind the model's parameters and the optimizer's state:
    checkpoints read and write these tensors through the files themselves."""
    found: list[tuple[torch.Tensor, Path]] = []
    params = param_offload_of(model)
    if params is not None:
        found += params.mapped_files()
    state = offload_state(optimizer) if optimizer is not None else None
    if state is not None:
        found += state.store.mapped_files()
    return found

__all__ = [
    "OffloadResources",
    "OffloadedAdam",
    "apply_optimizer_offload",
    "apply_param_offload",
    "mapped_files",
    "offload_state",
    "param_offload_of",
]
