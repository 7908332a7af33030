"""CO2 local updates: tau local steps per replica, an outer step from an all-reduce hidden behind them.

``apply_local_update`` is called by the engine after sharding and after the optimizer is prepared (see
``memtrain.engine``). The model must have been sharded with ``across_replicas=False`` (its data-parallel mesh
is the shard dimension only), so backward never communicates across replicas; the outer all-reduce runs
over the replica group instead. Modules: ``outer`` the outer optimizer math, ``rounds`` the boundary logic
and checkpoint state, ``overlap`` the background reduction, ``compress`` what crosses the link, ``flat`` the
parameter view, ``groups`` the replica process group, ``sharded`` the outer state split across the replicas.
"""
from __future__ import annotations

import torch
import torch.nn as nn
from torch.distributed.device_mesh import DeviceMesh

from memtrain.config import LocalUpdateConfig
from memtrain.local_update.groups import check_replicas, mesh_group, replica_group
from memtrain.local_update.rounds import LocalUpdate, local_update_of
from memtrain.sharding.mesh import SHARD


def apply_local_update(model: nn.Module, optimizer: torch.optim.Optimizer, config: LocalUpdateConfig,
                       mesh: DeviceMesh) -> LocalUpdate:
    """Install the outer loop on ``optimizer`` (its ``step`` runs the boundary every ``config.tau`` steps)."""
    if local_update_of(optimizer) is not None:
        raise RuntimeError("local updates are already installed on this optimizer")
    backend = "nccl" if mesh.device_type == "cuda" else None
    group = replica_group(mesh, backend)
    shard_group = mesh[SHARD].get_group()
    needs_stats = config.outer_state_sharding and config.staleness_penalty and mesh[SHARD].size() > 1
    stats_group = mesh_group(mesh, backend) if needs_stats else None
    return LocalUpdate(model, optimizer, config, group, shard_group, stats_group)


__all__ = ["LocalUpdate", "apply_local_update", "check_replicas", "local_update_of"]
