"""``DeviceStaging``: the CPU optimizer's window onto parameters and gradients that live on a GPU.

For each tile the parameter and gradient slices are copied device->host into page-locked buffers on a copy
stream (ordered after the compute stream by an event), the CPU updates the host copies, and the parameter
slices go back host->device on the same stream. Buffers come from one pool allocated once; the copies of tile
i+1 are issued before tile i is computed, so they overlap the CPU update (and the file I/O of the state tiles),
and a buffer is reused only after its host->device copy has finished.
"""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass

import torch

from memtrain.swap import HostBufferPool

FLOAT_BYTES = 4


@dataclass
class Staged:
    index: int  # pool buffer
    params: list[torch.Tensor]  # host copies of the device slices, in segment order
    grads: list[torch.Tensor]
    targets: list[torch.Tensor]  # the device parameter slices to write back
    ready: torch.cuda.Event


class DeviceStaging:
    def __init__(self, tile_elems: int, device: torch.device, buffers: int = 3) -> None:
        self.tile_elems = tile_elems
        self.pool = HostBufferPool(2 * tile_elems * FLOAT_BYTES, buffers, pin=True)
        self.stream = torch.cuda.Stream(device)
        self._returning: deque[tuple[int, torch.cuda.Event]] = deque()

    def fetch(self, segments: list[tuple[torch.Tensor, torch.Tensor]]) -> Staged:
        """Start copying (device param slice, device grad slice) pairs to the host; at most a tile in total."""
        index, buf = self._acquire()
        floats = buf.view(torch.float32)
        params, grads, targets, at = [], [], [], 0
        after_compute = torch.cuda.current_stream().record_event()
        with torch.cuda.stream(self.stream):
            self.stream.wait_event(after_compute)
            for param, grad in segments:
                n = param.numel()
                host_p = floats[at : at + n]
                host_g = floats[self.tile_elems + at : self.tile_elems + at + n]
                host_p.copy_(param, non_blocking=True)
                host_g.copy_(grad, non_blocking=True)
                params.append(host_p)
                grads.append(host_g)
                targets.append(param)
                at += n
            ready = self.stream.record_event()
        return Staged(index, params, grads, targets, ready)

    def wait(self, staged: Staged) -> None:
        staged.ready.synchronize()

    def put_back(self, staged: Staged) -> None:
        """Copy the updated host parameters back to the device; the buffer is reused once that is done."""
        with torch.cuda.stream(self.stream):
            for host, target in zip(staged.params, staged.targets):
                target.copy_(host, non_blocking=True)
            done = self.stream.record_event()
        # The compute stream must see the new values before the next forward reads them.
        torch.cuda.current_stream().wait_event(done)
        self._returning.append((staged.index, done))

    def _acquire(self) -> tuple[int, torch.Tensor]:
        while self.pool.free == 0 and self._returning:
            index, done = self._returning.popleft()
            done.synchronize()
            self.pool.release(index)
        return self.pool.acquire()

    def finish(self) -> None:
        while self._returning:
            index, done = self._returning.popleft()
            done.synchronize()
            self.pool.release(index)
