"""The engine: applies memtrain's techniques to one model + optimizer, in one fixed order.

Both front doors use it: the Lightning strategy (``memtrain.strategies``) and the plain torchrun loop
(``scripts/train.py``). The order in which techniques are applied to the model is fixed here:

    1. apply_sharding        ZeRO stage 0-3 / hybrid on FSDP2 (``memtrain.sharding``)

and to the optimizer:

    1. shard_optimizer_state  ZeRO-1 only (stages 2-3 shard optimizer state through their parameters)

Later capabilities (activation policies before sharding; offload after it) slot into these lists.
"""
from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import FSDPModule
from torch.distributed.tensor import DTensor

from memtrain.checkpoint.sharded import load_sharded, save_sharded
from memtrain.checkpoint.state import load_training_state, model_state, template_optimizer_state, training_state
from memtrain.config import MemTrainConfig
from memtrain.sharding import apply_sharding, build_mesh, data_parallel_mesh, plan_mesh, shard_optimizer_state
from memtrain.sharding.mesh import MeshPlan
from memtrain.telemetry import MemoryReport, account_training_state


@dataclass
class Engine:
    config: MemTrainConfig
    mesh: DeviceMesh

    @classmethod
    def create(cls, config: MemTrainConfig, world_size: int, local_world_size: int, device_type: str) -> "Engine":
        """Validate the mesh against the world (ConfigError if it cannot work), then build it.

        Needs an initialized default process group; call ``plan`` first to fail before starting one.
        """
        return cls(config, build_mesh(cls.plan(config, world_size, local_world_size), device_type))

    @staticmethod
    def plan(config: MemTrainConfig, world_size: int, local_world_size: int) -> MeshPlan:
        return plan_mesh(config.sharding, world_size, local_world_size)

    @property
    def data_parallel_mesh(self) -> DeviceMesh:
        return data_parallel_mesh(self.config.sharding, self.mesh)

    # -- preparing ----------------------------------------------------------------------------------------
    def prepare_model(self, model: nn.Module) -> nn.Module:
        apply_sharding(model, self.config.sharding, self.mesh)
        return model

    def prepare_optimizer(self, optimizer: torch.optim.Optimizer, model: nn.Module) -> torch.optim.Optimizer:
        """Call with an optimizer built over the *prepared* model's parameters."""
        if any(not isinstance(p, DTensor) for g in optimizer.param_groups for p in g["params"]):
            raise RuntimeError("build the optimizer after engine.prepare_model(model), from its parameters")
        if self.config.sharding.stage == 1:
            shard_optimizer_state(optimizer, model, self.data_parallel_mesh)
        return optimizer

    # -- stepping -----------------------------------------------------------------------------------------
    @contextmanager
    def no_gradient_sync(self, model: nn.Module) -> Iterator[None]:
        """Accumulate gradients locally (no all-reduce / reduce-scatter) for the backward passes inside."""
        if not isinstance(model, FSDPModule):
            yield
            return
        model.set_requires_gradient_sync(False)
        try:
            yield
        finally:
            model.set_requires_gradient_sync(True)

    @staticmethod
    def clip_grad_norm_(model: nn.Module, max_norm: float) -> torch.Tensor:
        """Clip by the global norm over all shards; returns that norm as a plain tensor."""
        params = [p for p in model.parameters() if p.grad is not None]
        norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
        return norm.full_tensor() if isinstance(norm, DTensor) else norm

    @staticmethod
    def memory(model: nn.Module, optimizer: torch.optim.Optimizer | None = None) -> MemoryReport:
        return account_training_state(model, optimizer)

    # -- checkpoints ----------------------------------------------------------------------------------------
    @staticmethod
    def save_checkpoint(
        path: str | Path,
        model: nn.Module,
        optimizer: torch.optim.Optimizer | None,
        meta: dict[str, Any] | None = None,
        rank_state: dict[str, Any] | None = None,
    ) -> None:
        save_sharded(path, training_state(model, optimizer), meta, rank_state)

    @staticmethod
    def load_checkpoint(
        path: str | Path, model: nn.Module, optimizer: torch.optim.Optimizer | None
    ) -> tuple[dict[str, Any], dict[str, Any] | None]:
        """Load in place (any stage, any world size). Returns (meta, this rank's state or None)."""
        state: dict[str, Any] = {"model": model_state(model)}
        if optimizer is not None:
            state["optimizer"] = template_optimizer_state(model, optimizer)
        meta, rank_state = load_sharded(path, state)
        load_training_state(model, optimizer, state)
        return meta, rank_state
