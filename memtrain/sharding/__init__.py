"""ZeRO stages 0-3 and hybrid sharding on FSDP2: meshes, wrap policies, stages, ZeRO-1 optimizer state."""
from memtrain.sharding.launch_env import check_launched_world, detect_launched_world
from memtrain.sharding.mesh import MeshPlan, build_mesh, plan_mesh
from memtrain.sharding.stages import apply_sharding, data_parallel_mesh
from memtrain.sharding.wrap import find_blocks
from memtrain.sharding.zero1 import ShardedOptimizerState, shard_optimizer_state, zero1_state

__all__ = [
    "MeshPlan", "ShardedOptimizerState", "apply_sharding", "build_mesh", "check_launched_world",
    "data_parallel_mesh", "detect_launched_world", "find_blocks", "plan_mesh", "shard_optimizer_state",
    "zero1_state",
]
