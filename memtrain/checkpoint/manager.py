"""Asynchronous checkpoints of one training job: lazy snapshots, their replicas, their durable flush, recovery.

One step, as the trainer sees it:

    optimizer.step()          the pre-step hook waits for the previous snapshot's copy (usually long done)
    manager.snapshot(...)     buffers that change in forward are copied now; the rest is queued
    forward / backward        the snapshot thread copies the state into a keeper slot, commits it, sends it to
                              the buddy rank's keeper; every n-th snapshot goes on to the flush thread, which
                              writes a DCP checkpoint from the slot (the slot is not reused until it is done)

State offloaded to NVMe is copied file to file into a snapshot file per slot (``files.py``), not into the slot.

Recovery tries, in order: this node's keeper, the peers' replicas, the newest durable checkpoint that verifies.
All ranks agree on one step (the newest that every rank can get), so the restored state is consistent. From
memory, restore is lazy the other way round: the parameters are copied before it returns, the optimizer state
(the caller names which part may come late) on the snapshot thread while the first forward and backward run;
the first optimizer step waits for it, as it waits for a snapshot's copy.
"""
from __future__ import annotations

import logging
import pickle
import threading
import time
import warnings
from collections.abc import Callable, Collection, Iterable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from memtrain.checkpoint import durable
from memtrain.checkpoint.files import SnapshotFiles
from memtrain.checkpoint.keeper import KeeperClient, socket_path
from memtrain.checkpoint.layout import Layout, flatten, unflatten
from memtrain.checkpoint.parity import ParityGroup, parity_groups
from memtrain.checkpoint.redundancy import Replicator, buddy, transfer
from memtrain.checkpoint.sharded import load_sharded
from memtrain.checkpoint.slots import Slot, SlotHeader, SlotStore, segment_size
from memtrain.config import CheckpointConfig, ConfigError

log = logging.getLogger(__name__)

OWN_SLOTS = 2


def own_name(rank: int, index: int) -> str:
    return f"rank{rank}/own/{index}"


@dataclass
class Restored:
    """What recovery found: the step, where it came from, and the values saved beside the tensors."""

    step: int
    source: str  # "keeper", "peer" or "durable"
    state: dict[str, Any]  # the training state, its tensors the caller's (filled in place)
    meta: dict[str, Any]
    rank_state: dict[str, Any] | None
    seconds: float
    path: Path | None = None
    late: list[torch.Tensor] = field(default_factory=list)  # still being filled until the next wait_copied()


@dataclass
class _Pending:
    copied: threading.Event
    cuda_done: torch.cuda.Event | None
    restore: bool = False  # the late part of a restore (its wait is not a snapshot stall)


@dataclass
class CheckpointStats:
    snapshots: int = 0
    stall_s: float = 0.0  # training time spent waiting for snapshot copies and launching them
    restore_wait_s: float = 0.0  # training time spent waiting for the late part of a restore
    restore_complete_s: float | None = None  # from restore()'s call until every restored tensor was in place
    last_copy_s: float = 0.0
    in_memory_step: int | None = None
    replicated_step: int | None = None
    durable_steps: list[int] = field(default_factory=list)
    flush_errors: list[str] = field(default_factory=list)


