"""This rank's pieces of the model's parameters, seen as one flat fp32 vector.

Replicas of one shard position hold parameter pieces of identical shapes (stages 0-1: whole parameters;
hybrid stages 2-3: the same FSDP2 shard of every parameter), so the flat vectors of a replica group line up
element by element and can be averaged with one collective.
"""
from __future__ import annotations

import torch
import torch.nn as nn
from torch.distributed.tensor import DTensor


def local_tensor(t: torch.Tensor) -> torch.Tensor:
    return t._local_tensor if isinstance(t, DTensor) else t


class FlatParams:
    def __init__(self, model: nn.Module) -> None:
        self.names = [n for n, p in model.named_parameters() if p.requires_grad]
        self.params = [p for p in model.parameters() if p.requires_grad]
        if not self.params:
            raise ValueError("local updates need a model with trainable parameters")
        self.locals = [local_tensor(p.data) for p in self.params]
        sizes = [t.numel() for t in self.locals]
        self.offsets = [sum(sizes[:i]) for i in range(len(sizes))]
        self.sizes = sizes
        self.numel = sum(sizes)
        self.tensor_numels = [p.numel() for p in self.params]  # whole tensors (a DTensor's global size)
        self.device = self.locals[0].device
        self.all_fp32 = all(t.dtype == torch.float32 for t in self.locals)

    @property
    def segments(self) -> list[tuple[int, int]]:
        """(offset, numel) of every parameter piece: the per-tensor (layer-wise) units of the outer step."""
        return list(zip(self.offsets, self.sizes))

    def empty(self, device: torch.device | None = None) -> torch.Tensor:
        return torch.empty(self.numel, dtype=torch.float32, device=device or self.device)

    @torch.no_grad()
    def read(self, out: torch.Tensor | None = None) -> torch.Tensor:
        """A copy of the live parameters (fp32): later local steps never change it."""
        out = self.empty() if out is None else out
        for t, o, n in zip(self.locals, self.offsets, self.sizes):
            out[o : o + n].copy_(t.reshape(-1))
        return out

    @torch.no_grad()
    def write(self, flat: torch.Tensor) -> None:
        for t, o, n in zip(self.locals, self.offsets, self.sizes):
            t.copy_(flat[o : o + n].view_as(t))
