"""The device mesh that a sharding config asks for, checked against the world before any process group starts."""
from __future__ import annotations

from dataclasses import dataclass

from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

from memtrain.config import ConfigError, ShardingConfig

REPLICATE, SHARD = "replicate", "shard"


@dataclass(frozen=True)
class MeshPlan:
    """Mesh shape and dimension names: ``(replicate, shard)`` sizes, ranks within a shard group contiguous."""

    replicate: int
    shard: int

    @property
    def shape(self) -> tuple[int, ...]:
        return (self.replicate, self.shard)

    @property
    def world_size(self) -> int:
        return self.replicate * self.shard


def plan_mesh(sharding: ShardingConfig, world_size: int, local_world_size: int) -> MeshPlan:
    """Pure function of the config and the world: raises ConfigError if the mesh cannot be built."""
    if world_size < 1 or local_world_size < 1:
        raise ConfigError(f"world size {world_size} / devices per node {local_world_size} must be positive")
    if sharding.stage < 2:
        # Parameters and gradients are replicated over every rank; stage 1 splits the optimizer state over
        # that same replicate group.
        return MeshPlan(replicate=world_size, shard=1)
    if not sharding.hybrid:
        return MeshPlan(replicate=1, shard=world_size)
    shard = sharding.shard_size or local_world_size
    if world_size % shard != 0:
        raise ConfigError(
            f"sharding.shard_size={shard} does not divide the world size {world_size}: "
            f"choose a divisor of {world_size} (e.g. the devices per node, {local_world_size})"
        )
    if shard == world_size:
        raise ConfigError(
            f"sharding.hybrid=true with a shard group of all {world_size} ranks leaves nothing to replicate: "
            "use sharding.hybrid=false, or a smaller sharding.shard_size"
        )
    return MeshPlan(replicate=world_size // shard, shard=shard)


def build_mesh(plan: MeshPlan, device_type: str) -> DeviceMesh:
    """2D mesh ``(replicate, shard)``; needs an initialized default process group of ``plan.world_size``."""
    return init_device_mesh(device_type, plan.shape, mesh_dim_names=(REPLICATE, SHARD))
