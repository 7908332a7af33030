"""``dtensor_view``: a DTensor over a local tensor that stays where it is (host memory, a swap file's mapping).

``DTensor.from_local`` moves a local tensor to its mesh's device: on a CUDA mesh a view of host state becomes a
GPU copy, so saving it fills the GPU and loading into it never reaches the state it was meant to view. This is
FSDP2's ``_from_local_no_grad``, which keeps CPU-offloaded shards on the host the same way.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor
from torch.distributed.tensor._dtensor_spec import DTensorSpec, TensorMeta
from torch.distributed.tensor.placement_types import Placement


def dtensor_view(local: torch.Tensor, mesh: DeviceMesh, placements: Sequence[Placement], shape: Sequence[int],
                 stride: Sequence[int]) -> DTensor:
    """``local`` itself (no copy, no move) as this rank's part of a DTensor of global ``shape`` / ``stride``."""
    spec = DTensorSpec(mesh, tuple(placements), TensorMeta(torch.Size(shape), tuple(stride), local.dtype))
    return DTensor(local, spec, requires_grad=False)  # type: ignore[call-arg]


def dtensor_like(param: torch.Tensor, local: torch.Tensor) -> torch.Tensor:
    """``local`` laid out like ``param`` (a DTensor: its mesh, placements, global shape); a plain tensor as is."""
    if isinstance(param, DTensor):
        return dtensor_view(local, param.device_mesh, param.placements, param.shape, param.stride())
    return local
