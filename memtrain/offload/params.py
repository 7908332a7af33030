"""Stage 3 parameter shards on NVMe: resident only while their block gathers them or updates them.

Each FSDP2 parameter group (a block, or the root) is one unit: its parameters' padded local shards laid end
to end in one file region. Resident, a unit's shards are views into one host buffer of a pool allocated once
(page-locked where CUDA is present, so FSDP2's host->device copy needs no staging); evicted, they are views of
a shared mapping of the swap file: no heap memory, yet whoever reads them outside a step (a state dict, an
evaluation, the user) reads the right values through the page cache, and what is written there reaches the
file. FSDP2 finds the data where it always looks
(``FSDPParam._sharded_param_data`` and the sharded parameter's local tensor): the unit is made resident
before the group's ``unshard`` and released after its ``wait_for_unshard`` (forward), or after its update
(backward, when the optimizer steps blocks during backward). The order in which units are gathered is
recorded in the first step; from then on the next ``prefetch`` units are read ahead of use.
"""
from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch.distributed.fsdp._fully_shard._fsdp_common import TrainingState

from memtrain.offload.views import dtensor_like
from memtrain.swap import HostBufferPool, SwapEngine, SwapHandle

ALIGN = 4096


def _round_up(n: int, to: int = ALIGN) -> int:
    return -(-n // to) * to


@dataclass
class ParamUnit:
    index: int
    name: str
    group: Any  # FSDPParamGroup
    offsets: list[int]  # byte offset of each FSDPParam's padded shard inside the unit
    nbytes: int  # padded to 4096
    file_offset: int
    buffer: int | None = None  # pool index while resident
    reading: list[SwapHandle] = field(default_factory=list)
    users: int = 0  # gathers / updates that need it resident
    dirty: bool = False
    gathering: bool = False  # between FSDP2's unshard and its wait_for_unshard
    held_for_update: bool = False  # gathered in backward, kept for its update
    ready: threading.Event = field(default_factory=threading.Event)  # set once the read is done and in place
    read_error: BaseException | None = None


class ParamOffload:
    def __init__(self, groups: list[tuple[str, Any]], folder: Path, engine: SwapEngine, prefetch: int,
                 keep_for_update: bool, pin: bool) -> None:
        self.engine = engine
        self.prefetch = prefetch
        self.keep_for_update = keep_for_update  # blocks update during backward: keep them until then
        self.path = folder / "params.bin"
        self.units: list[ParamUnit] = []
        offset = 0
        for i, (name, group) in enumerate(groups):
            offsets, at = [], 0
            for fsdp_param in group.fsdp_params:
                offsets.append(at)
                at = _round_up(at + fsdp_param._sharded_param_data.nbytes, 64)
            nbytes = _round_up(at)
            self.units.append(ParamUnit(i, name, group, offsets, nbytes, offset))
            offset += nbytes
        self.file_bytes = offset
        self.max_unit_bytes = max(u.nbytes for u in self.units)
        # A gathered unit, the units read ahead of it, one being written back, and, when blocks update during
        # backward, one being updated and one waiting for it: the most that are ever resident at once.
        self.buffers = prefetch + 2 + (2 if keep_for_update else 0)
        self.pool = HostBufferPool(self.max_unit_bytes, self.buffers, pin=pin)
        self._writes: list[tuple[ParamUnit, int, list[SwapHandle]]] = []
        self._lock = threading.RLock()
        self._order: list[int] = []  # unit indices in gather order, recorded in the first step
        self._recording = True
        self._position = 0
        with open(self.path, "wb") as f:
            f.truncate(self.file_bytes)
        self._mapped = torch.from_file(str(self.path), shared=True, size=self.file_bytes, dtype=torch.uint8)
        self._evict_initial()
        for unit in self.units:
            self._patch(unit)

    @staticmethod
    def pool_bytes(max_unit_bytes: int, prefetch: int, keep_for_update: bool) -> int:
        return _round_up(max_unit_bytes) * (prefetch + 2 + (2 if keep_for_update else 0))

    # -- residency ---------------------------------------------------------------------------------------------
    def _views(self, unit: ParamUnit, buf: torch.Tensor) -> list[torch.Tensor]:
        out = []
        for fsdp_param, at in zip(unit.group.fsdp_params, unit.offsets):
            data = fsdp_param._sharded_param_data
            out.append(buf[at : at + data.nbytes].view(data.dtype))
        return out

    def _point_at(self, unit: ParamUnit, sources: list[torch.Tensor] | None) -> None:
        """Make the unit's shards live in ``sources`` (views of a pool buffer), or in the file mapping (None)."""
        if sources is None:
            sources = self._views(unit, self._mapped[unit.file_offset : unit.file_offset + unit.nbytes])
        for i, fsdp_param in enumerate(unit.group.fsdp_params):
            data = fsdp_param._sharded_param_data
            local = fsdp_param.sharded_param._local_tensor
            storage, offset = sources[i].untyped_storage(), sources[i].storage_offset()
            with torch.no_grad():
                data.set_(storage, offset, data.shape, data.stride())
                local.set_(storage, offset, local.shape, local.stride())

    def _evict_initial(self) -> None:
        """Write every unit's current shards to the file once, then let them go."""
        index, buf = self.pool.acquire()
        try:
            for unit in self.units:
                for view, fsdp_param in zip(self._views(unit, buf), unit.group.fsdp_params):
                    view.copy_(fsdp_param._sharded_param_data.view(-1))
                self.engine.write(buf[: unit.nbytes], self.path, unit.file_offset).wait()
                self._point_at(unit, None)
        finally:
            self.pool.release(index)

    def _start_read(self, unit: ParamUnit, index: int) -> None:
        while any(w[0] is unit for w in self._writes):  # never read a region whose write-back is in flight
            self._reap_oldest_write()
        unit.buffer = index
        unit.ready.clear()
        unit.read_error = None
        unit.reading = [self.engine.read(self.pool._buffers[index][: unit.nbytes], self.path, unit.file_offset)]

    def _acquire_buffer(self) -> int:
        """A free buffer; waits for write-backs, or for an update on the optimizer's thread to release one."""
        with self._lock:
            while self.pool.free == 0 and self._writes:
                self._reap_oldest_write()
        try:
            return self.pool.acquire(timeout=600)[0]
        except TimeoutError as err:
            raise RuntimeError(
                f"all {self.buffers} parameter swap buffers stayed in use for 10 minutes: more blocks are resident "
                "at once than offload.prefetch_blocks allows for (is a block used twice in one forward?)"
            ) from err

    def acquire(self, unit: ParamUnit) -> None:
        """Make ``unit`` resident (reading it if needed) and count one more user."""
        if unit.buffer is None:
            index = self._acquire_buffer()
            with self._lock:
                if unit.buffer is None:
                    self._start_read(unit, index)
                else:
                    self.pool.release(index)
        with self._lock:
            unit.users += 1
            reading, unit.reading = unit.reading, []
        if not reading:  # another thread took the read over (or it is long done): wait until it is in place
            unit.ready.wait()
            if unit.read_error is not None:
                raise unit.read_error
            return
        try:
            for handle in reading:
                handle.wait()
            self._point_at(unit, self._views(unit, self.pool._buffers[unit.buffer]))
        except RuntimeError as err:
            unit.read_error = RuntimeError(f"reading the parameters of {unit.name} failed: {err}")
            raise unit.read_error from err
        finally:
            unit.ready.set()

    def release(self, unit: ParamUnit, dirty: bool = False) -> None:
        """One user is done; the last one writes the unit back if it changed and gives its buffer back."""
        with self._lock:
            unit.dirty |= dirty
            unit.users -= 1
            if unit.users > 0:
                return
            index, unit.buffer = unit.buffer, None
            self._point_at(unit, None)
            if unit.dirty:
                unit.dirty = False
                buf = self.pool._buffers[index]
                self._writes.append((unit, index, [self.engine.write(buf[: unit.nbytes], self.path, unit.file_offset)]))
            else:
                self.pool.release(index)

    def _reap_oldest_write(self) -> None:
        unit, index, handles = self._writes.pop(0)
        try:
            for handle in handles:
                try:
                    handle.wait()
                except RuntimeError as err:
                    raise RuntimeError(f"writing the parameters of {unit.name} failed: {err}") from err
        finally:
            self.pool.release(index)

    def flush(self) -> None:
        """Wait for every write-back (before a checkpoint reads the file)."""
        with self._lock:
            while self._writes:
                self._reap_oldest_write()

    def _prefetch_after(self, unit: ParamUnit) -> None:
        if self._recording or not self.prefetch:
            return
        try:
            at = self._order.index(unit.index, self._position)
        except ValueError:
            return
        self._position = at + 1
        for ahead in self._order[at + 1 : at + 1 + self.prefetch]:
            target = self.units[ahead]
            if target.buffer is None and self.pool.free > 0:  # never wait for room to read ahead
                self._start_read(target, self.pool.acquire()[0])

    # -- FSDP2 hooks -------------------------------------------------------------------------------------------
    def _patch(self, unit: ParamUnit) -> None:
        group = unit.group
        unshard: Callable[..., Any] = group.unshard
        wait_for_unshard: Callable[..., Any] = group.wait_for_unshard

        def unshard_resident(*args: Any, **kwargs: Any) -> Any:
            if group._all_gather_result is not None or group.is_unsharded:
                return unshard(*args, **kwargs)  # nothing will be gathered
            if self._recording:
                self._order.append(unit.index)
            self.acquire(unit)
            unit.gathering = True
            with self._lock:
                self._prefetch_after(unit)
            return unshard(*args, **kwargs)

        def wait_then_release(*args: Any, **kwargs: Any) -> Any:
            out = wait_for_unshard(*args, **kwargs)
            if unit.gathering:
                unit.gathering = False
                if group.device.type == "cuda":
                    torch.cuda.current_stream().synchronize()  # host->device copies of the shards are done
                in_backward = group._training_state in (TrainingState.PRE_BACKWARD, TrainingState.POST_BACKWARD)
                if in_backward and self.keep_for_update and group.reduce_grads:
                    unit.held_for_update = True
                else:
                    self.release(unit)
            return out

        group.unshard = unshard_resident
        group.wait_for_unshard = wait_then_release

    def evicted_params(self) -> set[int]:
        """ids of the sharded parameters whose data is on NVMe right now."""
        return {id(p.sharded_param) for u in self.units if u.buffer is None for p in u.group.fsdp_params}

    # -- checkpoints -----------------------------------------------------------------------------------------
    def mapped_files(self) -> list[tuple[torch.Tensor, Path]]:
        """The swap file and its shared mapping (what state_views are views of)."""
        return [(self._mapped, Path(self.path))]

    def state_names(self, model: torch.nn.Module) -> set[str]:
        ours = {id(p.sharded_param) for u in self.units for p in u.group.fsdp_params}
        return {n for n, p in model.named_parameters() if id(p) in ours}

    def state_views(self, model: torch.nn.Module) -> dict[str, torch.Tensor]:
        """Every shard as a DTensor over a shared mapping of the swap file (page cache, not heap): a checkpoint
        saves from it, or loads into it in place, and the next gather reads what was loaded."""
        self.flush()
        if any(u.buffer is not None for u in self.units):
            raise RuntimeError("parameters are resident (mid-step); checkpoint between optimizer steps")
        names = {id(p): n for n, p in model.named_parameters()}
        whole = self._mapped
        views = {}
        for unit in self.units:
            for fsdp_param, at in zip(unit.group.fsdp_params, unit.offsets):
                param = fsdp_param.sharded_param
                local = param._local_tensor
                start = unit.file_offset + at
                data = whole[start : start + local.numel() * local.element_size()].view(local.dtype).view(local.shape)
                views[names[id(param)]] = dtensor_like(param, data)
        return views

    def end_of_step(self) -> None:
        """The first step's gather order is the order of every later step."""
        with self._lock:
            self._recording = False
            self._position = 0

    def for_update(self, unit: ParamUnit) -> None:
        """Acquire for an optimizer update, taking over the hold from backward when there is one."""
        if unit.held_for_update:
            unit.held_for_update = False
            return  # the backward's acquire becomes the update's
        self.acquire(unit)

    def drop_holds(self) -> None:
        """Release units held for an update that did not come (backward without a step)."""
        for unit in self.units:
            if unit.held_for_update:
                unit.held_for_update = False
                self.release(unit)
