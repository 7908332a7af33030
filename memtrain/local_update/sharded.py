"""Outer state sharded across the replica group: each replica owns 1/R of the flat vector (ZeRO-1 style).

Replica r of R owns elements [r * chunk, (r + 1) * chunk) of the flat parameters, zero-padded to R * chunk (chunk
a multiple of the int8 block, so int8 blocks line up with the unsharded path's). One round, on the background
thread in asynchronous mode (inline in synchronous mode), replaces the all-reduce of ``compress.py``:
  reduce-scatter of the snapshot g  ->  the owned slice of mean g  ->  the outer step of ``outer.py`` on that
  slice only (its anchor A, momentum m and previous step s are 1/R slices)  ->  all-gather of the new anchor.
The outer step is element-wise except the staleness penalty's per-tensor rms: each owner sums the squares of
its pieces of every tensor and one small all-reduce over ``stats_group`` (every rank that holds a piece of the
tensor) completes them.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F

from memtrain.local_update.compress import ReplicaMean


class ShardedOuter:
    def __init__(self, mean: ReplicaMean, numel: int, stats_group: dist.ProcessGroup, device: torch.device) -> None:
        """``device``: the parameters' device, where the collectives run (NCCL takes no host tensors)."""
        self.mean, self.numel, self.stats_group, self.device = mean, numel, stats_group, device
        self.replicas = mean.size
        self.rank = dist.get_rank(mean.group)
        align = mean.block if mean.compression == "int8" else 1
        self.chunk = -(-numel // (self.replicas * align)) * align
        self.lo = self.rank * self.chunk

    def segments(self, full: list[tuple[int, int]]) -> list[tuple[int, int]]:
        """(offset in the owned slice, numel) of every tensor's piece inside it; (0, 0) where it has none."""
        out = []
        for offset, n in full:
            lo, hi = max(offset, self.lo), min(offset + n, self.lo + self.chunk)
            out.append((lo - self.lo, hi - lo) if hi > lo else (0, 0))
        return out

    def own(self, full: torch.Tensor) -> torch.Tensor:
        """A copy of this replica's slice of a full flat vector (zeros past its end)."""
        return self._padded(full)[self.lo : self.lo + self.chunk].clone()

    def sum_over_owners(self, t: torch.Tensor) -> torch.Tensor:
        """Per-tensor partial sums of every owner (and shard position) into whole-tensor sums, on ``t``'s device
        (the host with ``outer_state_device="cpu"``: reduced on the communication device and brought back)."""
        out = t.to(self.device, copy=True)
        dist.all_reduce(out, group=self.stats_group)
        return out.to(t.device)

    @torch.no_grad()
    def mean_of_owned(self, g: torch.Tensor) -> torch.Tensor:
        """The replicas' mean of this replica's slice of ``g`` (only read), compressed on the wire as configured."""
        return self.mean.owned_mean(self._padded(g))

    @torch.no_grad()
    def gather(self, owned: torch.Tensor, device: torch.device) -> torch.Tensor:
        """Every replica's slice, concatenated: a new full flat vector of ``numel`` elements."""
        full = torch.empty(self.replicas * self.chunk, dtype=owned.dtype, device=device)
        dist.all_gather_single(full, owned.to(device), group=self.mean.group)
        return full[: self.numel]

    def _padded(self, full: torch.Tensor) -> torch.Tensor:
        return F.pad(full, (0, self.replicas * self.chunk - full.numel()))
