"""CUDA-only bookkeeping of the checkpoint path, checked on the CPU with the CUDA calls replaced by recorders:
page-locking of snapshot slots (every slot handed out registered once, exactly those unregistered), and the
training device in the background threads."""
from __future__ import annotations

import os
import signal
import threading
import time
from collections import Counter
from pathlib import Path

import pytest
import torch
from torch import nn

from memtrain.checkpoint.keeper import KeeperClient, socket_path
from memtrain.checkpoint.slots import SlotStore, keeper_store

_ALREADY_REGISTERED, _NOT_REGISTERED = 712, 713  # cudaErrorHostMemoryAlreadyRegistered / NotRegistered


class FakeCudart:
    """cudaHostRegister / cudaHostUnregister as the runtime answers them, recorded."""

    def __init__(self, fail_register: bool = False) -> None:
        self.fail_register = fail_register
        self.pinned: dict[int, int] = {}
        self.registered: Counter[int] = Counter()
        self.unregistered: Counter[int] = Counter()
        self.errors: list[tuple[str, int]] = []

    def cudaHostRegister(self, ptr: int, size: int, flags: int) -> int:
        if self.fail_register:
            self.errors.append(("register", ptr))
            return 2  # cudaErrorMemoryAllocation
        if ptr in self.pinned:
            self.errors.append(("register", ptr))
            return _ALREADY_REGISTERED
        self.pinned[ptr] = size
        self.registered[ptr] += 1
        return 0

    def cudaHostUnregister(self, ptr: int) -> int:
        if ptr not in self.pinned:
            self.errors.append(("unregister", ptr))
            return _NOT_REGISTERED
        del self.pinned[ptr]
        self.unregistered[ptr] += 1
        return 0


@pytest.fixture
def cudart(monkeypatch: pytest.MonkeyPatch) -> FakeCudart:
    fake = FakeCudart()
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "cudart", lambda: fake)
    return fake


def _ptr(slot) -> int:
    return slot.flat.data_ptr()


def test_every_slot_opened_is_registered_once_and_unregistered_once(cudart: FakeCudart) -> None:
    store = SlotStore(None, pin=True)
    small, created = store.open("rank0/own/0", 1 << 16)
    assert created and cudart.pinned == {_ptr(small): small.size}
    again, created = store.open("rank0/own/0", 1 << 12)  # fits: the same slot, not registered twice
    assert again is small and not created and cudart.registered[_ptr(small)] == 1
    bigger, _ = store.open("rank0/own/0", 1 << 20)  # too small now: the old one is released before it goes
    other, _ = store.open("rank0/own/1", 1 << 16)
    assert cudart.unregistered == Counter({_ptr(small): 1})
    assert cudart.pinned == {_ptr(bigger): bigger.size, _ptr(other): other.size}
    assert store.host_bytes() == {"host_pinned": bigger.size + other.size}
    store.close()
    assert cudart.pinned == {} and not cudart.errors
    assert cudart.unregistered == cudart.registered  # each registration undone exactly once
    store.close()  # a second close unregisters nothing
    assert cudart.unregistered == cudart.registered and not cudart.errors


def test_a_failed_registration_is_raised_and_never_unregistered(cudart: FakeCudart) -> None:
    cudart.fail_register = True
    store = SlotStore(None, pin=True)
    with pytest.raises(RuntimeError, match="cudaError 2"):
        store.open("rank0/own/0", 1 << 16)
    assert store.host_bytes() == {"host_pinned": 0}
    store.close()
    assert cudart.errors == [("register", cudart.errors[0][1])]  # no unregister of memory never registered


def test_found_slots_are_registered_and_a_dead_keeper_releases_them(cudart: FakeCudart, tmp_path: Path) -> None:
    path = socket_path(tmp_path / "keeper", "pins", 0)
    writer = keeper_store(path, 30.0, pin=True)
    try:
        writer.keeper.claim(0)
        slot, _ = writer.open("rank0/own/0", 1 << 16)
        slot.begin_write()
        slot.commit(5, 0, 0, 0, "d" * 32)
    finally:
        writer.close()  # the trainer is gone; the keeper holds its slot
    assert cudart.pinned == {} and cudart.unregistered == cudart.registered
    cudart.registered.clear()  # counted afresh for the restarted trainer (its mappings may reuse the addresses)
    cudart.unregistered.clear()

    reader = keeper_store(path, 30.0, pin=True)
    try:
        reader.keeper.claim(0)
        found = reader.committed(["rank0/own/0", "rank0/own/1"])[5]  # recovery finds it ...
        assert cudart.pinned == {_ptr(found): found.size}
        reused, created = reader.open("rank0/own/0", 1 << 16)  # ... and the next snapshot writes into it
        assert reused is found and not created and cudart.registered[_ptr(found)] == 1
        os.kill(reader.keeper.ping()["pid"], signal.SIGKILL)
        time.sleep(0.2)
        assert reader.ensure_keeper(0)  # its slots are opened afresh: the old ones are released first
        assert cudart.pinned == {} and cudart.unregistered == Counter({_ptr(found): 1})
        fresh, created = reader.open("rank0/own/0", 1 << 16)
        assert created and cudart.pinned == {_ptr(fresh): fresh.size}
    finally:
        reader.close(drop_prefix="rank0/")
        KeeperClient(path, 30.0, start=False).shutdown()
    assert cudart.pinned == {} and not cudart.errors
    assert cudart.unregistered == cudart.registered


def test_background_threads_run_on_the_training_device(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """On a multi-GPU node a new thread starts on device 0: the snapshot and flush threads select the device the
    manager was created on (CUDA replaced: the state is on the CPU, only the device calls are recorded)."""
    from memtrain.checkpoint.manager import CheckpointManager
    from memtrain.config import CheckpointConfig

    calls: list[tuple[str, int]] = []
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 3)
    monkeypatch.setattr(torch.cuda, "Stream", lambda *a, **k: None)
    monkeypatch.setattr(torch.cuda, "set_device", lambda d: calls.append((threading.current_thread().name, d)))
    config = CheckpointConfig(snapshot_every_n_steps=1, keeper=False, dirpath=str(tmp_path / "durable"),
                              persist_every_n_snapshots=1)
    manager = CheckpointManager(config, "devices", rank=0, world=1, ranks_per_node=1, device_type="cuda")
    model = nn.Linear(4, 4)
    manager.snapshot(1, {"model": model.state_dict()})
    manager.wait()
    manager.close()
    assert sorted(name.rsplit("_", 1)[0] for name, _ in calls) == ["memtrain-flush", "memtrain-snapshot"]
    assert {device for _, device in calls} == {3}
    assert manager.stats.durable_steps == [1]
