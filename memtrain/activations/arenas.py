"""Host arenas for swapped activations: one aligned host buffer per block forward, allocated once and reused.

A block's saved storages are packed one after another into an arena, each at a 4096-byte boundary (so the NVMe
tier can move each with O_DIRECT). An arena is sized by what that block saved the last time (a block not seen
yet: by the largest block seen; the very first block of the run fills a spare buffer that doubles as it goes,
see ``Packet``); the pool hands the same arena back to the same block every step, so after the first step
nothing is allocated. Arenas are page-locked where the compute device is CUDA (one ``cudaHostAlloc`` per arena,
never per tensor).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from memtrain.swap import aligned_empty
from memtrain.swap.buffers import ALIGN, pinned_footprint


def round_up(n: int, to: int = ALIGN) -> int:
    return -(-n // to) * to


@dataclass(eq=False)  # identity: two arenas are never the same one
class Arena:
    buffer: torch.Tensor  # uint8, 4096-aligned
    owner: Any = None
    busy: bool = False
    reading_done: Any = None  # a CUDA event: the last device copy that read from this arena

    @property
    def capacity(self) -> int:
        return self.buffer.numel()


@dataclass
class ArenaPool:
    """``acquire(nbytes, owner)``: a free arena of that owner (or any) with room, else a new one."""

    pin: bool
    arenas: list[Arena] = field(default_factory=list)
    allocations: int = 0  # arenas allocated over the run: stays flat once every block has been seen

    def acquire(self, nbytes: int, owner: Any) -> Arena:
        nbytes = max(round_up(nbytes), ALIGN)
        if self.pin:  # the pinned allocator locks a power of two anyway: use it all, and count what is locked
            nbytes = pinned_footprint(nbytes)
        free = [a for a in self.arenas if not a.busy and a.capacity >= nbytes]
        mine = [a for a in free if a.owner == owner]
        pick = (mine or free or [None])[0]
        if pick is None:
            stale = [a for a in self.arenas if not a.busy and a.owner == owner]
            for a in stale:  # this block grew: its smaller arena is replaced, not kept beside the new one
                self.arenas.remove(a)
            pick = Arena(aligned_empty(nbytes, pin=self.pin), owner)
            self.arenas.append(pick)
            self.allocations += 1
        if pick.reading_done is not None:
            pick.reading_done.synchronize()  # a reload from the last step may still be reading it
            pick.reading_done = None
        pick.busy, pick.owner = True, owner
        return pick

    def release(self, arena: Arena) -> None:
        arena.busy = False

    def drop(self, owner: Any) -> None:
        """Free ``owner``'s idle arenas (a block that no longer swaps). Pinned ones go back from torch's pinned
        cache too, so the page-locked memory is really given up."""
        idle = [a for a in self.arenas if a.owner == owner and not a.busy]
        for arena in idle:
            if arena.reading_done is not None:
                arena.reading_done.synchronize()
            self.arenas.remove(arena)
        if idle and self.pin:
            empty = getattr(getattr(torch, "accelerator", None), "empty_host_cache", None)
            if empty is not None:
                empty()

    @property
    def total_bytes(self) -> int:
        return sum(a.capacity for a in self.arenas)
