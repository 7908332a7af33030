"""Model and optimizer state as name-keyed, DTensor-sharded dicts, for every ZeRO stage.

Every stage lays its parameters out as DTensors (plain tensors where a stage 0-1 model has a one-rank
data-parallel mesh), so a checkpoint written at one stage and world size loads at another:
torch.distributed.checkpoint matches the global tensors and reads just the local pieces.
"""
from __future__ import annotations

import functools
from typing import Any

import torch
import torch.nn as nn
from torch.distributed.checkpoint.state_dict import (
    get_model_state_dict,
    StateDictOptions,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.tensor import DTensor
from torch.optim.optimizer import _get_scalar_dtype

from memtrain.offload import offload_state, param_offload_of
from memtrain.sharding.zero1 import zero1_state


def model_state(model: nn.Module) -> dict[str, Any]:
    state = get_model_state_dict(model)
    offload = param_offload_of(model)
    if offload is not None:  # shards on NVMe: save from (and load into) the swap file itself
        state.update(offload.state_views(model))
    return state


def load_model_state(model: nn.Module, state: dict[str, Any]) -> None:
    """Copy a loaded model state into the model; shards on NVMe were loaded straight into the swap file."""
    offload = param_offload_of(model)
    if offload is not None:
        state = {k: v for k, v in state.items() if k not in offload.state_names(model)}
        set_model_state_dict(model, state, options=StateDictOptions(strict=False))
        return
    set_model_state_dict(model, state)


def training_state(model: nn.Module, optimizer: torch.optim.Optimizer | None) -> dict[str, Any]:
    state: dict[str, Any] = {"model": model_state(model)}
    if optimizer is not None:
        state["optimizer"] = optimizer_state(model, optimizer)
    return state


def optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    offloaded = offload_state(optimizer)
    if offloaded is not None:
        return offloaded.state_dict()
    zero1 = zero1_state(optimizer)
    return zero1.state_dict() if zero1 is not None else get_optimizer_state_dict(model, optimizer)


def allocate_adam_state(optimizer: torch.optim.Optimizer, trainable_only: bool = True, zeroed: bool = True) -> bool:
    """Adam / AdamW: zeroed state for every trainable parameter, laid out as torch's first step makes it, without
    running that step (torch's way, a zero-gradient step at lr 0, takes seconds on a large model and was most of
    a restore from memory). ``trainable_only``: skip parameters that do not require grad, as torch's step does
    (ZeRO-1's shards do not require grad but are all stepped). ``zeroed=False``: uninitialized moments, for a
    template that a checkpoint or snapshot overwrites whole (saves a memset pass over the state on restore).
    False for other optimizers, or when the state exists already."""
    if type(optimizer) not in (torch.optim.Adam, torch.optim.AdamW) or optimizer.state:
        return False
    like = functools.partial(torch.zeros_like if zeroed else torch.empty_like, memory_format=torch.preserve_format)
    for group in optimizer.param_groups:
        on_device = bool(group.get("fused") or group.get("capturable"))
        scalar = _get_scalar_dtype(is_fused=bool(group.get("fused")))
        for p in group["params"]:
            if trainable_only and not p.requires_grad:
                continue
            state = {
                "step": torch.zeros((), dtype=scalar, device=p.device) if on_device else torch.tensor(0.0, dtype=scalar),
                "exp_avg": like(p),
                "exp_avg_sq": like(p),
            }
            if group.get("amsgrad"):
                state["max_exp_avg_sq"] = like(p)
            optimizer.state[p] = state
    return True


def template_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """The optimizer state with every tensor allocated, for a checkpoint to be read into."""
    if offload_state(optimizer) is not None:
        return optimizer_state(model, optimizer)  # views of the store itself: loads land in place
    zero1 = zero1_state(optimizer)
    if zero1 is not None:
        zero1.init_state()
    else:  # every value is overwritten by the load (DCP refuses a checkpoint that lacks one): no need to zero
        allocate_adam_state(optimizer, zeroed=False)
    return optimizer_state(model, optimizer)  # other optimizers: torch's get_optimizer_state_dict initializes them


def state_is_held(optimizer: torch.optim.Optimizer) -> bool:
    """Whether the optimizer's state dict holds the very tensors it updates, so that a restore may fill them after
    the load (the late part of a restore from memory). Offloaded and ZeRO-1 states are copied by their loads."""
    return offload_state(optimizer) is None and zero1_state(optimizer) is None


def holds_all(optimizers: list[torch.optim.Optimizer], tensors: list[torch.Tensor]) -> bool:
    """Whether every tensor in ``tensors`` (local tensors) is, by storage, part of the optimizers' live state."""
    live = {(v.to_local() if isinstance(v, DTensor) else v).data_ptr() for optimizer in optimizers
            for state in optimizer.state.values() for v in state.values() if isinstance(v, torch.Tensor)}
    return all(t.data_ptr() in live for t in tensors)


def load_training_state(model: nn.Module, optimizer: torch.optim.Optimizer | None, state: dict[str, Any]) -> None:
    load_model_state(model, state["model"])
    if optimizer is not None:
        load_optimizer_state(model, optimizer, state["optimizer"])


def load_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer, state: dict[str, Any]) -> None:
    offloaded = offload_state(optimizer)
    if offloaded is not None:
        offloaded.load_state_dict(state)
        return
    zero1 = zero1_state(optimizer)
    if zero1 is not None:
        zero1.load_state_dict(state)
    else:
        set_optimizer_state_dict(model, optimizer, state)
