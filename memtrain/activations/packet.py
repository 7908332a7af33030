"""One block forward's swapped activations (a ``Packet``): moved out while forward runs, back before backward needs them.

Each distinct storage a block saves is a ``Slot``: its bytes are copied once into the block's host arena (views
of the same storage, such as q, k, v split from one projection, share the slot), and autograd keeps a small
``SavedRecord`` per saved tensor (dtype, size, stride, offset) instead of the tensor. Reloading rebuilds one
device storage per slot and every record as a view of it, so the values come back bit for bit.

On CUDA the copies run on a side stream: the device-to-host copy waits for the compute stream, the source
storage is kept alive until its event completes (a bounded number in flight), the reload is enqueued on the
side stream ahead of need and the compute stream waits for its event only when a record is unpacked. On a CPU
device the copies are plain host-to-host copies. The NVMe tier additionally writes each slot from the arena to
the block's file through ``SwapEngine`` when the block's forward ends, frees the arena once the writes are done,
and reads the file into a staging arena on reload.
"""
from __future__ import annotations

from collections import deque
from typing import Any

import torch

from memtrain.activations.arenas import Arena, ArenaPool, round_up
from memtrain.swap import aligned_empty
from memtrain.telemetry.saved_tensors import SavedTensorAccounting, storage_key

MIN_SPARE = 1 << 20  # the first spare buffer of a block seen for the first time (then doubling)


class Transfers:
    """What every packet shares: the tier, the host arenas, the side stream, the swap files, the accounting."""

    def __init__(self, tier: str, device: torch.device, accounting: SavedTensorAccounting, pool: ArenaPool,
                 engine: Any = None, folder: Any = None, max_in_flight: int = 1) -> None:
        self.tier = tier
        self.device = device
        self.cuda = device.type == "cuda"
        self.accounting = accounting
        self.pool = pool
        self.engine = engine
        self.folder = folder
        self.stream = torch.cuda.Stream(device) if self.cuda else None
        # Blocks whose device-to-host copies may still run: the previous block's copies overlap this block's
        # forward; closing a block waits for the ones before (its sources stay allocated until then).
        self.max_in_flight = max_in_flight
        self.in_flight: deque[tuple[Any, list[torch.Tensor], list[Any]]] = deque()  # (event, sources, keys)
        self.pending_writes: deque[Packet] = deque()
        self.max_pending_writes = 2  # NVMe: blocks whose arenas are still being written; more waits for the oldest
        self.copy_seconds = 0.0

    def release_sources(self) -> None:
        """Wait for the device-to-host copies in flight, then let their source storages go."""
        while self.in_flight:
            event, _sources, keys = self.in_flight.popleft()
            event.synchronize()
            for key in keys:
                self.accounting.release(key)

    def reap(self, block: bool = False) -> None:
        """Give back the arenas of finished NVMe writes (wait for all of them, and for the copies, if ``block``)."""
        if block:
            self.release_sources()
        while self.pending_writes and (block or self.pending_writes[0].writes_done()):
            self.pending_writes.popleft().finish_writes()


class Slot:
    __slots__ = ("offset", "nbytes", "padded", "host", "device", "records", "unpacked", "loaded_key", "ready")

    def __init__(self, offset: int, nbytes: int, padded: torch.Tensor) -> None:
        self.offset, self.nbytes = offset, nbytes
        self.padded: torch.Tensor | None = padded  # whole 4096-byte pages: what the NVMe tier writes and reads
        self.host: torch.Tensor | None = padded[:nbytes]
        self.device: torch.Tensor | None = None  # the reloaded storage, while records still need it
        self.records = 0
        self.unpacked = 0
        self.loaded_key: Any = None
        self.ready: Any = None  # CUDA event of the reload


class SavedRecord:
    """What autograd holds instead of a swapped tensor."""

    __slots__ = ("packet", "slot", "dtype", "size", "stride", "offset", "__weakref__")

    def __init__(self, packet: "Packet", slot: Slot, t: torch.Tensor) -> None:
        self.packet, self.slot = packet, slot
        self.dtype, self.size, self.stride, self.offset = t.dtype, t.size(), t.stride(), t.storage_offset()
        slot.records += 1
        packet.live += 1

    def __del__(self) -> None:
        packet = getattr(self, "packet", None)
        if packet is not None:
            packet.record_dropped()


