"""Accounting of saved activations: the bytes autograd holds for backward on the compute device, and their peak.

A saved tensor is counted by its storage, once however many saved tensors view it, from the moment it is
held for backward (packed) until it is handed back to backward (unpacked) or dropped. ``memtrain.activations``
reports what its policies keep, retain for recompute, hold while a copy is in flight and reload ahead of need;
``count_saved_tensors`` counts everything saved inside a region that no policy covers (the reference for
benchmarks and tests). Bytes moved out per tier are counted as well.
"""
from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch


def storage_key(t: torch.Tensor) -> tuple[str, int]:
    """Identifies a tensor's storage while it is alive (views of one storage share the key)."""
    return (str(t.device), t.untyped_storage().data_ptr())


def storage_bytes(t: torch.Tensor) -> int:
    return t.untyped_storage().nbytes()


def is_parameter_like(t: torch.Tensor) -> bool:
    """A parameter or a view of one (``weight.t()`` saved by a matmul): state, not an activation."""
    if isinstance(t, torch.nn.Parameter):
        return True
    base = t._base if t._base is not None else t
    return base.is_leaf and base.requires_grad


@dataclass
class SavedTensorAccounting:
    """Device-resident saved bytes now and at the peak; bytes moved out per tier."""

    resident_bytes: int = 0
    peak_bytes: int = 0
    moved_bytes: dict[str, int] = field(default_factory=lambda: {"cpu": 0, "nvme": 0})
    _held: dict[Any, list[int]] = field(default_factory=dict)  # key -> [bytes, holders]

    def hold(self, key: Any, nbytes: int) -> None:
        entry = self._held.get(key)
        if entry is not None:
            entry[1] += 1
            return
        self._held[key] = [nbytes, 1]
        self.resident_bytes += nbytes
        if self.resident_bytes > self.peak_bytes:
            self.peak_bytes = self.resident_bytes

    def release(self, key: Any) -> None:
        entry = self._held.get(key)
        if entry is None:
            return
        entry[1] -= 1
        if entry[1] == 0:
            del self._held[key]
            self.resident_bytes -= entry[0]

    def moved(self, tier: str, nbytes: int) -> None:
        self.moved_bytes[tier] = self.moved_bytes.get(tier, 0) + nbytes

    def reset_peak(self) -> None:
        self.peak_bytes = self.resident_bytes
        self.moved_bytes = {k: 0 for k in self.moved_bytes}

    def as_flat_dict(self) -> dict[str, int]:
        flat = {"activations/resident": self.resident_bytes, "activations/peak": self.peak_bytes}
        flat.update({f"activations/moved_{tier}": n for tier, n in self.moved_bytes.items()})
        return flat


class HeldTensor:
    """A saved tensor kept on its device and counted until backward takes it (or the graph drops it)."""

    __slots__ = ("tensor", "_accounting", "_key", "on_unpack")

    def __init__(self, t: torch.Tensor, accounting: SavedTensorAccounting, on_unpack: Any = None) -> None:
        self.tensor = t
        self._accounting = accounting
        self._key = storage_key(t)
        self.on_unpack = on_unpack
        accounting.hold(self._key, storage_bytes(t))

    def take(self) -> torch.Tensor:
        if self.on_unpack is not None:  # before the release: backward still uses the tensor while it reloads
            self.on_unpack()
        if self._key is not None:
            self._accounting.release(self._key)
            self._key = None
        return self.tensor

    def __del__(self) -> None:
        if getattr(self, "_key", None) is not None:
            self._accounting.release(self._key)


@contextmanager
def count_saved_tensors(accounting: SavedTensorAccounting) -> Iterator[SavedTensorAccounting]:
    """Count every non-parameter tensor saved for backward inside the block (regions with their own policy,
    such as memtrain's blocks, count themselves: the innermost saved-tensor hooks win)."""

    def pack(t: torch.Tensor) -> Any:
        if is_parameter_like(t) or t.layout != torch.strided:
            return t
        return HeldTensor(t, accounting)

    def unpack(obj: Any) -> torch.Tensor:
        return obj.take() if isinstance(obj, HeldTensor) else obj

    with torch.autograd.graph.saved_tensors_hooks(pack, unpack):
        yield accounting
