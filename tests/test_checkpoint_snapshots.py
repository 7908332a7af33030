"""Snapshots in one process: the keeper (permissions, uid check, death), slots, durable folders, a soak test."""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil
import pytest
import torch
import torch.distributed.checkpoint as dcp
from torch import nn

from memtrain.checkpoint import durable
from memtrain.checkpoint.keeper import KeeperClient, socket_path
from memtrain.checkpoint.layout import flatten, unflatten
from memtrain.checkpoint.manager import CheckpointManager
from memtrain.config import CheckpointConfig, ConfigError, MemTrainConfig


def _model_and_optimizer(seed: int = 0) -> tuple[nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(16, 32), nn.BatchNorm1d(32), nn.Linear(32, 4))
    return model, torch.optim.AdamW(model.parameters(), lr=1e-2)


def _train_step(model: nn.Module, optimizer: torch.optim.Optimizer, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    x, y = torch.randn(8, 16, generator=g), torch.randn(8, 4, generator=g)
    nn.functional.mse_loss(model(x), y).backward()
    optimizer.step()
    optimizer.zero_grad()


def _state(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    return {"model": model.state_dict(), "optimizer": optimizer.state_dict()}


def _snapshot(manager: CheckpointManager, step: int, model: nn.Module, optimizer: torch.optim.Optimizer,
              **kwargs) -> None:
    from memtrain.engine import apply_snapshots

    if getattr(optimizer, "_memtrain_snapshots", None) is not manager:  # as the engine does: updates wait
        apply_snapshots(optimizer, manager)  # for the pending copy (without it the next step races the copy)
    # Batch-norm statistics change in the next forward: copied before snapshot() returns (as the engine does).
    manager.snapshot(step, _state(model, optimizer), stable_now=[f"model.{n}" for n, _ in model.named_buffers()],
                     **kwargs)


def _manager(tmp_path: Path, **overrides) -> CheckpointManager:
    config = CheckpointConfig(**{"snapshot_every_n_steps": 1, "keeper_dir": str(tmp_path / "keeper"),
                                 "keeper_idle_timeout_s": 30.0, **overrides})
    return CheckpointManager(config, "test", rank=0, world=1, ranks_per_node=1, device_type="cpu")


def _keeper_pid(tmp_path: Path) -> int:
    client = KeeperClient(socket_path(tmp_path / "keeper", "test", 0), 30.0, start=False)
    try:
        return client.ping()["pid"]
    finally:
        client.close()


def _assert_states_equal(a: nn.Module, b: nn.Module) -> None:
    for (name, x), (_, y) in zip(a.state_dict().items(), b.state_dict().items()):
        assert torch.equal(x, y), name


def test_config_errors_name_the_key() -> None:
    with pytest.raises(ConfigError, match="checkpoint.redundancy"):
        MemTrainConfig.from_dict({"checkpoint": {"snapshot_every_n_steps": 1, "redundancy": "raid"}})
    with pytest.raises(ConfigError, match="checkpoint.dirpath"):
        MemTrainConfig.from_dict({"checkpoint": {"snapshot_every_n_steps": 1, "persist_every_n_snapshots": 2}})
    with pytest.raises(ConfigError, match="snapshots are off"):
        MemTrainConfig.from_dict({"checkpoint": {"redundancy": "replica"}})
    with pytest.raises(ConfigError, match="checkpoint.snapshot_every_n_steps"):
        MemTrainConfig.from_dict({"checkpoint": {"snapshot_every_n_steps": -1}})


def test_replica_redundancy_on_one_node_is_refused(tmp_path: Path) -> None:
    config = CheckpointConfig(snapshot_every_n_steps=1, redundancy="replica", keeper_dir=str(tmp_path))
    with pytest.raises(ConfigError, match="one node"):
        CheckpointManager(config, "test", rank=0, world=2, ranks_per_node=2, device_type="cpu")


def test_layout_round_trip_keeps_values_and_structure() -> None:
    model, optimizer = _model_and_optimizer()
    _train_step(model, optimizer, 0)
    state = _state(model, optimizer)
    skeleton, tensors, layout = flatten(state)
    flat = torch.zeros(layout.data_bytes, dtype=torch.uint8)
    for view, tensor in zip(layout.views(flat), tensors):
        view.copy_(tensor)
    rebuilt = unflatten(skeleton, layout.views(flat))
    assert rebuilt["optimizer"]["param_groups"] == state["optimizer"]["param_groups"]
    for key, value in state["model"].items():
        assert torch.equal(rebuilt["model"][key], value), key
    assert all(e.offset % 64 == 0 for e in layout.entries)
    # Same shapes give the same digest; another shape does not.
    other_model, other_opt = _model_and_optimizer(seed=1)
    _train_step(other_model, other_opt, 1)
    assert flatten(_state(other_model, other_opt))[2].digest == layout.digest
    other_model[0] = nn.Linear(16, 32, bias=False)
    assert flatten({"model": other_model.state_dict()})[2].digest != layout.digest


def test_snapshot_survives_the_trainer_and_restores_bitwise(tmp_path: Path) -> None:
    """A trainer process snapshots and is SIGKILLed; a new process restores from the keeper it left behind."""
    script = f"""
import os, sys, torch
sys.path.insert(0, {str(Path(__file__).parent.parent)!r})
from tests.test_checkpoint_snapshots import _manager, _model_and_optimizer, _snapshot, _train_step
from pathlib import Path
manager = _manager(Path({str(tmp_path)!r}))
model, optimizer = _model_and_optimizer()
for step in range(1, 4):
    _train_step(model, optimizer, step)
    _snapshot(manager, step, model, optimizer, meta={{"step": step}}, rank_state={{"rng": torch.get_rng_state()}})
manager.wait()
torch.save(model.state_dict(), {str(tmp_path / "want.pt")!r})
print("ready", flush=True)
import time; time.sleep(60)
"""
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    keeper = _keeper_pid(tmp_path)
    try:
        model, optimizer = _model_and_optimizer(seed=5)
        _train_step(model, optimizer, 99)  # a different state of the same shapes
        manager = _manager(tmp_path)
        restored = manager.restore(lambda: _state(model, optimizer))
        assert restored is not None and restored.step == 3 and restored.source == "keeper"
        assert restored.meta == {"step": 3}
        model.load_state_dict(restored.state["model"])
        optimizer.load_state_dict(restored.state["optimizer"])
        want = torch.load(tmp_path / "want.pt", weights_only=True)
        for name, value in want.items():
            assert torch.equal(model.state_dict()[name], value), name
        # Both continue identically from here: the optimizer state came back too.
        twin, twin_opt = _model_and_optimizer()
        for step in range(1, 4):
            _train_step(twin, twin_opt, step)
        _train_step(model, optimizer, 4)
        _train_step(twin, twin_opt, 4)
        _assert_states_equal(model, twin)
        manager.close(finished=True)
    finally:
        os.kill(keeper, signal.SIGKILL)


def test_keeper_memory_is_private() -> None:
    # Under /tmp itself, not pytest's 0700 folders: the other-user probe below must be able to reach it.
    tmp_path = Path(tempfile.mkdtemp(prefix="memtrain-keeper-test-"))
    client = KeeperClient(socket_path(tmp_path / "keeper", "test", 0), 30.0)
    try:
        assert (os.stat(tmp_path / "keeper").st_mode & 0o777) == 0o700
        assert (os.stat(socket_path(tmp_path / "keeper", "test", 0)).st_mode & 0o777) == 0o600
        _, created = client.open("rank0/own/0", 8192)
        assert created
        pid = client.ping()["pid"]
        segments = [f"/proc/{pid}/fd/{n}" for n in os.listdir(f"/proc/{pid}/fd")
                    if "memfd:memtrain-rank0/own/0" in os.readlink(f"/proc/{pid}/fd/{n}")]
        assert len(segments) == 1  # anonymous shared memory: no file anyone could open by name
        assert (os.stat(segments[0]).st_mode & 0o777) == 0o600
        if os.getuid() != 0:
            pytest.skip("the other-user check needs root (to run a process as another user)")
        # Another user who reaches the socket anyway (folder opened up) gets nothing: the keeper checks its uid.
        os.chmod(tmp_path / "keeper", 0o777)
        os.chmod(socket_path(tmp_path / "keeper", "test", 0), 0o777)
        os.chmod(tmp_path, 0o777)
        probe = f"""
import os, socket, json
os.setgid(65534); os.setuid(65534)
s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
s.connect({str(socket_path(tmp_path / "keeper", "test", 0))!r})
try:
    s.sendall(json.dumps({{"op": "get", "name": "rank0/own/0"}}).encode())
    data, fds, _, _ = socket.recv_fds(s, 65536, 1)
except OSError:
    data, fds = b"", []
print("refused" if not data and not fds else "served")
"""
        out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=60, check=False)
        assert out.stdout.strip() == "refused", out.stdout + out.stderr
    finally:
        client.shutdown()
        shutil.rmtree(tmp_path, ignore_errors=True)


def test_dead_keeper_is_replaced_and_refilled(tmp_path: Path) -> None:
    model, optimizer = _model_and_optimizer()
    manager = _manager(tmp_path)
    _train_step(model, optimizer, 1)
    _snapshot(manager, 1, model, optimizer)
    manager.wait()
    first = _keeper_pid(tmp_path)
    os.kill(first, signal.SIGKILL)
    time.sleep(0.2)
    _train_step(model, optimizer, 2)
    _snapshot(manager, 2, model, optimizer)
    manager.wait()
    second = _keeper_pid(tmp_path)
    assert second != first
    # A second trainer as the same rank while the first is attached: two runs under one name, refused.
    with pytest.raises(RuntimeError, match="share the job name"):
        _manager(tmp_path)
    manager.close()
    restarted = _manager(tmp_path)
    restored = restarted.restore(lambda: _state(*_model_and_optimizer()))
    # The template has no optimizer state (no step yet): its layout differs, so the snapshot is not used.
    assert restored is None
    twin, twin_opt = _model_and_optimizer(seed=3)
    _train_step(twin, twin_opt, 7)
    restored = restarted.restore(lambda: _state(twin, twin_opt))
    assert restored is not None and restored.step == 2
    restarted.close(finished=True)


def test_durable_flush_commits_checksums_and_retains(tmp_path: Path) -> None:
    model, optimizer = _model_and_optimizer()
    manager = _manager(tmp_path, keeper=False, dirpath=str(tmp_path / "durable"), persist_every_n_snapshots=2,
                       keep_latest_k=2)
    for step in range(1, 9):
        _train_step(model, optimizer, step)
        _snapshot(manager, step, model, optimizer, meta={"step": step})
    manager.wait()
    assert [s for s, _ in durable.committed_steps(tmp_path / "durable")] == [8, 6]
    assert sorted(p.name for p in (tmp_path / "durable").iterdir()) == ["step-6", "step-8"]
    sums = json.loads((tmp_path / "durable" / "step-8" / durable.CHECKSUMS).read_text())
    assert {".metadata", "meta.pt", "__0_0.distcp"} <= set(sums)
    status = manager.status()
    assert status["in_memory_step"] == 8 and status["durable_steps"] == [8, 6]
    manager.close()
    # Plain DCP (no memtrain) reads it.
    plain = {"model": {k: torch.zeros_like(v) for k, v in model.state_dict().items()}}
    dcp.load(plain, checkpoint_id=tmp_path / "durable" / "step-8")
    for key, value in model.state_dict().items():
        assert torch.equal(plain["model"][key], value), key

    # A corrupt shard is detected and the previous checkpoint is used.
    shard = tmp_path / "durable" / "step-8" / "__0_0.distcp"
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))
    fresh, fresh_opt = _model_and_optimizer(seed=4)
    _train_step(fresh, fresh_opt, 50)
    restarted = _manager(tmp_path, keeper=False, dirpath=str(tmp_path / "durable"), persist_every_n_snapshots=2)
    restored = restarted.restore(lambda: _state(fresh, fresh_opt))
    assert restored is not None and restored.step == 6 and restored.source == "durable"
    twin, twin_opt = _model_and_optimizer()
    for step in range(1, 7):
        _train_step(twin, twin_opt, step)
    fresh.load_state_dict(restored.state["model"])
    _assert_states_equal(fresh, twin)
    restarted.close()


