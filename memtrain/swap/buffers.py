"""Host buffers for the swap pipeline: allocated once, aligned for O_DIRECT, page-locked where CUDA is present.

Pinning per tensor (``pin_memory()`` on each one) costs a driver call and a synchronization every time; the
pool pins a fixed set once and hands them out again and again, within a byte budget it never exceeds.
"""
from __future__ import annotations

import threading
from collections import deque

import torch

ALIGN = 4096


def aligned_empty(nbytes: int, pin: bool = False) -> torch.Tensor:
    """A uint8 host tensor of ``nbytes`` whose address is a multiple of 4096 (usable with O_DIRECT)."""
    if pin:
        # cudaHostAlloc returns page-aligned memory; round the size up so whole pages are transferred.
        return torch.empty(-(-nbytes // ALIGN) * ALIGN, dtype=torch.uint8, pin_memory=True)[:nbytes]
    raw = torch.empty(nbytes + ALIGN, dtype=torch.uint8)
    shift = (-raw.data_ptr()) % ALIGN
    return raw[shift : shift + nbytes]


def pinned_footprint(nbytes: int) -> int:
    """What torch's pinned allocator locks for ``nbytes``: it rounds each block up to a power of two."""
    return 1 << (nbytes - 1).bit_length()


class HostBufferPool:
    """``count`` buffers of ``buffer_bytes`` each; ``acquire`` blocks until one is free (or times out).

    ``total_bytes`` is the host memory the pool holds: for pinned buffers, what the pinned allocator locks.
    """

    def __init__(self, buffer_bytes: int, count: int, pin: bool | None = None,
                 budget_bytes: int | None = None) -> None:
        if buffer_bytes < 1 or count < 1:
            raise ValueError(f"buffer_bytes ({buffer_bytes}) and count ({count}) must be positive")
        buffer_bytes = -(-buffer_bytes // ALIGN) * ALIGN  # whole pages, so O_DIRECT works on every buffer
        self.pin = torch.cuda.is_available() if pin is None else pin
        # torch's pinned allocator rounds each block up to a power of two: count what it really locks.
        footprint = pinned_footprint(buffer_bytes) if self.pin else buffer_bytes
        total = footprint * count
        if budget_bytes is not None and total > budget_bytes:
            raise ValueError(
                f"{count} swap buffers of {buffer_bytes / 2**20:.1f} MiB need {total / 2**20:.1f} MiB of host memory, "
                f"more than the host budget of {budget_bytes / 2**20:.1f} MiB: lower the buffer count or size, "
                "or raise the budget (pinned buffers cost their size rounded up to a power of two)"
            )
        self.buffer_bytes = buffer_bytes
        self.total_bytes = total
        self._buffers = [aligned_empty(buffer_bytes, self.pin) for _ in range(count)]
        self._free = deque(range(count))
        self._cv = threading.Condition()

    def acquire(self, timeout: float | None = None) -> tuple[int, torch.Tensor]:
        """(index, buffer); give the index back to ``release`` once every copy into or out of it is done."""
        with self._cv:
            if not self._cv.wait_for(lambda: bool(self._free), timeout=timeout):
                raise TimeoutError(f"no free swap buffer within {timeout} s (all {len(self._buffers)} in use)")
            index = self._free.popleft()
        return index, self._buffers[index]

    def release(self, index: int) -> None:
        with self._cv:
            if index in self._free or not 0 <= index < len(self._buffers):
                raise ValueError(f"swap buffer {index} is not in use")
            self._free.append(index)
            self._cv.notify()

    @property
    def free(self) -> int:
        with self._cv:
            return len(self._free)
