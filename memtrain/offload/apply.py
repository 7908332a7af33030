"""``apply_param_offload`` / ``apply_optimizer_offload``: put the training state on host memory and NVMe.

Called by the engine in its fixed order: parameters right after sharding (stage 3), the optimizer after the
ZeRO-1 optimizer sharding. One ``OffloadResources`` per engine holds the swap folder, the I/O engine and the
host-budget ledger, so the budget is one number across parameters and optimizer state.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.fsdp import FSDPModule

from memtrain.config import ConfigError, OffloadConfig, format_bytes
from memtrain.offload.host_memory import return_freed_memory_to_os
from memtrain.offload.optimizer import Entry, OffloadedAdam, Unit, check_supported
from memtrain.offload.params import ParamOffload
from memtrain.offload.store import FLOAT_BYTES, StateStore, _round_up, plan_tiers
from memtrain.sharding.zero1 import zero1_state
from memtrain.swap import SwapDirectory, SwapEngine


@dataclass
class OffloadResources:
    config: OffloadConfig
    job: str
    directory: SwapDirectory | None = None
    engine: SwapEngine | None = None
    host_bytes: dict[str, int] = field(default_factory=dict)  # what memtrain holds in host memory, by use

    def swap(self, required_bytes: int) -> tuple[SwapDirectory, SwapEngine]:
        if self.directory is None:
            assert self.config.nvme_path is not None
            self.directory = SwapDirectory(self.config.nvme_path, self.job, required_bytes)
        return self.directory, self.io_engine()

    def io_engine(self) -> SwapEngine:
        """The run's one swap engine, with the offload section's I/O settings (the activations' NVMe tier uses it
        too: one I/O queue per process, one io_backend choice)."""
        if self.engine is None:
            self.engine = SwapEngine(self.config.queue_depth, self.config.block_size, self.config.io_threads,
                                     self.config.io_backend)
        return self.engine

    def charge(self, use: str, nbytes: int, remedy: str | None = None) -> None:
        """Count host memory against ``offload.host_memory_budget``; refuse, before training, what exceeds it
        (the activations' host arenas: at the end of the first forward, before any update)."""
        budget = self.config.host_memory_budget
        if budget is not None:
            return_freed_memory_to_os()
        total = sum(self.host_bytes.values()) + nbytes
        if budget is not None and total > budget:
            held = ", ".join(f"{k} {format_bytes(v)}" for k, v in {**self.host_bytes, use: nbytes}.items())
            raise ConfigError(
                f"offload.host_memory_budget={format_bytes(budget)} is too small: memtrain's host buffers and "
                f"host-resident state need {format_bytes(total)} ({held}). Raise the budget, "
                + (f"or {remedy}" if remedy else "lower offload.tile_size / offload.prefetch_blocks / "
                   "offload.optimizer_cpu_fraction, or offload more to NVMe")
            )
        self.host_bytes[use] = nbytes

    def close(self) -> None:
        if self.directory is not None:
            self.directory.remove()


def fsdp_groups(model: nn.Module) -> list[tuple[str, object]]:
    """(module name, FSDPParamGroup) for every FSDP2 module that holds parameters, in module order."""
    groups = []
    for name, module in model.named_modules():
        if isinstance(module, FSDPModule):
            group = module._get_fsdp_state()._fsdp_param_group
            if group is not None:
                groups.append((name or "<root>", group))
    return groups


def _local_numel(p: torch.Tensor) -> int:
    return p.to_local().numel() if hasattr(p, "to_local") else p.numel()


def apply_param_offload(model: nn.Module, config: OffloadConfig, resources: OffloadResources) -> ParamOffload | None:
    """Stage 3 with params='nvme': every block's shards move to the swap file and leave host memory."""
    if config.params != "nvme":
        return None
    groups = fsdp_groups(model)
    if not groups:
        raise ConfigError("offload.params='nvme' needs sharding.stage=3 (FSDP2 parameter groups to swap)")
    param_bytes = sum(_round_up(p._sharded_param_data.nbytes, 4096) for _, g in groups for p in g.fsdp_params)
    numel = sum(_local_numel(p) for p in model.parameters())
    cpu_share = config.optimizer_cpu_fraction if isinstance(config.optimizer_cpu_fraction, float) else 0.0
    opt_nvme = 2 * numel * FLOAT_BYTES * (1 - cpu_share) if config.optimizer == "nvme" else 0
    directory, engine = resources.swap(int(param_bytes + opt_nvme))
    max_unit = max(sum(_round_up(p._sharded_param_data.nbytes, 64) for p in g.fsdp_params) for _, g in groups)
    keep = config.overlap_backward
    resources.charge("parameter swap buffers", ParamOffload.pool_bytes(max_unit, config.prefetch_blocks, keep))
    offload = ParamOffload(groups, directory.path, engine, config.prefetch_blocks, keep_for_update=keep,
                           pin=torch.cuda.is_available())
    model._memtrain_param_offload = offload  # type: ignore[assignment]
    return offload


def param_offload_of(model: nn.Module) -> ParamOffload | None:
    return getattr(model, "_memtrain_param_offload", None)


def _units(model: nn.Module, optimizer: torch.optim.Optimizer, tile_elems: int) -> list[Unit]:
    """Stages 2-3: one unit per FSDP2 group. Stage 1: this rank's ZeRO-1 shards, cut into tile-sized units."""
    zero1 = zero1_state(optimizer)
    group_of: dict[int, int] = {}
    names: dict[int, str] = {}
    stepped: list[torch.Tensor] = []
    if zero1 is not None:
        for gi, slots in enumerate(zero1.slots):
            for s in slots:
                group_of[id(s.shard)], names[id(s.shard)] = gi, s.fqn
                stepped.append(s.shard)
    else:
        by_id = {id(p): n for n, p in model.named_parameters()}
        for gi, group in enumerate(optimizer.param_groups):
            for p in group["params"]:
                if id(p) not in by_id:
                    raise ValueError("the optimizer holds a parameter that is not in the model; build it from "
                                     "model.parameters() after memtrain has prepared the model")
                group_of[id(p)], names[id(p)] = gi, by_id[id(p)]
                stepped.append(p)
    units: list[Unit] = []
    groups = fsdp_groups(model) if zero1 is None else []
    if groups:
        offload = param_offload_of(model)
        for i, (name, group) in enumerate(groups):
            entries, at = [], 0
            for fsdp_param in group.fsdp_params:
                p = fsdp_param.sharded_param
                if id(p) in group_of:
                    n = _local_numel(p)
                    entries.append(Entry(names[id(p)], p, group_of[id(p)], at, n))
                    at += n
            units.append(Unit(name, entries, group, offload.units[i] if offload is not None else None))
        covered = {id(e.param) for u in units for e in u.entries}
        if len(covered) != len(stepped):
            raise ValueError("the optimizer holds parameters that no FSDP2 group manages")
        return units
    entries, at = [], 0
    for p in stepped:
        n = _local_numel(p)
        entries.append(Entry(names[id(p)], p, group_of[id(p)], at, n))
        at += n
        if at >= tile_elems:
            units.append(Unit(f"tensors {len(units)}", entries))
            entries, at = [], 0
    if entries:
        units.append(Unit(f"tensors {len(units)}", entries))
    return units


def _fraction_filling_budget(numels: list[int], config: OffloadConfig, resources: OffloadResources) -> float:
    """The share of the optimizer state that fits in what the budget leaves after every buffer (swap buffers
    included): each byte kept in host memory saves two bytes of NVMe traffic per step (a read and a write)."""
    assert config.host_memory_budget is not None
    state = sum(2 * _round_up(n) * FLOAT_BYTES for n in numels)
    buffers = StateStore.pool_bytes(2, plan_tiers(numels, 0.0), config.tile_size)
    left = config.host_memory_budget - sum(resources.host_bytes.values()) - buffers
    return min(1.0, max(0.0, left / state)) if state else 0.0


def apply_optimizer_offload(model: nn.Module, optimizer: torch.optim.Optimizer, config: OffloadConfig,
                            resources: OffloadResources, dp_group: dist.ProcessGroup | None,
                            max_grad_norm: float | None = None) -> OffloadedAdam:
    check_supported(optimizer)
    tile_elems = config.tile_size // FLOAT_BYTES
    units = _units(model, optimizer, tile_elems)
    numels = [u.numel for u in units]
    cpu_fraction = 1.0 if config.optimizer == "cpu" else config.optimizer_cpu_fraction
    if cpu_fraction == "auto":
        cpu_fraction = _fraction_filling_budget(numels, config, resources)
    # Size the host part exactly as the store will lay it out, and charge it before allocating anything.
    ranges = plan_tiers(numels, cpu_fraction)
    host_state = sum(2 * _round_up(r.numel) * FLOAT_BYTES for r in ranges if r.tier == "cpu")
    nvme_state = sum(2 * _round_up(r.numel) * FLOAT_BYTES for r in ranges if r.tier == "nvme")
    resources.charge("host-resident optimizer state", host_state)
    folder = engine = None
    if nvme_state:
        resources.charge("optimizer swap buffers", StateStore.pool_bytes(2, ranges, config.tile_size))
        directory, engine = resources.swap(nvme_state)
        folder = directory.path
    store = StateStore(("exp_avg", "exp_avg_sq"), numels, cpu_fraction, config.tile_size, folder, engine)
    return OffloadedAdam(optimizer, units, store, param_offload_of(model), config.overlap_backward, dp_group,
                         max_grad_norm)