def test_torn_folder_is_ignored_and_replacing_a_name_is_atomic(tmp_path: Path) -> None:
    model, optimizer = _model_and_optimizer()
    durable.write_checkpoint(tmp_path / "step-1", _state(model, optimizer), {"step": 1}, None)
    torn = tmp_path / ".step-2.tmp"  # a flush killed midway: never committed
    torn.mkdir()
    (torn / "__0_0.distcp").write_bytes(b"partial")
    assert [s for s, _ in durable.committed_steps(tmp_path)] == [1]
    # Writing over a committed name swaps folders: the new one is complete, the old one is gone.
    _train_step(model, optimizer, 1)
    durable.write_checkpoint(tmp_path / "step-1", _state(model, optimizer), {"step": 1, "again": True}, None)
    durable.verify(tmp_path / "step-1")
    assert torch.load(tmp_path / "step-1" / "meta.pt", weights_only=False)["again"]
    assert durable.retain(tmp_path, 3) == []  # it may still be in progress: nothing newer is committed
    durable.write_checkpoint(tmp_path / "step-3", _state(model, optimizer), {"step": 3}, None)
    assert durable.retain(tmp_path, 3) == [torn]  # older than a commit: abandoned


@pytest.mark.skipif(os.getuid() != 0, reason="mounting a small tmpfs needs root")
def test_full_disk_keeps_training_and_earlier_checkpoints(tmp_path: Path) -> None:
    disk = tmp_path / "small"
    disk.mkdir()
    model, optimizer = _model_and_optimizer()
    _train_step(model, optimizer, 0)
    durable.write_checkpoint(tmp_path / "probe", _state(model, optimizer), {"step": 0}, None)
    size = sum(f.stat().st_size for f in (tmp_path / "probe").iterdir())
    # Room for one checkpoint and a half: the first commits, the second runs out of room midway.
    if subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={int(size * 1.5)}", "tmpfs", str(disk)]).returncode:
        pytest.skip("cannot mount a tmpfs here")
    try:
        manager = _manager(tmp_path, keeper=False, dirpath=str(disk), persist_every_n_snapshots=1, keep_latest_k=5)
        with pytest.warns(UserWarning, match="not written"):
            for step in range(1, 6):
                _train_step(model, optimizer, step)
                _snapshot(manager, step, model, optimizer, meta={"step": step})
                manager.wait()
        status = manager.status()
        assert status["in_memory_step"] == 5 and status["flush_errors"]
        kept = durable.committed_steps(disk)
        assert kept and all(s < 5 for s, _ in kept)
        for _, path in kept:
            durable.verify(path)
        assert not [p for p in disk.iterdir() if p.name.endswith(".tmp")]  # the failed write was cleaned up
        manager.close()
    finally:
        subprocess.run(["umount", str(disk)], check=False)


