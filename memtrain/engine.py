"""The engine: applies memtrain's techniques to one model + optimizer, in one fixed order.

Both front doors use it: the Lightning strategy (``memtrain.strategies``) and the plain torchrun loop
(``scripts/train.py``). The order in which techniques are applied to the model is fixed here:

    1. apply_activations     per-block keep / recompute / swap / token-wise split of saved activations
                             (``memtrain.activations``), first: it wraps each block's own forward, so FSDP2's
                             hooks (added next) run around it and gather a recomputed block's parameters
    2. apply_sharding        ZeRO stage 0-3 / hybrid on FSDP2 (``memtrain.sharding``)
    3. apply_param_offload   stage 3 parameter shards to NVMe (``memtrain.offload``)

and to the optimizer:

    1. shard_optimizer_state  ZeRO-1 only (stages 2-3 shard optimizer state through their parameters)
    2. apply_optimizer_offload  Adam(W) state to host memory / NVMe, stepped on the CPU tile by tile
    3. apply_local_update     CO2 / local SGD / DiLoCo (``memtrain.local_update``): it wraps the
                              optimizer's step (ZeRO-1's included) and runs the outer step after it
    4. apply_snapshots        asynchronous checkpoints (``memtrain.checkpoint``), last: the outermost wrapper of
                              the step waits for the previous snapshot's copy before anything is updated

With local updates on, step 2 of the model list shards over the mesh's shard dimension only
(``across_replicas=False``): each replica is an independent FSDP2 group (stages 0-1: one rank), so backward
never communicates across replicas, and the outer all-reduce runs over the replica group instead.

Later capabilities slot into these lists.
"""
from __future__ import annotations

import functools
import os
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import FSDPModule
from torch.distributed.tensor import DTensor

from memtrain.activations import ActivationManager, apply_activations
from memtrain.checkpoint.files import SnapshotFiles
from memtrain.checkpoint.manager import CheckpointManager, Restored
from memtrain.checkpoint.sharded import load_sharded, save_sharded
from memtrain.checkpoint.state import (
    holds_all,
    load_training_state,
    model_state,
    state_is_held,
    template_optimizer_state,
    training_state,
)
from memtrain.config import MemTrainConfig
from memtrain.local_update import LocalUpdate, apply_local_update, check_replicas, local_update_of
from memtrain.offload import (
    OffloadResources,
    apply_optimizer_offload,
    apply_param_offload,
    mapped_files,
    offload_state,
)
from memtrain.sharding import apply_sharding, build_mesh, data_parallel_mesh, plan_mesh, shard_optimizer_state
from memtrain.sharding.mesh import MeshPlan
from memtrain.telemetry import MemoryReport, account_training_state


def default_job_name() -> str:
    """Names this run's swap folders: the scheduler's job id where there is one."""
    return os.environ.get("SLURM_JOB_ID") or os.environ.get("TORCHELASTIC_RUN_ID") or "memtrain"


