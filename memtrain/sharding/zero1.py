"""ZeRO stage 1: each rank keeps optimizer state for its dim-0 slice of every (replicated) parameter.

The user's optimizer object is kept (learning-rate schedulers and gradient clipping keep working on
``param_groups``, which still hold the model's parameters). Its state is keyed by *shard parameters*:
DTensors ``Shard(0)`` whose local tensor is a view of this rank's rows of the replicated parameter, so the
update writes straight into the model. After the update, one all-gather per dtype brings every rank's rows
to every rank.
"""
from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Replicate, Shard


@dataclass
class _Slot:
    fqn: str
    param: nn.Parameter  # the model's (replicated) parameter
    shard: nn.Parameter  # what the optimizer steps: this rank's rows, viewing ``param``'s storage
    rows: tuple[int, int]  # [start, end) of this rank's rows; (0, 0) rows for 0-d parameters
    chunk_rows: int  # rows per rank before the tail is cut (torch.chunk / DTensor Shard(0) sizes)


def _local(t: torch.Tensor) -> torch.Tensor:
    return t._local_tensor if isinstance(t, DTensor) else t


def _row_range(n_rows: int, world: int, rank: int) -> tuple[int, int, int]:
    chunk = -(-n_rows // world)
    start = min(rank * chunk, n_rows)
    return start, min(start + chunk, n_rows), chunk


class ShardedOptimizerState:
    """Installs itself on ``optimizer`` (its ``step`` is wrapped); use ``state_dict`` / ``load_state_dict``."""

    def __init__(self, optimizer: torch.optim.Optimizer, model: nn.Module, mesh: DeviceMesh) -> None:
        if mesh.ndim != 1:
            raise ValueError("ZeRO-1 shards optimizer state over a 1D data-parallel mesh")
        if optimizer.state:
            raise RuntimeError("shard the optimizer state before the first step (the optimizer already has state)")
        self.optimizer = optimizer
        self.mesh = mesh
        self.group = mesh.get_group()
        self.world, self.rank = mesh.size(), mesh.get_local_rank()
        names = {id(p): n for n, p in model.named_parameters()}
        self.slots: list[list[_Slot]] = []
        for group in optimizer.param_groups:
            slots = []
            for p in group["params"]:
                if id(p) not in names:
                    raise ValueError("the optimizer holds a parameter that is not in the model; build it from "
                                     "model.parameters() after memtrain has prepared the model")
                slots.append(self._make_slot(names[id(p)], p))
            self.slots.append(slots)
        self._inner_step: Callable[..., Any] = optimizer.step
        optimizer.step = self.step  # type: ignore[method-assign]
        optimizer._memtrain_zero1 = self  # type: ignore[attr-defined]

    def _make_slot(self, fqn: str, p: nn.Parameter) -> _Slot:
        full = _local(p.data)
        if full.dim() == 0:  # nothing to split: every rank steps its own copy, identically
            shard = DTensor.from_local(full, self.mesh, [Replicate()], run_check=False)
            return _Slot(fqn, p, nn.Parameter(shard), (0, 0), 0)
        start, end, chunk = _row_range(full.shape[0], self.world, self.rank)
        shard = DTensor.from_local(
            full[start:end], self.mesh, [Shard(0)], run_check=False, shape=full.shape, stride=full.stride()
        )
        return _Slot(fqn, p, nn.Parameter(shard), (start, end), chunk)

    # -- stepping ---------------------------------------------------------------------------------------
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()  # forward, backward (gradients all-reduced), clipping on the full gradients
        self._run_on_shards(self._inner_step)
        self._all_gather()
        return loss

    def _run_on_shards(self, fn: Callable[[], Any]) -> None:
        originals = [group["params"] for group in self.optimizer.param_groups]
        try:
            for group, slots in zip(self.optimizer.param_groups, self.slots):
                group["params"] = [s.shard for s in slots]
                for s in slots:
                    s.shard.grad = self._grad_view(s)
            fn()
        finally:
            for group, params, slots in zip(self.optimizer.param_groups, originals, self.slots):
                group["params"] = params
                for s in slots:
                    s.shard.grad = None  # drop the alias so that zero_grad on the model frees the gradient

    def _grad_view(self, s: _Slot) -> torch.Tensor | None:
        if s.param.grad is None:
            return None
        g = _local(s.param.grad)
        if g.dim() == 0:
            return DTensor.from_local(g, self.mesh, [Replicate()], run_check=False)
        start, end = s.rows
        return DTensor.from_local(g[start:end], self.mesh, [Shard(0)], run_check=False,
                                  shape=g.shape, stride=g.stride())

    @torch.no_grad()
    def _all_gather(self) -> None:
        by_dtype: dict[torch.dtype, list[_Slot]] = defaultdict(list)
        for slots in self.slots:
            for s in slots:
                if s.chunk_rows:
                    by_dtype[s.param.dtype].append(s)
        for dtype, slots in by_dtype.items():
            sizes = [s.chunk_rows * _local(s.param.data)[0].numel() for s in slots]
            send = torch.zeros(sum(sizes), dtype=dtype, device=_local(slots[0].param.data).device)
            offset = 0
            for s, size in zip(slots, sizes):
                rows = _local(s.param.data)[s.rows[0] : s.rows[1]].reshape(-1)
                send[offset : offset + rows.numel()].copy_(rows)
                offset += size
            recv = torch.empty(self.world * send.numel(), dtype=dtype, device=send.device)
            dist.all_gather_into_tensor(recv, send, group=self.group)
            recv = recv.view(self.world, -1)
            offset = 0
            for s, size in zip(slots, sizes):
                full = _local(s.param.data)
                gathered = recv[:, offset : offset + size].reshape(self.world * s.chunk_rows, *full.shape[1:])
                full.copy_(gathered[: full.shape[0]])
                offset += size

    # -- state dict (keyed by parameter name, torch.distributed.checkpoint-ready) ------------------------
    def state_dict(self) -> dict[str, Any]:
        state: dict[str, Any] = {}
        groups = []
        for group, slots in zip(self.optimizer.param_groups, self.slots):
            for s in slots:
                if s.shard in self.optimizer.state:
                    state[s.fqn] = dict(self.optimizer.state[s.shard])
            groups.append({**{k: v for k, v in group.items() if k != "params"}, "params": [s.fqn for s in slots]})
        return {"state": state, "param_groups": groups}

    def init_state(self) -> None:
        """Create the optimizer state (a zero-gradient step at lr 0) so that a checkpoint can load into it."""
        from memtrain.checkpoint.state import allocate_adam_state

        if self.optimizer.state:
            return
        allocated: list[bool] = []  # Adam(W): allocated directly, keyed by the shards (the groups hold them here)
        self._run_on_shards(lambda: allocated.append(allocate_adam_state(self.optimizer, trainable_only=False)))
        if allocated[0]:
            return
        lrs = [group["lr"] for group in self.optimizer.param_groups]
        grads = [[s.param.grad for s in slots] for slots in self.slots]
        try:
            for group, slots in zip(self.optimizer.param_groups, self.slots):
                group["lr"] = 0.0
                for s in slots:
                    s.param.grad = torch.zeros_like(s.param)
            self._run_on_shards(self._inner_step)
        finally:
            for group, lr, slots, gs in zip(self.optimizer.param_groups, lrs, self.slots, grads):
                group["lr"] = lr
                for s, g in zip(slots, gs):
                    s.param.grad = g

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.init_state()
        for group, saved, slots in zip(self.optimizer.param_groups, state_dict["param_groups"], self.slots):
            group.update({k: v for k, v in saved.items() if k != "params"})
            for s in slots:
                for key, value in state_dict["state"].get(s.fqn, {}).items():
                    current = self.optimizer.state[s.shard].get(key)
                    if isinstance(current, torch.Tensor) and isinstance(value, torch.Tensor):
                        _local(current).copy_(_local(value))
                    else:
                        self.optimizer.state[s.shard][key] = value


def shard_optimizer_state(optimizer: torch.optim.Optimizer, model: nn.Module, mesh: DeviceMesh) -> ShardedOptimizerState:
    return ShardedOptimizerState(optimizer, model, mesh)


def zero1_state(optimizer: torch.optim.Optimizer) -> ShardedOptimizerState | None:
    return getattr(optimizer, "_memtrain_zero1", None)