def test_soak_no_growth_of_memory_or_descriptors(tmp_path: Path) -> None:
    model, optimizer = _model_and_optimizer()
    manager = _manager(tmp_path, dirpath=str(tmp_path / "durable"), persist_every_n_snapshots=10, keep_latest_k=2)
    me = psutil.Process()

    def cycles(first: int, count: int) -> None:
        for step in range(first, first + count):
            _train_step(model, optimizer, step)
            _snapshot(manager, step, model, optimizer, meta={"step": step})
        manager.wait()

    cycles(1, 60)  # warm: slots, keeper connection, flush thread, DCP's first-use allocations
    rss, fds = me.memory_info().rss, me.num_fds()
    cycles(61, 300)
    growth = me.memory_info().rss - rss
    assert me.num_fds() <= fds, (fds, me.num_fds())
    assert growth < 16 << 20, growth  # 300 snapshots, 30 durable flushes
    assert len(durable.committed_steps(tmp_path / "durable")) == 2
    pid = _keeper_pid(tmp_path)
    manager.close(finished=True)
    for _ in range(150):  # holding nothing, the keeper goes (after a grace period for trainers to attach)
        if not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE:
            break
        time.sleep(0.1)
    else:
        raise AssertionError("the keeper did not exit after the job let go of its snapshots")


