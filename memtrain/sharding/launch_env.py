"""Check the Trainer's devices / num_nodes against what the external launcher (torchrun, srun) started.

Lightning does not check this for externally launched strategies: a mismatch there shows up as a hang or a
wrong mesh long after start. Here it is an error before any process group starts.
"""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from memtrain.config import ConfigError


@dataclass(frozen=True)
class LaunchedWorld:
    launcher: str
    world_size: int
    local_world_size: int | None
    num_nodes: int | None


def detect_launched_world(env: Mapping[str, str]) -> LaunchedWorld | None:
    """What an external launcher says about the world, or None when this process was not launched externally."""
    if "TORCHELASTIC_RUN_ID" in env and "WORLD_SIZE" in env:  # torchrun; wins over SLURM as in Lightning
        world = int(env["WORLD_SIZE"])
        local = int(env["LOCAL_WORLD_SIZE"]) if "LOCAL_WORLD_SIZE" in env else None
        nodes = world // local if local and world % local == 0 else None
        return LaunchedWorld("torchrun", world, local, nodes)
    if "SLURM_NTASKS" in env and env.get("SLURM_JOB_NAME") not in ("bash", "interactive"):
        world = int(env["SLURM_NTASKS"])
        nodes = int(env["SLURM_NNODES"]) if "SLURM_NNODES" in env else None
        per_node = env.get("SLURM_NTASKS_PER_NODE", "").split("(")[0]
        local = int(per_node) if per_node.isdigit() else None
        return LaunchedWorld("srun", world, local, nodes)
    if "LOCAL_RANK" in env and "WORLD_SIZE" in env:  # a hand-rolled launcher that sets torch's variables
        return LaunchedWorld("environment", int(env["WORLD_SIZE"]), None, None)
    return None


def check_launched_world(devices: int, num_nodes: int, env: Mapping[str, str]) -> None:
    """Raise ConfigError if ``devices`` per node x ``num_nodes`` disagrees with the launcher."""
    world = detect_launched_world(env)
    if world is None:
        return
    fix = (
        f"set Trainer(devices={world.local_world_size or '<processes per node>'}, "
        f"num_nodes={world.num_nodes or '<nodes>'}) to match the {world.launcher} launch"
    )
    if world.local_world_size is not None and devices != world.local_world_size:
        raise ConfigError(
            f"devices={devices} but {world.launcher} started {world.local_world_size} processes per node: {fix}"
        )
    if world.num_nodes is not None and num_nodes != world.num_nodes:
        raise ConfigError(f"num_nodes={num_nodes} but {world.launcher} started {world.num_nodes} node(s): {fix}")
    if devices * num_nodes != world.world_size:
        raise ConfigError(
            f"devices x num_nodes = {devices} x {num_nodes} = {devices * num_nodes}, but {world.launcher} started "
            f"{world.world_size} processes: {fix}"
        )
