"""Snapshot slots: shared-memory segments holding one rank's training state at one step.

A slot is ``[header | tensor bytes (the layout) | pickled skeleton and per-rank values]``. The header is written
last: a slot reads as complete only after every byte of its step is in place, so a trainer killed mid-copy
leaves a slot that reads as empty, never a torn one. Slots come from the node's keeper (they outlive the
trainer) or, with ``checkpoint.keeper=false``, from the trainer's own memory.
"""
from __future__ import annotations

import mmap
import pickle
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from memtrain.checkpoint.keeper import KeeperClient

HEADER_BYTES = 4096
_MAGIC = b"MTSNAP01"
_HEADER = struct.Struct("<8sIIqQQI32s")  # magic, state, reserved, step, data bytes, blob bytes, blob crc, digest
_EMPTY, _WRITING, _COMPLETE = 0, 1, 2


@dataclass(frozen=True)
class SlotHeader:
    step: int
    data_bytes: int
    blob_bytes: int
    blob_crc: int
    digest: str


def segment_size(data_bytes: int, blob_bytes: int) -> int:
    """Room for the data and twice the current blob (the per-rank values grow little), in whole pages."""
    size = HEADER_BYTES + data_bytes + max(1 << 20, 2 * blob_bytes)
    return -(-size // 4096) * 4096


class Slot:
    def __init__(self, name: str, buffer: mmap.mmap) -> None:
        self.name = name
        self.buffer = buffer
        self.flat = torch.frombuffer(buffer, dtype=torch.uint8)  # the whole segment, shared with the keeper
        self.size = len(buffer)

    def data(self, data_bytes: int) -> torch.Tensor:
        return self.flat[HEADER_BYTES:HEADER_BYTES + data_bytes]

    def payload(self, data_bytes: int, blob_bytes: int) -> torch.Tensor:
        """Data and blob: what a replica copies."""
        return self.flat[HEADER_BYTES:HEADER_BYTES + data_bytes + blob_bytes]

    def fits(self, data_bytes: int, blob_bytes: int) -> bool:
        return HEADER_BYTES + data_bytes + blob_bytes <= self.size

    def header(self) -> SlotHeader | None:
        """The committed step held here, or None (empty, or being written)."""
        magic, state, _, step, data_bytes, blob_bytes, crc, digest = _HEADER.unpack_from(self.buffer, 0)
        if magic != _MAGIC or state != _COMPLETE:
            return None
        return SlotHeader(step, data_bytes, blob_bytes, crc, digest.decode())

    def begin_write(self) -> None:
        struct.pack_into("<8sI", self.buffer, 0, _MAGIC, _WRITING)

    def write_blob(self, data_bytes: int, blob: bytes) -> int:
        start = HEADER_BYTES + data_bytes
        self.buffer[start:start + len(blob)] = blob
        return zlib.crc32(blob)

    def commit(self, step: int, data_bytes: int, blob_bytes: int, blob_crc: int, digest: str) -> None:
        """Mark complete; the state word goes last (a reader sees the step only once the rest is written)."""
        _HEADER.pack_into(self.buffer, 0, _MAGIC, _WRITING, 0, step, data_bytes, blob_bytes, blob_crc,
                          digest.encode())
        struct.pack_into("<I", self.buffer, 8, _COMPLETE)

    def blob(self, header: SlotHeader) -> Any:
        start = HEADER_BYTES + header.data_bytes
        raw = bytes(self.buffer[start:start + header.blob_bytes])
        if zlib.crc32(raw) != header.blob_crc:
            raise ValueError(f"snapshot slot {self.name}: its per-rank values fail their checksum")
        return pickle.loads(raw)


class SlotStore:
    """Opens slots by name: from the node's keeper, or (no keeper) in this process's memory."""

    def __init__(self, keeper: KeeperClient | None, pin: bool = False) -> None:
        self.keeper = keeper
        self.pin = pin  # page-lock segments so device-to-host copies run asynchronously
        self._local: dict[str, mmap.mmap] = {}
        self._open: dict[str, Slot] = {}
        self._registered: set[tuple[int, int]] = set()  # (pointer, bytes) page-locked by us: unregistered once

    @property
    def _pinning(self) -> bool:
        return self.pin and torch.cuda.is_available()

    def _register(self, slot: Slot) -> None:
        """Page-lock every slot we hand out (found ones too: a restored slot is reused for the next snapshots)."""
        key = (slot.flat.data_ptr(), slot.size)
        if not self._pinning or key in self._registered:
            return
        # Portable, as torch's own pin_memory: pinned for every device's context, not only the current one.
        code = int(torch.cuda.cudart().cudaHostRegister(key[0], key[1], 1))
        if code != 0:
            raise RuntimeError(f"page-locking snapshot slot {slot.name} ({slot.size} bytes) failed with cudaError "
                               f"{code} (it may be an earlier asynchronous error; CUDA_LAUNCH_BLOCKING=1 tells)")
        self._registered.add(key)

    def _release(self, slot: Slot) -> int:
        """Unregister ``slot`` if we registered it (before its mapping can go); the cudaError, 0 on success."""
        key = (slot.flat.data_ptr(), slot.size)
        if key not in self._registered:
            return 0  # never registered: unregistering would fail and leave an error for a later CUDA call
        self._registered.discard(key)
        return int(torch.cuda.cudart().cudaHostUnregister(key[0]))

    def _release_all(self) -> None:
        failed = [(slot.name, code) for slot in self._open.values() if (code := self._release(slot))]
        self._open.clear()  # the mappings go with the last tensor that views them
        if failed:
            raise RuntimeError(f"unregistering page-locked snapshot slots failed (name, cudaError): {failed}")

    def ensure_keeper(self, rank: int) -> bool:
        """Reconnect (starting a new keeper) when ours died; True if it did. Its memory died with it: every slot
        is opened afresh, and the next snapshot refills it."""
        if self.keeper is None or self.keeper.alive():
            return False
        self.keeper.reconnect()
        self.keeper.claim(rank)
        self._release_all()
        return True

    def open(self, name: str, size: int) -> tuple[Slot, bool]:
        """A slot of at least ``size`` bytes; True when it is new (empty)."""
        slot = self._open.get(name)
        if slot is not None and slot.size >= size:
            return slot, False
        if slot is not None:  # too small: replaced by a bigger segment below
            del self._open[name]
            if code := self._release(slot):
                raise RuntimeError(f"unregistering page-locked snapshot slot {name} failed with cudaError {code}")
        if self.keeper is not None:
            buffer, created = self.keeper.open(name, size)
        else:
            buffer, created = mmap.mmap(-1, size), True
            self._local[name] = buffer
        slot = Slot(name, buffer)
        self._register(slot)
        self._open[name] = slot
        return slot, created

    def find(self, name: str) -> Slot | None:
        """An existing slot (for recovery), or None."""
        if name in self._open:
            return self._open[name]
        if self.keeper is None:
            return None
        buffer = self.keeper.get(name)
        if buffer is None:
            return None
        slot = Slot(name, buffer)
        self._register(slot)
        self._open[name] = slot
        return slot

    def host_bytes(self) -> dict[str, int]:
        """Bytes of the slots this trainer has open, by tier (page-locked when registered for device copies)."""
        tier = "host_pinned" if self._pinning else "host"
        return {tier: sum(slot.size for slot in self._open.values())}

    def committed(self, names: list[str]) -> dict[int, Slot]:
        """The complete slots among ``names``, by the step they hold."""
        out = {}
        for name in names:
            slot = self.find(name)
            header = None if slot is None else slot.header()
            if header is not None:
                out[header.step] = slot
        return out

    def open_oldest(self, names: list[str], size: int) -> Slot:
        """Of alternating slots, the one not holding the newest complete step (empty ones first)."""
        held = {slot.name: step for step, slot in self.committed(names).items()}
        slot, _ = self.open(min(names, key=lambda n: held.get(n, -1)), size)
        return slot

    def names(self, prefix: str) -> list[str]:
        if self.keeper is None:
            return sorted(n for n in self._open if n.startswith(prefix))
        return sorted(self.keeper.list(prefix))

    def close(self, drop_prefix: str | None = None) -> None:
        try:
            self._release_all()
        finally:
            if self.keeper is not None:
                if drop_prefix is not None:
                    self.keeper.drop(drop_prefix)
                self.keeper.close()


def keeper_store(socket: Path, idle_timeout: float, pin: bool) -> SlotStore:
    return SlotStore(KeeperClient(socket, idle_timeout), pin)