def test_snapshot_memory_is_accounted_and_updates_wait_for_the_copy(tmp_path: Path) -> None:
    from memtrain.engine import apply_snapshots
    from memtrain.telemetry import account_training_state

    model, optimizer = _model_and_optimizer()
    manager = _manager(tmp_path)
    apply_snapshots(optimizer, manager)
    assert account_training_state(model, optimizer).total("snapshots") == 0
    for step in (1, 2):
        _train_step(model, optimizer, step)
        _snapshot(manager, step, model, optimizer)
        assert manager._pending is not None  # copying in the background
    # The step waited for snapshot 1's copy before updating; snapshot 2 is pending. Two slots are open now.
    report = account_training_state(model, optimizer)
    assert report.total("snapshots") == sum(s.size for s in manager.store._open.values()) > 0
    assert len(manager.store._open) == 2
    optimizer.step()  # waits for the pending copy first
    assert manager._pending is None
    manager.close(finished=True)


def _offloaded_run_restores(rank: int, world: int, tmp: str) -> dict:
    """ZeRO-3 with parameters and optimizer state on NVMe: snapshots read them from the swap files; a new
    engine (as after a restart) restores the snapshot and then trains on exactly like the original."""
    from memtrain import Engine, MemTrainConfig
    from tests.parity import BATCH_SIZE, full_params, global_batch, make_optimizer, rank_backward, tiny_gpt

    config = MemTrainConfig.from_dict({
        "sharding": {"stage": 3},
        "offload": {"optimizer": "nvme", "params": "nvme", "nvme_path": f"{tmp}/nvme", "host_memory_budget": "64MiB"},
        "checkpoint": {"snapshot_every_n_steps": 2, "keeper_dir": f"{tmp}/keeper"},
    })

    def build() -> tuple[Engine, torch.nn.Module, torch.optim.Optimizer]:
        engine = Engine.create(config, world, world, "cpu")
        model = engine.prepare_model(tiny_gpt())
        return engine, model, engine.prepare_optimizer(make_optimizer(model), model)

    def train(engine: Engine, model: torch.nn.Module, optimizer: torch.optim.Optimizer, steps: range) -> None:
        for step in steps:
            rank_backward(engine, model, *global_batch(step, BATCH_SIZE), rank, world)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            engine.snapshot(step + 1, model, optimizer)

    engine, model, optimizer = build()
    train(engine, model, optimizer, range(0, 4))  # snapshots after steps 2 and 4
    train(engine, model, optimizer, range(4, 6))  # the original goes on to step 6
    want = full_params(model)
    engine.checkpoints.wait()
    # What lives on NVMe was snapshotted file to file there: the keeper's memory holds the rest only.
    manager = engine.checkpoints
    layout = manager._last[3]
    on_nvme = [e for e in layout.entries if e.in_file]
    assert {e.path for e in on_nvme} == {e.path for e in layout.entries if e.nbytes > 4}, "scalars stay in memory"
    assert layout.data_bytes < 4096 <= layout.file_bytes
    assert all(manager.files.path(f"rank{rank}/own/{i}").stat().st_size == layout.file_bytes for i in range(2))
    # A restart: the snapshot of step 6 comes back, then both take two more steps.
    engine.close()
    engine, model, optimizer = build()
    restored = engine.restore(model, optimizer)
    assert restored is not None and restored.step == 6 and restored.source == "keeper"
    got_at_restore = full_params(model)
    train(engine, model, optimizer, range(6, 8))
    got = full_params(model)
    files, own = engine.checkpoints.files, engine.checkpoints.own_slots
    engine.close(finished=True)
    assert not any(files.path(name).exists() for name in own), "a finished rank leaves no snapshot files"
    return {"want": want, "at_restore": got_at_restore, "after": got}


