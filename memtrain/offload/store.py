"""``StateStore``: fp32 optimizer-state tensors kept off the device, in host memory and/or NVMe files.

The state of each *unit* (a block's parameters, in order) is one contiguous range per key (``exp_avg``,
``exp_avg_sq``), starting at a 4096-byte boundary so every tile can move with O_DIRECT. The first units, up to
``cpu_fraction`` of the bytes, live in host tensors allocated once; the rest live in one file per key in the
run's swap folder. ``tiles(unit)`` walks a unit tile by tile: the next tiles are read while the caller
computes on the current one, and finished tiles are written back behind it, through one pool of host buffers
that is allocated once and never grows.
"""
from __future__ import annotations

import os
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from memtrain.swap import HostBufferPool, SwapEngine, SwapHandle

FLOAT_BYTES = 4
ELEMS_ALIGN = 4096 // FLOAT_BYTES  # a unit and a tile start on a 4096-byte boundary


def _round_up(n: int, to: int = ELEMS_ALIGN) -> int:
    return -(-n // to) * to


@dataclass
class UnitRange:
    numel: int
    tier: str  # "cpu" or "nvme"
    offset: int  # element offset inside its tier's tensors / files


@dataclass
class Tile:
    start: int  # element offset inside the unit
    numel: int
    tensors: dict[str, torch.Tensor]  # key -> fp32 view of ``numel`` elements, updated in place


def plan_tiers(numels: list[int], cpu_fraction: float) -> list[UnitRange]:
    """The first units whose padded bytes fit in ``cpu_fraction`` of the total go to host memory."""
    padded = [_round_up(n) for n in numels]
    cpu_budget = cpu_fraction * sum(padded)
    ranges, used, nvme_offset, cpu_open = [], 0, 0, True
    for n, p in zip(numels, padded):
        if cpu_open and used + p <= cpu_budget:
            ranges.append(UnitRange(n, "cpu", used))
            used += p
        else:
            cpu_open = False  # keep the host part one prefix, so it is one tensor per key
            ranges.append(UnitRange(n, "nvme", nvme_offset))
            nvme_offset += p
    return ranges


class StateStore:
    def __init__(self, keys: tuple[str, ...], numels: list[int], cpu_fraction: float, tile_bytes: int,
                 folder: Path | None = None, engine: SwapEngine | None = None, prefetch_tiles: int = 1) -> None:
        self.keys = keys
        self.units = plan_tiers(numels, cpu_fraction)
        self.tile_elems = self.tile_elems_for(self.units, tile_bytes)  # NVMe tiles: what the buffers hold
        # Host-tier tiles need no buffer: as large as configured (many tiny kernel calls would be slow).
        self.host_tile_elems = max(ELEMS_ALIGN, tile_bytes // FLOAT_BYTES // ELEMS_ALIGN * ELEMS_ALIGN)
        self.max_tile_elems = max(self.tile_elems, self.host_tile_elems)
        self.prefetch_tiles = prefetch_tiles
        cpu_elems = sum(_round_up(u.numel) for u in self.units if u.tier == "cpu")
        nvme_elems = sum(_round_up(u.numel) for u in self.units if u.tier == "nvme")
        self.host = {k: torch.zeros(cpu_elems, dtype=torch.float32) for k in keys}
        self.files: dict[str, Path] = {}
        self.pool: HostBufferPool | None = None
        self.engine = engine
        if nvme_elems:
            if folder is None or engine is None:
                raise ValueError("NVMe-tier units need a swap folder and a swap engine")
            for key in keys:
                path = folder / f"optimizer-{key}.bin"
                with open(path, "wb") as f:  # sparse zeros: a fresh state reads as 0
                    f.truncate(nvme_elems * FLOAT_BYTES)
                self.files[key] = path
            # One tile being computed, ``prefetch_tiles`` being read, one being written back.
            self.pool = HostBufferPool(len(keys) * self.tile_elems * FLOAT_BYTES, prefetch_tiles + 2)
        self._writebacks: deque[tuple[int, list[SwapHandle]]] = deque()
        self._maps: dict[str, torch.Tensor] = {}

    # -- sizes, for the host budget and telemetry ------------------------------------------------------------
    @property
    def nvme_bytes(self) -> int:
        return sum(os.path.getsize(p) for p in self.files.values())

    def state_bytes(self) -> dict[str, int]:
        """Bytes of optimizer state per tier (the swap buffers are not state)."""
        host = sum(t.numel() * FLOAT_BYTES for t in self.host.values())
        return {"host": host, "nvme": self.nvme_bytes}

    @staticmethod
    def tile_elems_for(units: list[UnitRange], tile_bytes: int) -> int:
        """The configured tile, aligned, and no larger than the largest unit on NVMe needs."""
        tile = max(ELEMS_ALIGN, tile_bytes // FLOAT_BYTES // ELEMS_ALIGN * ELEMS_ALIGN)
        largest = max((_round_up(u.numel) for u in units if u.tier == "nvme"), default=ELEMS_ALIGN)
        return min(tile, largest)

    @classmethod
    def pool_bytes(cls, n_keys: int, units: list[UnitRange], tile_bytes: int, prefetch_tiles: int = 1) -> int:
        return n_keys * cls.tile_elems_for(units, tile_bytes) * FLOAT_BYTES * (prefetch_tiles + 2)

    # -- tile walk -------------------------------------------------------------------------------------------
    def tiles(self, unit: int) -> Iterator[Tile]:
        """Yield the unit's tiles in order; whatever the caller writes into a tile is stored when it moves on."""
        u = self.units[unit]
        spans = self.spans(unit)
        if u.tier == "cpu":
            for start, numel in spans:
                at = u.offset + start
                yield Tile(start, numel, {k: self.host[k][at : at + numel] for k in self.keys})
            return
        reads: deque[tuple[int, int, int, dict[str, torch.Tensor], list[SwapHandle]]] = deque()
        next_span = 0
        try:
            for _ in spans:
                while next_span < len(spans) and len(reads) <= self.prefetch_tiles:
                    reads.append(self._read(u, *spans[next_span]))
                    next_span += 1
                start, numel, index, views, handles = reads.popleft()
                for handle in handles:
                    handle.wait()
                yield Tile(start, numel, views)
                self._write(u, start, numel, index)
        finally:
            for *_, index, _views, handles in reads:  # the walk stopped early (an error): drain, give back
                for handle in handles:
                    try:
                        handle.wait()
                    except RuntimeError:
                        pass
                assert self.pool is not None
                self.pool.release(index)

    def spans(self, unit: int) -> list[tuple[int, int]]:
        """(start, numel) of each tile ``tiles(unit)`` yields, in order."""
        u = self.units[unit]
        size = self.host_tile_elems if u.tier == "cpu" else self.tile_elems
        return [(s, min(size, u.numel - s)) for s in range(0, u.numel, size)]

    def flush(self) -> None:
        """Wait for every write-back; raises (naming the file) if one failed."""
        while self._writebacks:
            self._reap_oldest()

    def _read(self, u: UnitRange, start: int, numel: int):
        index, buf = self._acquire()
        nbytes = _round_up(numel) * FLOAT_BYTES
        offset = (u.offset + start) * FLOAT_BYTES
        views, handles = {}, []
        for j, key in enumerate(self.keys):
            region = buf[j * self.tile_elems * FLOAT_BYTES :][:nbytes]
            handles.append(self.engine.read(region, self.files[key], offset))  # type: ignore[union-attr]
            views[key] = region.view(torch.float32)[:numel]
        return start, numel, index, views, handles

    def _write(self, u: UnitRange, start: int, numel: int, index: int) -> None:
        assert self.pool is not None and self.engine is not None
        buf = self.pool._buffers[index]
        nbytes = _round_up(numel) * FLOAT_BYTES
        offset = (u.offset + start) * FLOAT_BYTES
        handles = [
            self.engine.write(buf[j * self.tile_elems * FLOAT_BYTES :][:nbytes], self.files[key], offset)
            for j, key in enumerate(self.keys)
        ]
        self._writebacks.append((index, handles))

    def _acquire(self) -> tuple[int, torch.Tensor]:
        assert self.pool is not None
        while self.pool.free == 0 and self._writebacks:
            self._reap_oldest()
        return self.pool.acquire()

    def _reap_oldest(self) -> None:
        assert self.pool is not None
        index, handles = self._writebacks.popleft()
        try:
            for handle in handles:
                handle.wait()
        finally:
            self.pool.release(index)

    # -- whole-state views, for checkpoints ---------------------------------------------------------------------
    def unit_views(self, unit: int) -> dict[str, torch.Tensor]:
        """Each key's whole range of ``unit`` as a tensor: host memory, or a shared mapping of the file (the page
        cache, not this process's heap; what is written into it reaches the file, which later reads see)."""
        self.flush()
        u = self.units[unit]
        if u.tier == "cpu":
            return {k: self.host[k][u.offset : u.offset + u.numel] for k in self.keys}
        return {key: whole[u.offset : u.offset + u.numel] for key, whole in self._mapped().items()}

    def mapped_files(self) -> list[tuple[torch.Tensor, Path]]:
        """Each NVMe file and its shared mapping (what unit_views of NVMe units are views of)."""
        return [(mapping, self.files[key]) for key, mapping in self._mapped().items()] if self.files else []

    def _mapped(self) -> dict[str, torch.Tensor]:
        """One shared mapping per file, made on first use (untouched, it holds no memory)."""
        if not self._maps:
            for key, path in self.files.items():
                self._maps[key] = torch.from_file(str(path), shared=True,
                                                  size=os.path.getsize(path) // FLOAT_BYTES, dtype=torch.float32)
        return self._maps
