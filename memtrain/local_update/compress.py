"""The replicas' mean of a flat fp32 vector, optionally compressed on the wire (bf16; int8 with per-block scales).

Runs on the background thread (or inline in synchronous mode) over the replica group's own process group.
bf16 halves the bytes and sums in bf16 across replicas; int8 quarters them: each replica sends its blocks
quantized with one fp32 scale per ``block`` elements (max |x| / 127), every replica gathers all of them and
averages the dequantized values in fp32. Rounding error is not fed back into the next round.
"""
from __future__ import annotations

import torch
import torch.distributed as dist


class ReplicaMean:
    def __init__(self, group: dist.ProcessGroup, compression: str = "none", block: int = 2048) -> None:
        self.group = group
        self.size = dist.get_world_size(group)
        self.compression = compression
        self.block = block

    def wire_bytes(self, numel: int) -> int:
        """Bytes one replica puts on the wire per round (payload, before the collective's own factor)."""
        if self.compression == "bfloat16":
            return 2 * numel
        if self.compression == "int8":
            return numel + 4 * -(-numel // self.block)
        return 4 * numel

    @torch.no_grad()
    def __call__(self, flat: torch.Tensor) -> torch.Tensor:
        """A new fp32 tensor holding the mean over the group; ``flat`` is only read."""
        if self.compression == "bfloat16":
            wire = flat.to(torch.bfloat16)
            dist.all_reduce(wire, group=self.group)
            return wire.float().div_(self.size)
        if self.compression == "int8":
            return self._int8_mean(flat)
        out = flat.clone()
        dist.all_reduce(out, group=self.group)
        return out.div_(self.size)

    def _int8_mean(self, flat: torch.Tensor) -> torch.Tensor:
        q, scales = quantize_int8(flat, self.block)
        qs = [torch.empty_like(q) for _ in range(self.size)]
        ss = [torch.empty_like(scales) for _ in range(self.size)]
        dist.all_gather(qs, q, group=self.group)
        dist.all_gather(ss, scales, group=self.group)
        total = torch.zeros_like(flat)
        for qi, si in zip(qs, ss):
            total.add_(dequantize_int8(qi, si, flat.numel(), self.block))
        return total.div_(self.size)


def quantize_int8(flat: torch.Tensor, block: int) -> tuple[torch.Tensor, torch.Tensor]:
    n = flat.numel()
    padded = torch.nn.functional.pad(flat, (0, -n % block)).view(-1, block)
    scales = padded.abs().amax(dim=1).div_(127.0).clamp_(min=torch.finfo(torch.float32).tiny)
    q = torch.round(padded / scales[:, None]).clamp_(-127, 127).to(torch.int8)
    return q.view(-1), scales


def dequantize_int8(q: torch.Tensor, scales: torch.Tensor, numel: int, block: int) -> torch.Tensor:
    return (q.view(-1, block).float() * scales[:, None]).view(-1)[:numel]