@dataclass
class Engine:
    config: MemTrainConfig
    mesh: DeviceMesh
    job: str = field(default_factory=default_job_name)
    ranks_per_node: int = 1  # the launcher's local world size: ranks r*n .. r*n+n-1 share node r
    offload: OffloadResources = field(init=False)

    local_update: LocalUpdate | None = field(default=None, init=False)  # set by prepare_optimizer when on
    activations: ActivationManager | None = field(default=None, init=False)  # set by prepare_model when on
    checkpoints: CheckpointManager | None = field(default=None, init=False)  # set by prepare_optimizer when on

    def __post_init__(self) -> None:
        self.offload = OffloadResources(self.config.offload, self.job)

    @classmethod
    def create(cls, config: MemTrainConfig, world_size: int, local_world_size: int, device_type: str) -> Engine:
        """Validate the mesh against the world (ConfigError if it cannot work), then build it.

        Needs an initialized default process group; call ``plan`` first to fail before starting one.
        """
        mesh = build_mesh(cls.plan(config, world_size, local_world_size), device_type)
        return cls(config, mesh, ranks_per_node=local_world_size)

    @staticmethod
    def plan(config: MemTrainConfig, world_size: int, local_world_size: int) -> MeshPlan:
        plan = plan_mesh(config.sharding, world_size, local_world_size)
        if config.local_update.enabled:
            check_replicas(plan)
        return plan

    @property
    def data_parallel_mesh(self) -> DeviceMesh:
        return data_parallel_mesh(self.config.sharding, self.mesh, across_replicas=not self.config.local_update.enabled)

    # -- preparing ----------------------------------------------------------------------------------------
    def prepare_model(self, model: nn.Module, materialize: Callable[[nn.Module], Any] | None = None) -> nn.Module:
        """Activation policies, then shard, then offload. ``materialize``: allocates a model built on meta, called
        once it is sharded (so only shards are allocated) and before its shards move to NVMe."""
        self.activations = apply_activations(model, self.config.activations, self.config.sharding.wrap,
                                             self.config.activations_nvme_path, self.job)
        offload_params = self.config.offload.params != "none" and self.mesh.device_type != "cpu"
        apply_sharding(model, self.config.sharding, self.mesh, across_replicas=not self.config.local_update.enabled,
                       offload_params=offload_params, split_large_modules=self.config.offload.enabled)
        if materialize is not None:
            materialize(model)
        apply_param_offload(model, self.config.offload, self.offload)
        if self.activations is not None:  # its host arenas count against offload.host_memory_budget too, and
            self.activations.charge_host = self.offload.charge  # its NVMe tier uses the run's one swap engine
            self.activations.io_engine = self.offload.io_engine
        return model

    def prepare_optimizer(self, optimizer: torch.optim.Optimizer, model: nn.Module,
                          max_grad_norm: float | None = None) -> torch.optim.Optimizer:
        """Call with an optimizer built over the *prepared* model's parameters.

        ``max_grad_norm``: global-norm clipping done by an offloaded optimizer itself (needed when it updates
        blocks during backward; ``clip_grad_norm_`` would come too late there).
        """
        current = {id(p) for p in model.parameters()}  # sharding replaces parameters: stale ones are not here
        if any(id(p) not in current for g in optimizer.param_groups for p in g["params"]):
            raise RuntimeError("build the optimizer after engine.prepare_model(model), from its parameters")
        if self.config.sharding.stage == 1 and self.data_parallel_mesh.size() > 1:  # one rank: nothing to split
            shard_optimizer_state(optimizer, model, self.data_parallel_mesh)
        if self.config.offload.enabled:
            apply_optimizer_offload(model, optimizer, self.config.offload, self.offload,
                                    self.data_parallel_mesh.get_group(), max_grad_norm)
        elif max_grad_norm is not None:
            raise ValueError("max_grad_norm is for offloaded optimizers; otherwise call engine.clip_grad_norm_")
        if self.config.local_update.enabled:
            self.local_update = apply_local_update(model, optimizer, self.config.local_update, self.mesh)
        if self.config.checkpoint.enabled:
            if self.checkpoints is None:  # one per job, however many optimizers
                self.checkpoints = CheckpointManager.for_this_process(self.config.checkpoint, self.job,
                                                                      self.ranks_per_node, self.mesh.device_type)
            offload, checkpoint = self.config.offload, self.config.checkpoint
            if "nvme" in (offload.optimizer, offload.params) and checkpoint.redundancy == "none":
                # State on NVMe is snapshotted file to file there, not through host memory (with redundancy it
                # goes through the keeper's memory, which is what peers replicate).
                folder = Path(offload.nvme_path) / "memtrain-snapshots" / (checkpoint.job_name or self.job)  # type: ignore[arg-type]
                self.checkpoints.files = SnapshotFiles(folder, lambda: mapped_files(model, optimizer))
                self.checkpoints.files.check_room(self.checkpoints.own_slots)
            apply_snapshots(optimizer, self.checkpoints)
        return optimizer

    def close(self, finished: bool = False) -> None:
        """Stop background work (snapshot copies and flushes, the local-update reduction thread); call before
        destroying the process group. ``finished``: the job is done, its keeper may let go of the snapshots."""
        if self.checkpoints is not None:
            self.checkpoints.close(finished)
        if self.local_update is not None:
            self.local_update.close()
        if self.activations is not None:  # copies and NVMe writes still in flight, then the swap folder
            self.activations.close()
        self.offload.close()  # the offload's swap folder (offloaded shards stay readable through their mapping)

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
    def clip_grad_norm_(model: nn.Module, max_norm: float, optimizer: torch.optim.Optimizer | None = None
                        ) -> torch.Tensor:
        """Clip by the global norm over all shards; returns that norm as a plain tensor."""
        offloaded = offload_state(optimizer) if optimizer is not None else None
        if offloaded is not None and offloaded.overlap:
            raise RuntimeError(
                "the offloaded optimizer updates blocks during backward (offload.overlap_backward): pass "
                "max_grad_norm to engine.prepare_optimizer so that it clips before updating, or set "
                "offload.overlap_backward=false"
            )
        params = [p for p in model.parameters() if p.grad is not None]
        norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
        return norm.full_tensor() if isinstance(norm, DTensor) else norm

    @staticmethod
    def memory(model: nn.Module, optimizer: torch.optim.Optimizer | None = None) -> MemoryReport:
        return account_training_state(model, optimizer)

    # -- checkpoints ----------------------------------------------------------------------------------------
    @staticmethod
    def _checkpoint_parts(model: nn.Module, optimizer: torch.optim.Optimizer | None,
                          rank_state: dict[str, Any] | None) -> tuple[dict[str, Any], dict[str, Any] | None]:
        local_update = local_update_of(optimizer) if optimizer is not None else None
        if local_update is not None:  # replicas differ: each rank keeps its own replica's state
            rank_state = {**(rank_state or {}), "local_update": local_update.state_dict()}
        return training_state(model, optimizer), rank_state

    @staticmethod
    def save_checkpoint(
        path: str | Path,
        model: nn.Module,
        optimizer: torch.optim.Optimizer | None,
        meta: dict[str, Any] | None = None,
        rank_state: dict[str, Any] | None = None,
    ) -> None:
        tensors, rank_state = Engine._checkpoint_parts(model, optimizer, rank_state)
        save_sharded(path, tensors, meta, rank_state)

    def snapshot(self, step: int, model: nn.Module, optimizer: torch.optim.Optimizer,
                 meta: dict[str, Any] | None = None, rank_state: dict[str, Any] | None = None) -> bool:
        """Right after ``optimizer.step()``: start an asynchronous snapshot when ``step`` is due (checkpoint
        section). Returns whether one started."""
        if self.checkpoints is None or not self.checkpoints.due(step):
            return False
        start = time.perf_counter()
        tensors, rank_state = self._checkpoint_parts(model, optimizer, rank_state)
        buffers = {f"model.{name}" for name, _ in model.named_buffers()}  # change in forward: copied now
        self.checkpoints.count_stall(time.perf_counter() - start)
        self.checkpoints.snapshot(step, tensors, meta, rank_state, stable_now=buffers)
        return True

    def restore(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> Restored | None:
        """Collective: the newest snapshot every rank can get (own keeper, peers, durable checkpoints), loaded
        into model and optimizer; None when there is none (or snapshots are off). From memory the optimizer's
        state may still be arriving when this returns: its first step waits for it."""
        if self.checkpoints is None:
            return None
        fresh = not optimizer.state
        late = ("optimizer",) if state_is_held(optimizer) else ()  # arrives while the first forward runs
        restored = self.checkpoints.restore(lambda: self._template(model, optimizer), late=late)
        if restored is not None:
            self._apply_loaded(model, optimizer, restored.state, restored.rank_state)
            if restored.late and not holds_all([optimizer], restored.late):
                self.checkpoints.wait_copied()  # the load copied the state elsewhere: load it again, whole
                self._apply_loaded(model, optimizer, restored.state, restored.rank_state)
        elif fresh:  # the template allocated optimizer state (uninitialized): the first step must start from none
            optimizer.state.clear()
        return restored

    @staticmethod
    def _template(model: nn.Module, optimizer: torch.optim.Optimizer | None) -> dict[str, Any]:
        state: dict[str, Any] = {"model": model_state(model)}
        if optimizer is not None:
            state["optimizer"] = template_optimizer_state(model, optimizer)
        return state

    @staticmethod
    def _apply_loaded(model: nn.Module, optimizer: torch.optim.Optimizer | None, state: dict[str, Any],
                      rank_state: dict[str, Any] | None) -> None:
        load_training_state(model, optimizer, state)
        local_update = local_update_of(optimizer) if optimizer is not None else None
        if local_update is not None:
            if rank_state is not None and "local_update" in rank_state:
                local_update.load_state_dict(rank_state["local_update"])
            else:  # another world size, or saved without local updates: the outer loop restarts from the model
                local_update.reset_from_model()

    @staticmethod
    def load_checkpoint(
        path: str | Path, model: nn.Module, optimizer: torch.optim.Optimizer | None
    ) -> tuple[dict[str, Any], dict[str, Any] | None]:
        """Load in place (any stage, any world size). Returns (meta, this rank's state or None)."""
        state = Engine._template(model, optimizer)
        meta, rank_state = load_sharded(path, state)
        Engine._apply_loaded(model, optimizer, state, rank_state)
        return meta, rank_state


def apply_snapshots(optimizer: torch.optim.Optimizer, manager: CheckpointManager) -> None:
    """Every update of ``optimizer`` first waits for the pending snapshot copy (the only stall snapshots add)."""
    inner_step = optimizer.step
    # torch's own optimizers run a closure once, before updating: run it before the wait, so that forward and
    # backward (Lightning passes them as the closure) overlap the copy. LBFGS calls its closure repeatedly.
    closure_first = (type(optimizer).__module__.startswith("torch.optim.")
                     and not isinstance(optimizer, torch.optim.LBFGS))

    @functools.wraps(inner_step)  # keeps the LR scheduler's marker: no "step() overridden" warning
    def step(closure: Callable[[], Any] | None = None, **kwargs: Any) -> Any:
        if closure is None or not closure_first:
            manager.wait_copied()
            return inner_step(**kwargs) if closure is None else inner_step(closure, **kwargs)
        with torch.enable_grad():
            loss = closure()
        manager.wait_copied()
        inner_step(**kwargs)
        return loss

    optimizer.step = step  # type: ignore[method-assign]
    optimizer._memtrain_snapshots = manager  # type: ignore[attr-defined]  (telemetry counts its memory)
    offloaded = offload_state(optimizer)
    if offloaded is not None:  # it may update blocks during backward, before step() is called
        offloaded.before_update = manager.wait_copied