class CheckpointManager:
    def __init__(self, config: CheckpointConfig, job: str, rank: int, world: int, ranks_per_node: int,
                 device_type: str) -> None:
        nodes = world // max(ranks_per_node, 1)
        if config.redundancy != "none" and nodes < 2:
            raise ConfigError(f"checkpoint.redundancy={config.redundancy!r} keeps each snapshot recoverable on other "
                              f"nodes, but this job runs on one node ({world} ranks, {ranks_per_node} per node): use "
                              "checkpoint.redundancy='none', or run on two nodes or more")
        if config.redundancy == "xor" and nodes % config.parity_group_size:
            raise ConfigError(f"checkpoint.parity_group_size={config.parity_group_size} does not divide the {nodes} "
                              f"nodes of this job: choose a divisor of {nodes}, or checkpoint.redundancy='replica'")
        self.config = config
        self.rank, self.world, self.ranks_per_node = rank, world, ranks_per_node
        self.node = rank // ranks_per_node
        distributed = dist.is_initialized()
        # Own gloo groups: the snapshot thread and the flush thread talk while the trainer's group is busy.
        self.group = dist.new_group(backend="gloo") if distributed else None
        self.flush_group = dist.new_group(backend="gloo") if distributed and config.dirpath else None
        keeper = None
        if config.keeper:
            job = config.job_name or job
            keeper = KeeperClient(socket_path(config.keeper_dir, job, self.node), config.keeper_idle_timeout_s)
            keeper.claim(rank)
        self.store = SlotStore(keeper, pin=device_type == "cuda")
        self.replicator = (Replicator(self.store, rank, world, ranks_per_node, self.group)
                           if config.redundancy == "replica" else None)
        self.parity = (ParityGroup(self.store, rank, world, ranks_per_node, config.parity_group_size)
                       if config.redundancy == "xor" else None)
        # The training device, for the background threads: a new thread starts on device 0, and on a multi-GPU node
        # its CUDA calls (page-locking slots, events) would open a context there.
        self._device = torch.cuda.current_device() if device_type == "cuda" else None
        self._snapshot_thread = self._thread("memtrain-snapshot")
        self._flush_thread = self._thread("memtrain-flush") if config.dirpath else None
        self._copy_stream = torch.cuda.Stream() if device_type == "cuda" else None
        self._pending: _Pending | None = None
        self._busy: dict[str, Future] = {}  # slot name -> its snapshot job
        self._pinned: dict[str, Future] = {}  # slot name -> the flush reading it
        self._launched: dict[str, int] = {}  # slot name -> step last launched into it
        self._last: tuple[str, int, Any, Layout] | None = None  # slot, step, skeleton, layout of the newest one
        self._error: BaseException | None = None
        self._received: Slot | None = None  # recovery: the own slot a peer's replica of this rank landed in
        self.files: SnapshotFiles | None = None  # set for state offloaded to NVMe: its snapshots go to files there
        self.stats = CheckpointStats()

    def _thread(self, name: str) -> ThreadPoolExecutor:
        if self._device is None:
            return ThreadPoolExecutor(1, thread_name_prefix=name)
        return ThreadPoolExecutor(1, thread_name_prefix=name, initializer=torch.cuda.set_device,
                                  initargs=(self._device,))

    @classmethod
    def for_this_process(cls, config: CheckpointConfig, job: str, ranks_per_node: int,
                         device_type: str) -> CheckpointManager:
        rank = dist.get_rank() if dist.is_initialized() else 0
        world = dist.get_world_size() if dist.is_initialized() else 1
        return cls(config, job, rank, world, ranks_per_node, device_type)

    @property
    def own_slots(self) -> list[str]:
        return [own_name(self.rank, i) for i in range(OWN_SLOTS)]

    @property
    def latest_step(self) -> int | None:
        """The step of the newest snapshot started (its copy may still be running)."""
        return None if self._last is None else self._last[1]

    def count_stall(self, seconds: float) -> None:
        """Training time the caller spent for a snapshot before calling ``snapshot`` (building state dicts)."""
        self.stats.stall_s += seconds

    def wait_flushes(self) -> None:
        """Durable writes queued so far are finished (before removing a checkpoint folder, for one)."""
        for job in list(self._busy.values()):
            job.result()
        if self._flush_thread is not None:
            self._flush_thread.submit(lambda: None).result()

    # -- snapshots ----------------------------------------------------------------------------------------------
    def due(self, step: int) -> bool:
        return step % self.config.snapshot_every_n_steps == 0

    @torch.no_grad()  # copies out of parameters must not enter autograd (each would grow the slot's graph)
    def snapshot(self, step: int, state: dict[str, Any], meta: dict[str, Any] | None = None,
                 rank_state: dict[str, Any] | None = None, stable_now: Iterable[str] = ()) -> None:
        """Start copying ``state`` (right after an optimizer step). ``stable_now``: paths (``model.<fqn>``) of
        tensors that the next forward changes (buffers such as batch-norm statistics): copied before returning."""
        start = time.perf_counter()
        self.wait_copied()
        skeleton, tensors, layout, in_files = self._flatten(state)
        blob = pickle.dumps({"skeleton": skeleton, "meta": meta, "rank_state": rank_state},
                            protocol=pickle.HIGHEST_PROTOCOL)
        slot = self._take_slot(step, layout.data_bytes, len(blob))
        slot.begin_write()
        views = layout.views(slot.data(layout.data_bytes))
        now = set(stable_now)
        later: list[tuple[torch.Tensor, torch.Tensor]] = []
        on_device: list[tuple[torch.Tensor, torch.Tensor]] = []
        file_copies = []  # (swap file, its offset, snapshot file offset, bytes)
        for entry, view, tensor in zip(layout.entries, views, tensors):
            if entry.in_file:
                file_copies.append((*in_files[id(tensor)], entry.offset, entry.nbytes))
            elif entry.path in now:
                view.copy_(tensor)
            elif tensor.is_cuda:
                on_device.append((view, tensor))  # type: ignore[arg-type]
            else:
                later.append((view, tensor))  # type: ignore[arg-type]
        cuda_done = self._copy_on_stream(on_device) if on_device else None
        pending = _Pending(threading.Event(), cuda_done)
        persist = (self.config.persist_every_n_snapshots
                   and (self.stats.snapshots + 1) % self.config.persist_every_n_snapshots == 0)
        self._busy[slot.name] = self._snapshot_thread.submit(
            self._finish, slot, step, layout, blob, later, file_copies, pending,
            durable.step_path(self.config.dirpath, step) if persist else None, meta, rank_state, skeleton)
        self._pending = pending
        self._last = (slot.name, step, skeleton, layout)
        self.stats.snapshots += 1
        self.stats.stall_s += time.perf_counter() - start

    def _flatten(self, state: dict[str, Any]) -> tuple[Any, list[torch.Tensor], Layout, dict[int, tuple[Path, int]]]:
        """flatten(), with the tensors that view NVMe swap files laid out in the snapshot file: id -> (file, offset)."""
        if self.files is None:
            return (*flatten(state), {})
        ranges = self.files.ranges()
        in_files: dict[int, tuple[Path, int]] = {}

        def in_file(tensor: torch.Tensor) -> bool:
            found = ranges.find(tensor)
            if found is not None:
                in_files[id(tensor)] = found
            return found is not None

        return (*flatten(state, in_file), in_files)

    def _copy_on_stream(self, pairs: list[tuple[torch.Tensor, torch.Tensor]]) -> torch.cuda.Event:
        """(destination, source) copies on the copy stream, between pinned host memory and the device."""
        assert self._copy_stream is not None
        self._copy_stream.wait_stream(torch.cuda.current_stream())  # after the optimizer step's kernels
        with torch.cuda.stream(self._copy_stream):
            for destination, source in pairs:
                destination.copy_(source, non_blocking=True)
                for tensor in (destination, source):
                    if tensor.is_cuda:
                        tensor.record_stream(self._copy_stream)
            done = torch.cuda.Event()
            done.record()
        return done

    def wait_copied(self) -> None:
        """Before any state is updated: the previous snapshot's copy (or a restore's late part) must be finished."""
        pending, self._pending = self._pending, None
        if pending is not None:
            start = time.perf_counter()
            pending.copied.wait()
            if pending.cuda_done is not None:
                pending.cuda_done.synchronize()
            waited = time.perf_counter() - start
            if pending.restore:
                self.stats.restore_wait_s += waited
            else:
                self.stats.stall_s += waited
        self._raise_background_error()

    def _raise_background_error(self) -> None:
        if self._error is not None:
            error, self._error = self._error, None
            raise RuntimeError(f"memtrain checkpoint snapshot failed: {error}") from error

    def _take_slot(self, step: int, data_bytes: int, blob_bytes: int) -> Slot:
        """The own slot to write: the older one unless a flush still reads it. A slot's previous job (commit,
        replica, hand-off to the flush) is waited for first, so a flush it queued is seen."""
        names = sorted(self.own_slots, key=lambda n: self._launched.get(n, -1))
        chosen = None
        for name in names:
            job = self._busy.pop(name, None)
            if job is not None:
                job.result()
            flush = self._pinned.get(name)
            if flush is None or flush.done():
                chosen = name
                break
        if chosen is None:  # both slots are being flushed: wait for the older flush
            chosen = names[0]
            self._pinned[chosen].result()
        self._pinned.pop(chosen, None)
        self._raise_background_error()
        if self.store.ensure_keeper(self.rank):
            log.warning("memtrain: the checkpoint keeper had died; a new one holds the snapshots from step %d on", step)
        slot, _ = self.store.open(chosen, segment_size(data_bytes, blob_bytes))
        self._launched[chosen] = step
        return slot

    def _finish(self, slot: Slot, step: int, layout: Layout, blob: bytes,
                later: list[tuple[torch.Tensor, torch.Tensor]], file_copies: list[tuple[Path, int, int, int]],
                pending: _Pending, persist_path: Path | None, meta: dict[str, Any] | None,
                rank_state: dict[str, Any] | None, skeleton: Any) -> None:
        """The snapshot thread: copy, commit, replicate, hand on to the flush."""
        try:
            start = time.perf_counter()
            try:
                if file_copies:
                    assert self.files is not None
                    self.files.write(slot.name, layout.file_bytes, file_copies)
                with torch.no_grad():  # grad mode is per thread
                    for view, tensor in later:
                        view.copy_(tensor)
                if pending.cuda_done is not None:
                    pending.cuda_done.synchronize()
            finally:
                pending.copied.set()
            crc = slot.write_blob(layout.data_bytes, blob)
            header = SlotHeader(step, layout.data_bytes, len(blob), crc, layout.digest)
            slot.commit(step, layout.data_bytes, len(blob), crc, layout.digest)
            self.stats.last_copy_s = time.perf_counter() - start
            self.stats.in_memory_step = step
            if self.replicator is not None:
                self.stats.replicated_step = self.replicator.exchange(slot, header)
            if self.parity is not None:
                self.stats.replicated_step = self.parity.build(slot, header)
            if persist_path is not None:
                self._pin_and_flush(slot, step, layout, skeleton, meta, rank_state, persist_path)
        except BaseException as e:  # noqa: BLE001 - re-raised on the training thread at the next wait
            self._error = e

    def _pin_and_flush(self, slot: Slot, step: int, layout: Layout, skeleton: Any, meta: dict[str, Any] | None,
                       rank_state: dict[str, Any] | None, path: Path) -> None:
        assert self._flush_thread is not None
        self._pinned[slot.name] = self._flush_thread.submit(
            self._flush, slot, step, layout, skeleton, meta, rank_state, path)

    def persist(self, path: str | Path, meta: dict[str, Any] | None = None) -> None:
        """Write the newest snapshot to ``path`` as a durable checkpoint, in the background (Lightning's
        ModelCheckpoint). ``meta`` replaces the snapshot's job-wide values."""
        if self._last is None:
            raise RuntimeError("no snapshot to persist yet: call snapshot() after the optimizer step first")
        if self._flush_thread is None:
            self._flush_thread = self._thread("memtrain-flush")
            self.flush_group = dist.new_group(backend="gloo") if dist.is_initialized() else None
        name, step, skeleton, layout = self._last
        slot = self.store.find(name)
        assert slot is not None

        def after_commit() -> None:  # on the snapshot thread, so after that snapshot's commit
            header = slot.header()
            if header is None or header.step != step:
                return
            saved = slot.blob(header)
            self._pin_and_flush(slot, step, layout, skeleton, meta if meta is not None else saved["meta"],
                                saved["rank_state"], Path(path))

        self._busy[name] = self._snapshot_thread.submit(after_commit)

    def _flush(self, slot: Slot, step: int, layout: Layout, skeleton: Any, meta: dict[str, Any] | None,
               rank_state: dict[str, Any] | None, path: Path) -> None:
        """The flush thread: a DCP checkpoint of the slot, committed atomically; a failure is reported and
        training goes on with its in-memory snapshots (earlier durable checkpoints are untouched)."""
        try:
            in_file = self.files.mapping(slot.name, layout.file_bytes) if layout.file_bytes and self.files else None
            locals_ = layout.views(slot.data(layout.data_bytes), in_file)
            state = unflatten(skeleton, [e.rebuild(t) for e, t in zip(layout.entries, locals_)])  # type: ignore[arg-type]
            durable.write_checkpoint(path, state, meta, rank_state, self.flush_group)
            self.stats.durable_steps.append(step)
            dirpath = self.config.dirpath
            if self.rank == 0 and dirpath and Path(path).parent == Path(dirpath):
                durable.retain(dirpath, self.config.keep_latest_k)
        except durable.CheckpointWriteError as e:
            self.stats.flush_errors.append(str(e))
            if self.rank == 0:
                warnings.warn(f"memtrain: durable checkpoint of step {step} not written ({e}); training goes on "
                              "with in-memory snapshots, earlier checkpoints are intact", stacklevel=1)
        except BaseException as e:  # noqa: BLE001 - re-raised on the training thread at the next wait
            self._error = e

    def wait(self) -> None:
        """Everything in flight (copies, replicas, flushes) finished; re-raises a background error."""
        self.wait_copied()
        self.wait_flushes()
        self._raise_background_error()

    def status(self) -> dict[str, Any]:
        """Which steps are staged in memory (own keeper, the buddy's replica) and which are durable on disk."""
        durable_steps = [s for s, _ in durable.committed_steps(self.config.dirpath)] if self.config.dirpath else []
        return {"in_memory_step": self.stats.in_memory_step, "replicated_step": self.stats.replicated_step,
                "durable_steps": durable_steps, "snapshots": self.stats.snapshots,
                "stall_s": self.stats.stall_s, "last_copy_s": self.stats.last_copy_s,
                "restore_complete_s": self.stats.restore_complete_s, "restore_wait_s": self.stats.restore_wait_s,
                "flush_errors": list(self.stats.flush_errors)}

    # -- recovery ---------------------------------------------------------------------------------------------
    @torch.no_grad()
    def restore(self, make_template: Callable[[], dict[str, Any]], use_durable: bool = True,
                late: Collection[str] = ()) -> Restored | None:
        """Collective: fill the template (the live training state, as for a checkpoint load; made only when
        there is something to restore) from the newest step every rank can get: own keeper, then peers'
        replicas, then durable checkpoints. None: nothing to restore.

        ``late``: top-level keys of the template whose tensors the caller does not read before its next update
        (optimizer state). From memory they are filled in the background, and ``Restored.late`` lists them until
        ``wait_copied()`` (which the optimizer step calls) returns; every other tensor is in place on return."""
        start = time.perf_counter()
        own_headers = {step: (slot, slot.header()) for step, slot in
                       self.store.committed(self.own_slots).items()}
        held = self.replicator.held() if self.replicator is not None else {}
        parity = self.parity.held() if self.parity is not None else {}
        use_durable = use_durable and bool(self.config.dirpath)
        durable_steps = durable.committed_steps(self.config.dirpath) if use_durable and self.rank == 0 else []
        if not any(durable._gather(bool(own_headers or held or parity or durable_steps), self.group)):
            return None  # a fresh start: the template (which initializes optimizer state) is not even made
        template = make_template()
        _, tensors, layout, in_files = self._flatten(template)
        own = {step: (slot, header) for step, (slot, header) in own_headers.items() if header.digest == layout.digest
               and (not layout.file_bytes or (self.files is not None and self.files.usable(slot.name, layout.file_bytes)))}
        mine = {"own": sorted(own), "held": {s: slot.header().digest for s, slot in held.items()},  # type: ignore[union-attr]
                "digest": layout.digest, "parity": sorted(parity)}
        everyone = durable._gather(mine, self.group)
        step, sources = self._common_step(everyone)
        if step is None:
            return self._restore_durable(template, start) if use_durable else None
        # Ranks whose own keeper lost the step get it from the rank that holds their replica.
        for r, source in enumerate(sources):
            if source != "peer":
                continue
            holder = buddy(r, self.world, self.ranks_per_node)
            replica = held.get(step) if self.rank == holder else None
            got = transfer(replica, None if replica is None else replica.header(), holder, r, self.rank,
                           self._slot_for, self.group)
            if self.rank == r:
                assert got is not None and self._received is not None
                own[step] = (self._received, got)
        if "parity" in sources:
            self._rebuild_from_parity(step, sources, own, parity)
        slot, header = own[step]
        later: list[tuple[torch.Tensor, torch.Tensor]] = []
        file_copies = []  # (swap file, its offset, snapshot file offset, bytes)
        for entry, view, tensor in zip(layout.entries, layout.views(slot.data(header.data_bytes)), tensors):
            if entry.in_file:
                file_copies.append((*in_files[id(tensor)], entry.offset, entry.nbytes))
            elif entry.path.split(".", 1)[0] in late and tensor.dim() > 0:
                later.append((view, tensor))  # type: ignore[arg-type]
            else:
                tensor.copy_(view)  # type: ignore[arg-type]
        if file_copies:
            assert self.files is not None
            self.files.read(slot.name, layout.file_bytes, file_copies)
        if later:
            self._copy_late(later, start)
        else:
            self.stats.restore_complete_s = time.perf_counter() - start
        saved = slot.blob(header)  # the slot is not reused before the late copy is waited for (snapshot waits)
        self._forget_newer_than(step)
        state = unflatten(saved["skeleton"], _rebuild_like(template, tensors))
        restored = Restored(step, sources[self.rank], state, saved["meta"] or {}, saved["rank_state"],
                            time.perf_counter() - start, late=[tensor for _, tensor in later])
        self._report(restored, sources)
        return restored

    def _copy_late(self, pairs: list[tuple[torch.Tensor, torch.Tensor]], start: float) -> None:
        """Restore's late part: host tensors on the snapshot thread, device tensors on the copy stream."""
        on_device = [(tensor, view) for view, tensor in pairs if tensor.is_cuda]
        on_host = [(view, tensor) for view, tensor in pairs if not tensor.is_cuda]
        cuda_done = self._copy_on_stream(on_device) if on_device else None  # (destination, source) pairs
        pending = _Pending(threading.Event(), cuda_done, restore=True)

        def copy() -> None:
            try:
                with torch.no_grad():
                    for view, tensor in on_host:
                        tensor.copy_(view)
                if cuda_done is not None:
                    cuda_done.synchronize()
                self.stats.restore_complete_s = time.perf_counter() - start
            except BaseException as e:  # noqa: BLE001 - re-raised on the training thread at the next wait
                self._error = e
            finally:
                pending.copied.set()

        self._snapshot_thread.submit(copy)
        self._pending = pending

    def _slot_for(self, header: SlotHeader) -> Slot:
        """Where a replica coming back from a peer is written (an own slot: the keeper holds it again)."""
        self._received = self._take_slot(header.step, header.data_bytes, header.blob_bytes)
        return self._received

    def _rebuild_from_parity(self, step: int, sources: list[str], own: dict[int, tuple[Slot, SlotHeader]],
                             parity: dict[int, Slot]) -> None:
        assert self.parity is not None
        lost = [self.parity.members.index(r) for r in self.parity.members if sources[r] == "parity"]
        if not lost:
            return  # this rank's group lost nobody
        mine = own.get(step)
        got = self.parity.rebuild(lost[0], None if mine is None else mine[0], parity.get(step), self._slot_for)
        if got is not None:
            assert self._received is not None
            own[step] = (self._received, got)

    def _common_step(self, everyone: list[dict[str, Any]]) -> tuple[int | None, list[str]]:
        candidates = sorted({s for info in everyone for s in info["own"]}, reverse=True)
        if self.parity is not None:
            return self._common_step_with_parity(everyone, candidates)
        for step in candidates:
            sources = []
            for r, info in enumerate(everyone):
                holder = everyone[buddy(r, self.world, self.ranks_per_node)] if self.replicator else None
                if step in info["own"]:
                    sources.append("keeper")
                elif holder is not None and holder["held"].get(step) == info["digest"]:
                    sources.append("peer")
                else:
                    break
            else:
                return step, sources
        return None, []

    def _common_step_with_parity(self, everyone: list[dict[str, Any]],
                                 candidates: list[int]) -> tuple[int | None, list[str]]:
        """The newest step at which, in every parity group, at most one member lost it and all the others hold
        both their own snapshot and their parity block of it."""
        assert self.parity is not None
        groups = parity_groups(self.world, self.ranks_per_node, self.parity.size)
        for step in candidates:
            sources = ["keeper"] * self.world
            for members in groups:
                missing = [r for r in members if step not in everyone[r]["own"]]
                survivors = [r for r in members if r not in missing]
                if len(missing) > 1 or (missing and not all(step in everyone[r]["parity"] for r in survivors)):
                    break
                for r in missing:
                    sources[r] = "parity"
            else:
                return step, sources
        return None, []

    def _forget_newer_than(self, step: int) -> None:
        """Slots of steps after the restored one belong to a lost future: never restore them later."""
        names = self.own_slots
        if self.replicator is not None:
            names += [s.name for s in self.replicator.held().values()]
        if self.parity is not None:
            names += [s.name for s in self.parity.held().values()]
        for name in names:
            slot = self.store.find(name)
            header = None if slot is None else slot.header()
            if header is not None and header.step > step:
                slot.begin_write()  # type: ignore[union-attr]
                header = None
            if name.startswith(f"rank{self.rank}/own/"):
                self._launched[name] = -1 if header is None else header.step

    def _restore_durable(self, template: dict[str, Any], start: float) -> Restored | None:
        if not self.config.dirpath:
            return None
        candidates = durable._gather(durable.committed_steps(self.config.dirpath) if self.rank == 0 else None,
                                     self.group)[0]
        for step, path in candidates:
            try:
                meta, rank_state = load_sharded(path, template, self.group)
            except durable.CorruptCheckpointError as e:
                if self.rank == 0:
                    log.warning("memtrain: durable checkpoint %s is unusable (%s); trying the previous one", path, e)
                    print(f"memtrain: {path} is unusable ({e}); trying the previous checkpoint", flush=True)
                continue
            self.stats.restore_complete_s = time.perf_counter() - start
            restored = Restored(step, "durable", template, meta, rank_state, self.stats.restore_complete_s, path)
            self._report(restored, ["durable"] * self.world)
            return restored
        return None

    def _report(self, restored: Restored, sources: list[str]) -> None:
        if self.rank != 0:
            return
        by_source: dict[str, list[int]] = {}
        for r, source in enumerate(sources):
            by_source.setdefault(source, []).append(r)
        names = {"keeper": "their own keeper", "peer": "peer replicas", "parity": "XOR parity of their group"}
        where = "; ".join(f"ranks {ranks} from {names.get(s, restored.path)}" for s, ranks in by_source.items())
        message = f"memtrain: restored step {restored.step} ({where}) in {restored.seconds:.2f} s"
        log.info(message)
        print(message, flush=True)

    def close(self, finished: bool = False) -> None:
        """Finish background work. ``finished``: the job is done, the keeper lets go of this rank's snapshots."""
        try:
            self.wait()
        finally:
            self._snapshot_thread.shutdown(wait=True)
            if self._flush_thread is not None:
                self._flush_thread.shutdown(wait=True)
            self.store.close(drop_prefix=f"rank{self.rank}/" if finished else None)
            if finished and self.files is not None:  # the keeper let go of the slots these files belong to
                self.files.remove(self.own_slots)


def _rebuild_like(template: dict[str, Any], tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    """The template's own tensor objects (DTensors where it had them), in flatten order."""
    found: list[torch.Tensor] = []

    def walk(obj: Any) -> None:
        if isinstance(obj, torch.Tensor):
            found.append(obj)
        elif isinstance(obj, dict):
            for v in obj.values():
                walk(v)
        elif isinstance(obj, (list, tuple)):
            for v in obj:
                walk(v)

    walk(template)
    assert len(found) == len(tensors)
    return found