class Packet:
    def __init__(self, transfers: Transfers, block: int, expected_bytes: int, file_index: int = 0,
                 on_release: Any = None) -> None:
        self.t = transfers
        self.block = block
        self.slots: dict[Any, Slot] = {}
        self.sources: list[torch.Tensor] = []  # storages being copied out, kept alive until their copy is done
        self.source_keys: list[Any] = []
        self.fill = 0
        self.live = 0
        self.closed = False  # the block's forward ended
        self.state = "out"  # out -> loading -> loaded
        self.writes: list[Any] = []
        self.reads: list[Any] = []
        self.on_release = on_release
        self.released = False
        self.spare: torch.Tensor | None = None  # where slots go that the arena has no room for
        self.spare_used = 0
        self.file = transfers.folder.file(f"activations-block{block}-{file_index}.bin") if transfers.tier == "nvme" else None
        if self.file is not None:  # NVMe: a few staging arenas shared by all blocks, freed as their writes finish
            transfers.reap()
            while len(transfers.pending_writes) >= transfers.max_pending_writes:
                transfers.pending_writes.popleft().finish_writes()
        self.arena: Arena | None = transfers.pool.acquire(expected_bytes, self._owner()) if expected_bytes else None

    def _owner(self) -> Any:
        """CPU tier: each block keeps its own arena (it holds the bytes until backward); NVMe: any free arena."""
        return "nvme" if self.file is not None else ("block", self.block)

    # -- forward ------------------------------------------------------------------------------------------
    def add(self, t: torch.Tensor) -> SavedRecord:
        key = storage_key(t)
        slot = self.slots.get(key)
        if slot is None:
            slot = self._move_out(t, key)
            self.slots[key] = slot
        return SavedRecord(self, slot, t)

    def _move_out(self, t: torch.Tensor, key: Any) -> Slot:
        storage = t.untyped_storage()
        nbytes = storage.nbytes()
        source = torch.empty(0, dtype=torch.uint8, device=t.device).set_(storage)
        offset = self.fill
        self.fill = round_up(offset + nbytes)
        if self.arena is not None and self.fill <= self.arena.capacity:
            padded = self.arena.buffer[offset : self.fill]
        else:  # first sight of any block (or this one grew): the arena is sized after
            padded = self._spare_space(self.fill - offset)
        host = padded[:nbytes]
        self.t.accounting.hold(key, nbytes)
        self.sources.append(source)
        self.source_keys.append(key)
        if self.t.cuda:
            stream = self.t.stream
            stream.wait_stream(torch.cuda.current_stream(t.device))
            with torch.cuda.stream(stream):
                host.copy_(source, non_blocking=True)
        else:
            host.copy_(source)
        self.t.accounting.moved(self.t.tier, nbytes)
        return Slot(offset, nbytes, padded)

    def _spare_space(self, nbytes: int) -> torch.Tensor:
        """``nbytes`` of a spare host buffer that doubles when full: a few allocations per block, not one per
        tensor (each would be a ``cudaHostAlloc`` on CUDA)."""
        if self.spare is None or self.spare_used + nbytes > self.spare.numel():
            grown = 2 * self.spare.numel() if self.spare is not None else MIN_SPARE
            self.spare, self.spare_used = aligned_empty(max(nbytes, grown), pin=self.t.cuda), 0
        start, self.spare_used = self.spare_used, self.spare_used + nbytes
        return self.spare[start : self.spare_used]

    def close(self) -> int:
        """The block's forward ended: let go of the sources once copied; NVMe: start the writes. Returns the
        arena size this block needs next time."""
        self.closed = True
        if self.t.cuda:
            event = torch.cuda.Event()
            event.record(self.t.stream)
            self.t.in_flight.append((event, self.sources, self.source_keys))
            while len(self.t.in_flight) > self.t.max_in_flight:
                event, _s, keys = self.t.in_flight.popleft()
                event.synchronize()
                for key in keys:
                    self.t.accounting.release(key)
        else:
            for key in self.source_keys:
                self.t.accounting.release(key)
        self.sources, self.source_keys = [], []
        if self.file is not None and self.slots:
            if self.t.cuda:
                self.t.in_flight[-1][0].synchronize()  # the arena holds the bytes before the file gets them
            for slot in self.slots.values():
                self.writes.append(self.t.engine.write(slot.padded, self.file, slot.offset))
            self.t.pending_writes.append(self)
        return self.fill

    def writes_done(self) -> bool:
        return all(h.done() for h in self.writes)

    def finish_writes(self) -> None:
        """NVMe: wait for the writes, then give the host arena back (the bytes live in the file now)."""
        for handle in self.writes:
            handle.wait()
        self.writes = []
        if self.state == "out":
            self._drop_host()

    def _drop_host(self) -> None:
        if self.arena is not None:
            self.t.pool.release(self.arena)
            self.arena = None
        for slot in self.slots.values():
            slot.host = slot.padded = None
        self.spare = None

    # -- backward -----------------------------------------------------------------------------------------
    def prefetch(self) -> None:
        """Start bringing every slot back (NVMe: the reads; then the copies to the device)."""
        if self.state != "out" or self.released:
            return
        self.state = "loading"
        if self.writes:  # NVMe, still writing: the arena still holds the bytes, reload from it
            for handle in self.writes:
                handle.wait()
            self.writes = []
            if self in self.t.pending_writes:
                self.t.pending_writes.remove(self)
        if self.file is not None and any(s.host is None for s in self.slots.values()):
            self.arena = self.t.pool.acquire(self.fill, self._owner())
            for slot in self.slots.values():
                slot.padded = self.arena.buffer[slot.offset : slot.offset + round_up(slot.nbytes)]
                slot.host = slot.padded[: slot.nbytes]
                self.reads.append(self.t.engine.read(slot.padded, self.file, slot.offset))
        if not self.reads:
            self._to_device()

    def _to_device(self) -> None:
        for handle in self.reads:
            handle.wait()
        self.reads = []
        last = None
        for slot in self.slots.values():
            if slot.device is not None or slot.unpacked >= slot.records:
                continue
            self._load_slot(slot)
            last = slot.ready
        if self.arena is not None:
            self.arena.reading_done = last
        self.state = "loaded"
        if self.file is not None:  # the file keeps the bytes; the host arena serves the next block
            self._drop_host()

    def _load_slot(self, slot: Slot) -> None:
        if slot.host is None:
            raise RuntimeError("an activation swapped to NVMe was unpacked twice (backward with retain_graph=True): "
                               "use activations.tier='cpu' or a keep / recompute policy for such graphs")
        device = self.t.device
        if self.t.cuda:
            dev = torch.empty(slot.nbytes, dtype=torch.uint8, device=device)  # on the compute stream
            stream = self.t.stream
            stream.wait_stream(torch.cuda.current_stream(device))
            with torch.cuda.stream(stream):
                dev.copy_(slot.host, non_blocking=True)
                slot.ready = torch.cuda.Event()
                slot.ready.record(stream)
        else:
            dev = slot.host.clone()
        slot.device = dev
        slot.loaded_key = storage_key(dev)
        self.t.accounting.hold(slot.loaded_key, slot.nbytes)

    def get(self, record: SavedRecord) -> torch.Tensor:
        slot = record.slot
        if slot.device is None:
            if self.state == "out":
                self.prefetch()
            if self.state == "loading":
                self._to_device()
            if slot.device is None:  # unpacked again after its storage was handed over (retain_graph)
                self._load_slot(slot)
        if slot.ready is not None:
            torch.cuda.current_stream(self.t.device).wait_event(slot.ready)
        dev = slot.device
        assert dev is not None
        out = torch.empty(0, dtype=record.dtype, device=dev.device)
        out.set_(dev.untyped_storage(), record.offset, record.size, record.stride)
        slot.unpacked += 1
        if slot.unpacked >= slot.records:  # backward holds every view now: stop counting, let go
            self.t.accounting.release(slot.loaded_key)
            slot.device, slot.loaded_key = None, None
        return out

    def record_dropped(self) -> None:
        self.live -= 1
        if self.live == 0 and self.closed:
            self.release()

    def release(self) -> None:
        if self.released:
            return
        self.released = True
        for handle in self.reads + self.writes:
            try:
                handle.wait()
            except RuntimeError:
                pass
        if self in self.t.pending_writes:
            self.t.pending_writes.remove(self)
        self.reads, self.writes = [], []
        for slot in self.slots.values():
            if slot.device is not None and slot.ready is not None:
                # Reloaded but never unpacked (a branch backward did not reach): the storage was allocated on the
                # compute stream and is being written on the side stream; the compute stream must not reuse it
                # before that copy is done.
                torch.cuda.current_stream(self.t.device).wait_event(slot.ready)
            if slot.loaded_key is not None:
                self.t.accounting.release(slot.loaded_key)
                slot.device, slot.loaded_key = None, None
        self._drop_host()
        if self.on_release is not None:
            self.on_release(self)
