"""How many bytes of parameters, gradients and optimizer state this rank holds, and on which tier.

Counts what the rank owns: the local shard of a DTensor, each tensor once even when several names view
it (ZeRO-1's shard parameters view the model's parameters).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn as nn
from torch.distributed.tensor import DTensor

TIERS = ("gpu", "host_pinned", "host", "nvme")
CATEGORIES = ("params", "grads", "optimizer_state", "snapshots")


def tier_of(t: torch.Tensor) -> str:
    if t.device.type == "cpu":
        return "host_pinned" if t.is_pinned() else "host"
    return "gpu"


@dataclass
class MemoryReport:
    """bytes[category][tier] for this rank."""

    bytes: dict[str, dict[str, int]] = field(
        default_factory=lambda: {c: {t: 0 for t in TIERS} for c in CATEGORIES}
    )

    def add(self, category: str, t: torch.Tensor, tier: str | None = None) -> None:
        self.bytes[category][tier or tier_of(t)] += t.numel() * t.element_size()

    def total(self, category: str) -> int:
        return sum(self.bytes[category].values())

    def as_flat_dict(self) -> dict[str, int]:
        """``{"params/gpu": n, ..., "params": total, ...}`` for loggers."""
        flat = {f"{c}/{t}": n for c, tiers in self.bytes.items() for t, n in tiers.items()}
        flat.update({c: self.total(c) for c in CATEGORIES})
        return flat

    def summary(self) -> str:
        return ", ".join(f"{c} {self.total(c) / 2**20:.2f} MiB" for c in CATEGORIES)


def _local(t: torch.Tensor) -> torch.Tensor:
    return t._local_tensor if isinstance(t, DTensor) else t


def account_training_state(model: nn.Module, optimizer: torch.optim.Optimizer | None = None) -> MemoryReport:
    """Offloaded state counts on its tier: parameter shards swapped out and optimizer moments in NVMe files as
    "nvme", host-resident moments as "host". Snapshot memory (own slots and the replicas held for a peer, in the
    keeper's shared memory) counts as "snapshots" on the host tiers."""
    from memtrain.offload import offload_state, param_offload_of

    report = MemoryReport()
    seen: set[tuple[int, int, torch.device]] = set()

    def add_once(category: str, t: torch.Tensor, tier: str | None = None) -> None:
        t = _local(t)
        key = (t.data_ptr(), t.numel(), t.device)
        if t.numel() == 0 or key in seen:
            return
        seen.add(key)
        report.add(category, t, tier)

    swapped = param_offload_of(model)
    evicted = swapped.evicted_params() if swapped is not None else set()
    for p in model.parameters():
        add_once("params", p.data, "nvme" if id(p) in evicted else None)
    for p in model.parameters():
        if p.grad is not None:
            add_once("grads", p.grad)
    offloaded = offload_state(optimizer) if optimizer is not None else None
    if offloaded is not None:
        for tier, nbytes in offloaded.store.state_bytes().items():
            report.bytes["optimizer_state"][tier] += nbytes
    if optimizer is not None:
        for state in optimizer.state.values():
            for value in state.values():
                if isinstance(value, torch.Tensor):
                    add_once("optimizer_state", value)
    snapshots = getattr(optimizer, "_memtrain_snapshots", None)
    if snapshots is not None:
        for tier, nbytes in snapshots.store.host_bytes().items():
            report.bytes["snapshots"][tier] += nbytes
    return report
