"""``apply_sharding``: turn a single-device model into a ZeRO stage 0-3 or hybrid model on FSDP2.

Stages 0 and 1 use FSDP2's replicate (parameters as replicated DTensors, gradients all-reduced per block
during backward); stages 2 and 3 use ``fully_shard``. A stage 0-1 model whose data-parallel mesh has one rank
(and no mixed-precision policy) is left as it is: plain parameters, nothing to all-reduce.
``torch.distributed.checkpoint`` saves DTensors and plain tensors alike, so a checkpoint written at one stage or
world size loads at another.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.distributed._composable.replicate_with_fsdp import replicate
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, OffloadPolicy, fully_shard

from memtrain.config import ShardingConfig
from memtrain.sharding.mesh import REPLICATE, SHARD
from memtrain.sharding.wrap import find_blocks, find_large_modules


def data_parallel_mesh(sharding: ShardingConfig, mesh: DeviceMesh, *, across_replicas: bool = True) -> DeviceMesh:
    """The (sub)mesh the model's parameters are laid out on for this stage.

    ``across_replicas=False`` (local updates): only the shard dimension, so every replica is an independent
    FSDP2 group whose backward never communicates across the replicate dimension.
    """
    if not across_replicas:
        return mesh[SHARD]
    if sharding.stage < 2:
        return mesh[REPLICATE]
    return mesh if sharding.hybrid else mesh[SHARD]


def mixed_precision_policy(sharding: ShardingConfig) -> MixedPrecisionPolicy:
    def dtype(name: str | None) -> torch.dtype | None:
        return getattr(torch, name) if name else None

    return MixedPrecisionPolicy(param_dtype=dtype(sharding.param_dtype), reduce_dtype=dtype(sharding.reduce_dtype))


def mesh_device(mesh: DeviceMesh) -> torch.device:
    if mesh.device_type == "cuda":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device(mesh.device_type)


@torch.no_grad()
def broadcast_module_state(model: nn.Module, mesh: DeviceMesh) -> None:
    """Copy the first rank's parameters and buffers to every rank of ``mesh`` (one collective per tensor)."""
    group = mesh.get_group()
    src = dist.get_global_rank(group, 0)
    for tensor in [*model.parameters(), *model.buffers()]:
        dist.broadcast(tensor.data, src=src, group=group)


def apply_sharding(model: nn.Module, sharding: ShardingConfig, mesh: DeviceMesh, *,
                   across_replicas: bool = True, offload_params: bool = False,
                   split_large_modules: bool = False) -> nn.Module:
    """Shard ``model`` in place, block by block, then its root; returns the same module object.

    ``offload_params`` (stage 3, accelerators): the shards stay in host memory and FSDP2 copies them to the
    device for each gather (``memtrain.offload`` may move them on to NVMe, with its own page-locked buffers).
    ``split_large_modules`` (stages 2-3, used with offload): modules outside the blocks as large as a block
    (embedding, output head) become groups of their own.
    """
    dp_mesh = data_parallel_mesh(sharding, mesh, across_replicas=across_replicas)
    mp_policy = mixed_precision_policy(sharding)
    blocks = find_blocks(model, sharding.wrap)
    if sharding.stage < 2:
        # Every rank holds the whole model at these stages: move it to the mesh's device (the collectives run
        # there), then make the replicas start equal, as DDP does: ranks may have built it from different seeds.
        model.to(mesh_device(dp_mesh))
        if dp_mesh.size() == 1 and mp_policy == MixedPrecisionPolicy():
            # Nothing to replicate over (one device, or local updates whose replicas are the ranks): replicate()
            # would only add DTensor dispatch, hooks and flat-buffer copies, ~30% CPU per step (BENCHMARKS, CO2).
            return model
        broadcast_module_state(model, dp_mesh)
        for block in blocks:
            replicate(block, mesh=dp_mesh, mp_policy=mp_policy)
        replicate(model, mesh=dp_mesh, mp_policy=mp_policy)
        return model
    # Stage 3 frees each block's gathered parameters after its forward and gathers them again in backward;
    # stage 2 keeps them from forward to backward. The root's parameters (embeddings, head) are needed again
    # right at the start of backward, so the root never reshards after forward.
    reshard = sharding.stage == 3
    offload = CPUOffloadPolicy(pin_memory=False) if offload_params else OffloadPolicy()
    for block in blocks:
        fully_shard(block, mesh=dp_mesh, reshard_after_forward=reshard, mp_policy=mp_policy, offload_policy=offload)
    if split_large_modules:
        # Like the root, kept gathered from forward to backward: the head is used last in forward, first in
        # backward; the embedding's gradient is the last one backward produces.
        for module in find_large_modules(model, blocks):
            fully_shard(module, mesh=dp_mesh, reshard_after_forward=False, mp_policy=mp_policy,
                        offload_policy=offload)
    fully_shard(model, mesh=dp_mesh, reshard_after_forward=False, mp_policy=mp_policy, offload_policy=offload)
    return model
