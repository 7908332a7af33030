"""Where each tensor of one rank's training state sits in a flat snapshot buffer, and how to rebuild the state.

A training state is a nested dict (model and optimizer state dicts of DTensors, plain tensors, numbers, lists).
``flatten`` splits it into tensors (each given an aligned byte range) and a skeleton (everything else, with a
placeholder per tensor) that is pickled beside the bytes. The same model, optimizer and world size always give
the same layout, so a restarted trainer can check (by ``digest``) that a snapshot fits it before reading it.
Tensors that live in a file (views of an NVMe swap file) can be laid out in a second range, the snapshot file's
(``in_file``), instead of the memory buffer.
"""
from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch.distributed.tensor import DTensor

from memtrain.offload.views import dtensor_view

ALIGN = 64  # bytes; keeps every tensor's start aligned for vectorized copies


@dataclass(frozen=True)
class TensorRef:
    """A placeholder in the skeleton for the tensor stored at ``index``."""

    index: int


@dataclass
class Entry:
    path: str  # readable position in the nested state, for error messages
    offset: int
    nbytes: int
    dtype: torch.dtype
    shape: tuple[int, ...]
    dtensor: tuple[Any, tuple[Any, ...], torch.Size, tuple[int, ...]] | None  # mesh, placements, global shape, stride
    in_file: bool = False  # ``offset`` is into the snapshot file, not the memory buffer

    def view(self, flat: torch.Tensor) -> torch.Tensor:
        """This tensor's bytes inside ``flat`` (a uint8 buffer), as a tensor of its dtype and local shape."""
        raw = flat[self.offset:self.offset + self.nbytes]
        return raw.view(self.dtype).view(self.shape) if self.nbytes else torch.empty(self.shape, dtype=self.dtype)

    def rebuild(self, local: torch.Tensor) -> torch.Tensor:
        if self.dtensor is None:
            return local
        mesh, placements, shape, stride = self.dtensor
        return dtensor_view(local, mesh, placements, shape, stride)  # stays in the snapshot, off the GPU


@dataclass
class Layout:
    entries: list[Entry]
    data_bytes: int
    digest: str
    file_bytes: int = 0

    def views(self, flat: torch.Tensor, file_flat: torch.Tensor | None = None) -> list[torch.Tensor | None]:
        """Each tensor's bytes: in ``flat`` (memory), or in ``file_flat`` (the snapshot file; None without it)."""
        return [(None if file_flat is None else e.view(file_flat)) if e.in_file else e.view(flat)
                for e in self.entries]


def _local(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.to_local() if isinstance(tensor, DTensor) else tensor


def flatten(state: Any, in_file: Callable[[torch.Tensor], bool] | None = None) -> tuple[Any, list[torch.Tensor], Layout]:
    """(skeleton, local tensors in order, their layout) of a nested state; ``in_file(local)``: lay that tensor out
    in the snapshot file."""
    tensors: list[torch.Tensor] = []
    entries: list[Entry] = []
    offsets = [0, 0]  # memory, file

    def walk(obj: Any, path: str) -> Any:
        if isinstance(obj, torch.Tensor):
            local = _local(obj)
            spec = None
            if isinstance(obj, DTensor):
                spec = (obj.device_mesh, tuple(obj.placements), obj.shape, tuple(obj.stride()))
            nbytes = local.numel() * local.element_size()
            filed = in_file is not None and in_file(local)
            entries.append(Entry(path, offsets[filed], nbytes, local.dtype, tuple(local.shape), spec, filed))
            tensors.append(local)
            offsets[filed] += -(-nbytes // ALIGN) * ALIGN
            return TensorRef(len(tensors) - 1)
        if isinstance(obj, dict):
            return {k: walk(v, f"{path}.{k}" if path else str(k)) for k, v in obj.items()}
        if isinstance(obj, (list, tuple)):
            items = [walk(v, f"{path}[{i}]") for i, v in enumerate(obj)]
            return items if isinstance(obj, list) else tuple(items)
        return obj

    skeleton = walk(state, "")
    described = [(e.path, str(e.dtype), e.shape, e.offset,
                  None if e.dtensor is None else (tuple(map(str, e.dtensor[1])), tuple(e.dtensor[2])))
                 + (("file",) if e.in_file else ()) for e in entries]
    digest = hashlib.sha256(repr(described).encode()).hexdigest()[:32]
    return skeleton, tensors, Layout(entries, offsets[0], digest, offsets[1])


def unflatten(skeleton: Any, tensors: list[torch.Tensor]) -> Any:
    """The nested state with each placeholder replaced by ``tensors[index]``."""
    if isinstance(skeleton, TensorRef):
        return tensors[skeleton.index]
    if isinstance(skeleton, dict):
        return {k: unflatten(v, tensors) for k, v in skeleton.items()}
    if isinstance(skeleton, list):
        return [unflatten(v, tensors) for v in skeleton]
    if isinstance(skeleton, tuple):
        return tuple(unflatten(v, tensors) for v in skeleton)
    return skeleton