def test_offloaded_state_snapshots_and_restores_bitwise(tmp_path: Path) -> None:
    from tests.distributed import run_distributed
    from tests.parity import reference_run

    results = run_distributed(_offloaded_run_restores, 2, str(tmp_path))
    reference = reference_run(8, 8)
    for got in results:
        for name, value in got["want"].items():
            assert torch.equal(got["at_restore"][name], value), name
        for name, value in got["after"].items():
            torch.testing.assert_close(value, reference["params"][name], rtol=1e-5, atol=1e-6)


def _parity_round_trip(rank: int, world: int, lost: int) -> bytes:
    """Three 'nodes' of one rank: each commits a payload of its own length, parity is built, one member forgets
    its snapshot and rebuilds it from the others."""
    from memtrain.checkpoint.parity import ParityGroup
    from memtrain.checkpoint.slots import SlotHeader, SlotStore

    store = SlotStore(None)
    group = ParityGroup(store, rank, world, ranks_per_node=1, group_size=world)
    g = torch.Generator().manual_seed(rank)
    data = torch.randint(0, 256, (1000 + 337 * rank,), dtype=torch.uint8, generator=g)
    own, _ = store.open(f"rank{rank}/own/0", 1 << 16)
    own.begin_write()
    own.data(data.numel()).copy_(data)
    crc = own.write_blob(data.numel(), b"per-rank values %d" % rank)
    header = SlotHeader(7, data.numel(), len(b"per-rank values 0"), crc, "d" * 32)
    own.commit(7, header.data_bytes, header.blob_bytes, crc, header.digest)
    assert group.build(own, header) == 7
    parity = group.held()[7]
    if rank == lost:
        own = None  # its node's memory is gone

    def open_lost(h: SlotHeader):
        slot, _ = store.open(f"rank{rank}/own/1", 1 << 16)
        return slot

    got = group.rebuild(lost, own, parity, open_lost)
    if rank != lost:
        return b""
    assert got is not None and got.step == 7 and got.data_bytes == data.numel()
    rebuilt = store.find(f"rank{rank}/own/1")
    assert torch.equal(rebuilt.data(got.data_bytes), data)
    return bytes(rebuilt.buffer[4096 + got.data_bytes:4096 + got.data_bytes + got.blob_bytes])


