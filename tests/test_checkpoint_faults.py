"""Fault injection with real processes: scripts/train.py under torchrun, SIGKILLed, resumed bitwise.

- a rank killed at a random step: torchrun restarts the workers, they restore from their node's keeper;
- a whole simulated node (its torchrun agent, trainer and keeper) killed: the job is relaunched, the lost
  rank's snapshot comes back from its replica on the next node, or is rebuilt from XOR parity (3 nodes);
- the job killed while a durable checkpoint is being written: the torn folder is ignored, the previous
  checkpoint loads; a corrupted shard is detected by its checksum and the one before is used.
Each run's final parameters are compared bitwise with an uninterrupted run.
"""
from __future__ import annotations

import os
import random
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import torch

from memtrain.checkpoint import consolidate
from memtrain.checkpoint.keeper import KeeperClient, socket_path

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = str(ROOT / "scripts" / "train.py")
STEPS = 24  # long enough that a kill after step STEPS // 2 lands well before the end
SMALL = ["model.bias=false", "model.n_layer=2", "model.n_embd=32", "model.n_head=2", "model.seq_len=32",
         "data.max_bytes=100000", "data.batch_size=4", "trainer.log_every_n_steps=1", "optim.warmup_steps=2",
         f"trainer.max_steps={STEPS}", f"callbacks.checkpoint_every_n_train_steps={STEPS}"]
