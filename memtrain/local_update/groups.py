"""The replica group of this rank: the ranks that hold the same shard position on the replicate dimension.

A dedicated process group (not the mesh's), so the background all-reduce never interleaves with collectives
the training thread issues on other groups. ``mesh_group`` is likewise the background thread's own group over
the whole mesh (the sharded outer state's staleness penalty sums over replicas and shards there).
"""
from __future__ import annotations

import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh

from memtrain.config import ConfigError
from memtrain.sharding.mesh import REPLICATE, MeshPlan


def check_replicas(plan: MeshPlan) -> None:
    """ConfigError before any process group starts if there is nothing to average across."""
    if plan.replicate < 2:
        raise ConfigError(
            f"local_update.tau is set but the mesh {plan.shape} (replicate, shard) has a replica group of size "
            f"{plan.replicate}: local updates average across replicas. Use stage 0/1 on 2+ ranks, or "
            "sharding.hybrid=true with 2+ shard groups at stage 2/3"
        )


def replica_group(mesh: DeviceMesh, backend: str | None = None) -> dist.ProcessGroup:
    """Every rank calls this (new_group is collective); returns the group that contains this rank."""
    layout = mesh.mesh  # (replicate, shard) -> global rank
    if mesh.mesh_dim_names is None or mesh.mesh_dim_names[0] != REPLICATE or layout.ndim != 2:
        raise ValueError("local updates need memtrain's 2D (replicate, shard) mesh")
    mine = None
    me = dist.get_rank()
    for column in range(layout.shape[1]):
        ranks = layout[:, column].tolist()
        group = dist.new_group(ranks, backend=backend)
        if me in ranks:
            mine = group
    assert mine is not None
    return mine


def mesh_group(mesh: DeviceMesh, backend: str | None = None) -> dist.ProcessGroup:
    """Every rank calls this (new_group is collective): a group of all the mesh's ranks, used by nothing else."""
    return dist.new_group(mesh.mesh.flatten().tolist(), backend=backend)