def test_xor_parity_rebuilds_a_lost_member() -> None:
    from tests.distributed import run_distributed

    for lost in (0, 2):
        results = run_distributed(_parity_round_trip, 3, lost)
        assert results[lost] == b"per-rank values %d" % lost


def _late_restore_run(rank: int, world: int, tmp: str, stage: int) -> dict:
    """A restart from the keeper: the optimizer state arrives after restore() returns, into the very tensors the
    optimizer steps with, and training goes on exactly as if it had never stopped."""
    from memtrain import Engine, MemTrainConfig
    from memtrain.checkpoint.state import holds_all
    from tests.parity import BATCH_SIZE, full_params, global_batch, make_optimizer, rank_backward, tiny_gpt

    config = MemTrainConfig.from_dict({"sharding": {"stage": stage},
                                       "checkpoint": {"snapshot_every_n_steps": 1, "keeper_dir": f"{tmp}/keeper"}})

    def build() -> tuple[Engine, nn.Module, torch.optim.Optimizer]:
        engine = Engine.create(config, world, world, "cpu")
        model = engine.prepare_model(tiny_gpt())
        return engine, model, engine.prepare_optimizer(make_optimizer(model), model)

    def train(engine: Engine, model: nn.Module, optimizer: torch.optim.Optimizer, steps: range,
              snapshots: bool = True) -> None:
        for step in steps:
            rank_backward(engine, model, *global_batch(step, BATCH_SIZE), rank, world)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            if snapshots:
                engine.snapshot(step + 1, model, optimizer)

    engine, model, optimizer = build()
    train(engine, model, optimizer, range(0, 5))
    engine.checkpoints.wait()
    train(engine, model, optimizer, range(5, 7), snapshots=False)  # the run that never stopped
    want = full_params(model)
    engine.close()  # not finished: the keeper keeps the snapshot of step 5
    engine, model, optimizer = build()
    restored = engine.restore(model, optimizer)
    assert restored is not None and restored.step == 5 and restored.source == "keeper"
    assert restored.late, "the optimizer state should be filled in the background"
    assert holds_all([optimizer], restored.late), "the late tensors must be the optimizer's own"
    train(engine, model, optimizer, range(5, 7))
    assert engine.checkpoints.stats.restore_complete_s is not None
    got = full_params(model)
    engine.close(finished=True)
    return {"want": want, "got": got}