# Big enough that writing a durable checkpoint takes tens of milliseconds: a kill lands inside it.
FLUSH_STEPS = 8
LARGER = [a for a in SMALL if not a.startswith(("model.n_", "trainer.max_steps", "callbacks.checkpoint_every"))] + [
    "model.n_embd=192", "model.n_layer=4", "model.n_head=4", f"trainer.max_steps={FLUSH_STEPS}",
    f"callbacks.checkpoint_every_n_train_steps={FLUSH_STEPS}"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(args: list[str], cwd: Path, *, restarts: int = 0, nodes: tuple[int, int] | None = None,
            job: str = "job", port: int | None = None) -> subprocess.Popen:
    """torchrun with 2 ranks on one (simulated) node, or node ``nodes[0]`` of ``nodes[1]`` with 1 rank each."""
    if nodes is None:
        launch = ["--standalone", "--nproc-per-node=2"]
    else:
        launch = [f"--nnodes={nodes[1]}", f"--node-rank={nodes[0]}", "--nproc-per-node=1", "--master-addr=127.0.0.1",
                  f"--master-port={port}"]
    cmd = [sys.executable, "-m", "torch.distributed.run", *launch, f"--rdzv-id={job}", f"--max-restarts={restarts}",
           SCRIPT, *args]
    return subprocess.Popen(cmd, cwd=cwd, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)


def _trainers(agent: subprocess.Popen) -> list[psutil.Process]:
    try:
        children = psutil.Process(agent.pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return []
    found = []
    for child in children:
        try:
            if any("train.py" in part for part in child.cmdline()):
                found.append(child)
        except psutil.Error:  # exited (or a zombie) meanwhile
            pass
    return found


def _finish(proc: subprocess.Popen, lines: list[str], timeout: float = 240.0) -> str:
    assert proc.stdout is not None
    deadline = time.monotonic() + timeout
    for line in proc.stdout:
        lines.append(line)
        if time.monotonic() > deadline:
            proc.kill()
            break
    proc.wait(timeout=30)
    return "".join(lines)


def _run(args: list[str], cwd: Path) -> str:
    out = _finish(_launch(args, cwd), [])
    assert "memtrain summary" in out, out[-4000:]
    return out


def _kill_keeper(keeper_dir: Path, job: str, node: int) -> None:
    client = KeeperClient(socket_path(keeper_dir, job, node), 30.0, start=False)
    pid = client.ping()["pid"]
    client.close()
    os.kill(pid, signal.SIGKILL)


def _shutdown_keepers(keeper_dir: Path) -> None:
    for sock in keeper_dir.glob("*.sock"):
        try:
            KeeperClient(sock, 30.0, start=False).shutdown()
        except OSError:
            pass


def _final(ckpt_dir: Path, out: Path, steps: int = STEPS) -> dict[str, torch.Tensor]:
    return consolidate(ckpt_dir / f"step-{steps}", out)


def _assert_bitwise(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor], context: str) -> None:
    assert got.keys() == want.keys()
    for name, value in want.items():
        assert torch.equal(got[name], value), f"{name} differs ({context})"


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> dict[str, torch.Tensor]:
    """The uninterrupted run's final parameters."""
    tmp = tmp_path_factory.mktemp("reference")
    _run(SMALL + [f"callbacks.checkpoint_dir={tmp / 'ckpt'}"], tmp)
    return _final(tmp / "ckpt", tmp / "final.pt")


def _nodes(count: int, args: list[str], cwd: Path, job: str) -> list[subprocess.Popen]:
    port = _free_port()
    return [_launch(args, cwd, nodes=(n, count), job=job, port=port) for n in range(count)]


def test_killed_rank_resumes_from_its_keeper_bitwise(tmp_path: Path, reference: dict[str, torch.Tensor]) -> None:
    seed = random.randrange(1 << 30)
    kill_after = random.Random(seed).randint(2, STEPS // 2)
    keeper_dir = tmp_path / "keeper"
    args = SMALL + ["checkpoint.snapshot_every_n_steps=1", f"checkpoint.keeper_dir={keeper_dir}",
                    f"callbacks.checkpoint_dir={tmp_path / 'ckpt'}"]
    proc = _launch(args, tmp_path, restarts=2, job="kill-rank")
    lines: list[str] = []
    assert proc.stdout is not None
    victim = None
    try:
        for line in proc.stdout:
            lines.append(line)
            if victim is None and line.startswith(f"step {kill_after}/"):
                victim = random.Random(seed).choice(_trainers(proc))
                victim.send_signal(signal.SIGKILL)
                break
        out = _finish(proc, lines)
    finally:
        _shutdown_keepers(keeper_dir)
    context = f"killed a rank after step {kill_after}, seed {seed}"
    assert victim is not None and "memtrain summary" in out, f"{context}\n{out[-4000:]}"
    assert "from their own keeper" in out, out[-4000:]
    _assert_bitwise(_final(tmp_path / "ckpt", tmp_path / "final.pt"), reference, context)


@pytest.mark.parametrize(("redundancy", "nodes", "source"), [
    ("replica", 2, "ranks [0] from their own keeper; ranks [1] from peer replicas"),
    ("xor", 3, "ranks [0, 2] from their own keeper; ranks [1] from XOR parity of their group"),
])
def test_lost_node_recovers_from_redundancy_bitwise(tmp_path: Path, redundancy: str, nodes: int, source: str) -> None:
    # The reference has the same layout (nodes of one rank): gloo's reduction order follows the topology.
    agents = _nodes(nodes, SMALL + [f"callbacks.checkpoint_dir={tmp_path / 'reference'}"], tmp_path, "reference")
    assert "memtrain summary" in _finish(agents[0], [])
    for agent in agents[1:]:
        _finish(agent, [])
    want = _final(tmp_path / "reference", tmp_path / "want.pt")
    seed = random.randrange(1 << 30)
    kill_after = random.Random(seed).randint(2, STEPS // 2)
    keeper_dir = tmp_path / "keeper"
    args = SMALL + ["checkpoint.snapshot_every_n_steps=1", f"checkpoint.keeper_dir={keeper_dir}",
                    f"checkpoint.redundancy={redundancy}", f"checkpoint.parity_group_size={nodes}",
                    f"callbacks.checkpoint_dir={tmp_path / 'ckpt'}"]
    try:
        launched = _nodes(nodes, args, tmp_path, "lost-node")
        lines: list[str] = []
        assert launched[0].stdout is not None
        for line in launched[0].stdout:
            lines.append(line)
            if line.startswith(f"step {kill_after}/"):
                break
        assert "memtrain summary" not in "".join(lines)
        # Node 1 is lost whole: agent, trainer and keeper. The scheduler then stops what remains of the job
        # (the other nodes' agents and trainers; their keepers survive) and requeues it.
        _kill_keeper(keeper_dir, "lost-node", 1)
        for agent in [launched[1]] + launched[:1] + launched[2:]:
            for trainer in _trainers(agent):  # torchrun starts each worker in a session of its own
                trainer.send_signal(signal.SIGKILL)
            agent.send_signal(signal.SIGKILL)
            agent.wait(timeout=30)
        relaunched = _nodes(nodes, args, tmp_path, "lost-node")
        out = _finish(relaunched[0], [])
        for agent in relaunched[1:]:
            _finish(agent, [])
    finally:
        _shutdown_keepers(keeper_dir)
    context = f"lost node 1 after step {kill_after}, seed {seed}"
    assert "memtrain summary" in out, f"{context}\n{out[-4000:]}"
    assert source in out, out[-4000:]
    _assert_bitwise(_final(tmp_path / "ckpt", tmp_path / "final.pt"), want, context)


def test_kill_during_flush_and_corrupt_shard_fall_back(tmp_path: Path) -> None:
    want_dir = tmp_path / "reference"
    _run(LARGER + [f"callbacks.checkpoint_dir={want_dir}"], tmp_path)
    want = _final(want_dir, tmp_path / "want.pt", FLUSH_STEPS)

    durable_dir = tmp_path / "durable"
    # No keeper: the trainers' memory dies with them, so the restart must come from the durable folder.
    args = LARGER + ["checkpoint.snapshot_every_n_steps=1", "checkpoint.keeper=false",
                     f"checkpoint.dirpath={durable_dir}", "checkpoint.persist_every_n_snapshots=1"]
    proc = _launch(args + [f"callbacks.checkpoint_dir={tmp_path / 'ckpt'}"], tmp_path, restarts=1, job="flush")
    torn = None
    deadline = time.monotonic() + 180
    while torn is None and proc.poll() is None and time.monotonic() < deadline:
        if durable_dir.is_dir():
            writing = [p for p in durable_dir.iterdir() if p.name.startswith(".step-") and p.name.endswith(".tmp")]
            if writing and int(writing[0].name[len(".step-"):-len(".tmp")]) >= 3:
                for trainer in _trainers(proc):
                    trainer.send_signal(signal.SIGKILL)
                torn = writing[0]
        time.sleep(0.001)
    out = _finish(proc, [])
    assert torn is not None, out[-4000:]
    step = int(torn.name[len(".step-"):-len(".tmp")])
    assert f"restored step {step - 1} (ranks [0, 1] from {durable_dir / f'step-{step - 1}'})" in out, out[-4000:]
    _assert_bitwise(_final(tmp_path / "ckpt", tmp_path / "got.pt", FLUSH_STEPS), want,
                    f"killed while writing step {step}")

    # A shard of the newest checkpoint corrupted on disk: the checksum catches it, the previous one is used.
    newest = durable_dir / f"step-{FLUSH_STEPS}"
    shard = newest / "__1_0.distcp"
    data = bytearray(shard.read_bytes())
    data[len(data) // 3] ^= 0x01
    shard.write_bytes(bytes(data))
    out = _finish(_launch(args + [f"callbacks.checkpoint_dir={tmp_path / 'again'}"], tmp_path, job="corrupt"), [])
    assert f"{shard} fails its checksum" in out, out[-4000:]
    assert f"restored step {FLUSH_STEPS - 1}" in out, out[-4000:]
    _assert_bitwise(_final(tmp_path / "again", tmp_path / "again.pt", FLUSH_STEPS), want, "corrupted shard")
