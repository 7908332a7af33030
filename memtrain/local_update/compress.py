"""The replicas' mean of a flat fp32 vector, optionally compressed on the wire (bf16; int8 with per-block scales).

Runs on the background thread (or inline in synchronous mode) over the replica group's own process group.
bf16 halves the bytes and sums in bf16 across replicas; int8 quarters them: each replica sends its blocks
quantized with one fp32 scale per ``block`` elements (max |x| / 127), every replica gathers all of them and
averages the dequantized values in fp32. Rounding error is not fed back into the next round.
``owned_mean`` is the reduce-scatter form (outer state sharded, ``sharded.py``): each replica gets only the
mean of its own slice; int8 then sends each owner just its slice's blocks (all-to-all) instead of all of them.
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

    @torch.no_grad()
    def owned_mean(self, padded: torch.Tensor) -> torch.Tensor:
        """The mean over the group of this rank's 1/size slice of ``padded`` (only read; for int8 its slices must
        be whole blocks). Sums in the same rank order as ``__call__`` for int8."""
        chunk = padded.numel() // self.size
        if self.compression == "int8":
            q, scales = quantize_int8(padded, self.block)
            q_in, s_in = torch.empty_like(q), torch.empty_like(scales)
            dist.all_to_all_single(q_in, q, group=self.group)
            dist.all_to_all_single(s_in, scales, group=self.group)
            total = torch.zeros(chunk, dtype=torch.float32, device=padded.device)
            for qi, si in zip(q_in.chunk(self.size), s_in.chunk(self.size)):
                total.add_(dequantize_int8(qi, si, chunk, self.block))
            return total.div_(self.size)
        wire = padded.to(torch.bfloat16) if self.compression == "bfloat16" else padded
        out = torch.empty(chunk, dtype=wire.dtype, device=padded.device)
        dist.reduce_scatter_single(out, wire, group=self.group)
        return out.float().div_(self.size)

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