@pytest.mark.parametrize("stage", [0, 3])
def test_restore_fills_optimizer_state_late_and_training_matches(tmp_path: Path, stage: int) -> None:
    from tests.distributed import run_distributed

    for result in run_distributed(_late_restore_run, 2, str(tmp_path), stage):
        for name, value in result["got"].items():
            assert torch.equal(value, result["want"][name]), name


def _copying_load_run(rank: int, world: int, tmp: str) -> None:
    import threading

    from memtrain import Engine, MemTrainConfig

    config = MemTrainConfig.from_dict({"sharding": {"stage": 0},
                                       "checkpoint": {"snapshot_every_n_steps": 1, "keeper_dir": f"{tmp}/keeper"}})

    def build() -> tuple[Engine, nn.Module, torch.optim.Optimizer]:
        engine = Engine.create(config, world, world, "cpu")
        model = engine.prepare_model(_model_and_optimizer()[0])
        return engine, model, engine.prepare_optimizer(torch.optim.AdamW(model.parameters(), lr=1e-2), model)

    engine, model, optimizer = build()
    for step in range(1, 4):
        _train_step(model, optimizer, step)
        engine.snapshot(step, model, optimizer)
    engine.checkpoints.wait()
    want = {id_: {k: v.clone() for k, v in s.items()} for id_, s in optimizer.state_dict()["state"].items()}
    engine.close()

    engine, model, optimizer = build()
    release = threading.Event()
    engine.checkpoints._snapshot_thread.submit(release.wait)  # the late copy cannot start before the load
    original = Engine._apply_loaded

    def copying_load(model_: nn.Module, optimizer_: torch.optim.Optimizer, state: dict, rank_state: dict | None):
        original(model_, optimizer_, state, rank_state)
        for s in optimizer_.state.values():
            for key, value in s.items():
                if isinstance(value, torch.Tensor) and value.dim() > 0:
                    s[key] = value.clone()  # as a load that copies would leave it
        release.set()

    Engine._apply_loaded = staticmethod(copying_load)  # type: ignore[method-assign]
    try:
        restored = engine.restore(model, optimizer)
    finally:
        Engine._apply_loaded = staticmethod(original)  # type: ignore[method-assign]
    assert restored is not None and restored.step == 3
    for id_, s in optimizer.state_dict()["state"].items():
        for key, value in s.items():
            assert torch.equal(value, want[id_][key]), (id_, key)
    engine.close(finished=True)


def test_a_load_that_copies_the_state_gets_it_whole(tmp_path: Path) -> None:
    """Should a load copy optimizer state instead of adopting the restored tensors, the late copy is waited
    for and the state loaded again: it is never loaded half-filled."""
    from tests.distributed import run_distributed

    run_distributed(_copying_load_run, 1, str(tmp_path))


def test_the_update_waits_for_the_copy_after_the_closure() -> None:
    """Lightning hands forward and backward to optimizer.step as a closure: they must run before the wait for the
    snapshot copy (overlapping it), and the update after it. LBFGS, which calls its closure again, waits first."""
    from memtrain.engine import apply_snapshots

    class Manager:
        def __init__(self, events: list[str]) -> None:
            self.events = events

        def wait_copied(self) -> None:
            self.events.append("wait")

    for optimizer_class, want in ((torch.optim.AdamW, ["closure", "wait", "update"]),
                                  (torch.optim.LBFGS, ["wait", "closure", "update"])):
        events: list[str] = []
        weight = nn.Parameter(torch.ones(3))
        optimizer = optimizer_class([weight], lr=0.1)
        optimizer.register_step_post_hook(lambda *_: events.append("update"))
        apply_snapshots(optimizer, Manager(events))  # type: ignore[arg-type]

        def closure() -> torch.Tensor:
            events.append("closure")
            optimizer.zero_grad()
            loss = (weight ** 2).sum()
            loss.backward()
            return loss

        loss = optimizer.step(closure)
        assert events[:2] == want[:2] and events[-1] == "update", (optimizer_class.__name__, events)
        assert float(loss) == 3.0
        if optimizer_class is torch.optim.AdamW:
            assert not torch.equal(weight.detach(), torch.ones(3))  # the update used the closure's gradients


_NVME_TRAINER = """
import sys, torch, torch.distributed as dist
sys.path.insert(0, {repo!r})
from memtrain import Engine, MemTrainConfig
from tests.parity import BATCH_SIZE, full_params, global_batch, make_optimizer, rank_backward, tiny_gpt
dist.init_process_group("gloo", init_method="file://{tmp}/pg-" + sys.argv[1], rank=0, world_size=1)
config = MemTrainConfig.from_dict({{
    "sharding": {{"stage": 3}},
    "offload": {{"optimizer": "nvme", "params": "nvme", "nvme_path": "{tmp}/nvme", "host_memory_budget": "64MiB"}},
    "checkpoint": {{"snapshot_every_n_steps": 1, "keeper_dir": "{tmp}/keeper", "job_name": "nvme-kill",
                    "dirpath": "{tmp}/durable", "persist_every_n_snapshots": 3}},
}})
engine = Engine.create(config, 1, 1, "cpu")
model = engine.prepare_model(tiny_gpt())
optimizer = engine.prepare_optimizer(make_optimizer(model), model)

def step(i):
    rank_backward(engine, model, *global_batch(i, BATCH_SIZE), 0, 1)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)

if sys.argv[1] == "victim":
    for i in range(3):
        step(i)
        engine.snapshot(i + 1, model, optimizer)
    engine.checkpoints.wait()
    torch.save(full_params(model), "{tmp}/at3.pt")
    step(3)  # the run that never stopped: one more step, no snapshot of it
    torch.save(full_params(model), "{tmp}/want.pt")
    print("ready", flush=True)
    import time; time.sleep(120)
else:
    restored = engine.restore(model, optimizer)
    assert restored is not None and restored.step == 3 and restored.source == "keeper", restored
    step(3)
    torch.save(full_params(model), "{tmp}/got.pt")
    engine.close(finished=True)
"""


def test_nvme_snapshot_survives_a_killed_trainer(tmp_path: Path) -> None:
    """State offloaded to NVMe, snapshotted to files there: the trainer is SIGKILLed (its swap files are gone
    with it), a new one restores from the keeper's headers and the snapshot files and goes on bitwise."""
    script = _NVME_TRAINER.format(repo=str(Path(__file__).parent.parent), tmp=str(tmp_path))
    victim = subprocess.Popen([sys.executable, "-c", script, "victim"], stdout=subprocess.PIPE, text=True)
    keeper = None
    try:
        assert victim.stdout is not None and victim.stdout.readline().strip() == "ready"
        keeper = KeeperClient(socket_path(tmp_path / "keeper", "nvme-kill", 0), 30.0, start=False).ping()["pid"]
        victim.send_signal(signal.SIGKILL)
        victim.wait()
        snapshots = list((tmp_path / "nvme" / "memtrain-snapshots" / "nvme-kill").iterdir())
        assert len(snapshots) == 2 and all(p.stat().st_size > 0 for p in snapshots)
        subprocess.run([sys.executable, "-c", script, "restart"], check=True, timeout=180)
        want = torch.load(tmp_path / "want.pt", weights_only=True)
        got = torch.load(tmp_path / "got.pt", weights_only=True)
        for name, value in want.items():
            assert torch.equal(got[name], value), name
        # The durable flush of step 3 read the NVMe part from the snapshot files; plain DCP loads it.
        at3 = torch.load(tmp_path / "at3.pt", weights_only=True)
        plain = {"model": {name: torch.zeros_like(value) for name, value in at3.items()}}
        dcp.load(plain, checkpoint_id=tmp_path / "durable" / "step-3")
        for name, value in at3.items():
            assert torch.equal(plain["model"][name], value), name
    finally:
        victim.kill()
        if keeper is not None:
            try:
                os.kill(keeper, signal.SIGKILL)
            except ProcessLookupError:
                pass
