"""Snapshots through the Lightning Trainer: fit() resumes by itself from the keeper after its process was
SIGKILLed, and ModelCheckpoint + fit(ckpt_path="last") go through the durable tier (atomic, checksummed), both
bitwise equal to an uninterrupted run."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import torch

from tests.distributed import run_distributed
from tests.lightning_run import fit

ROOT = Path(__file__).resolve().parent.parent
STEPS, BATCH = 3, 8  # steps per epoch, global batch

RUN = """
import os, signal, sys, torch
sys.path.insert(0, {root!r})
from lightning.pytorch.callbacks import Callback
from tests.lightning_run import fit

class KillAt(Callback):
    def on_train_batch_end(self, trainer, *args):
        if trainer.global_step == {kill_at}:
            trainer.strategy.engine.checkpoints.wait()  # this step's snapshot is committed in the keeper
            os.kill(os.getpid(), signal.SIGKILL)

strategy = {{"zero_stage": 3, "checkpoint": {{"snapshot_every_n_steps": 1, "keeper_dir": {keeper!r}}}}}
callbacks = [KillAt()] if {kill_at} else None
result = fit(0, 1, strategy=strategy, steps=-1, epochs=2, global_batch_size={batch}, data_steps={steps},
             callbacks=callbacks)
torch.save(result, {out!r})
"""


def _run(tmp_path: Path, name: str, kill_at: int) -> subprocess.CompletedProcess:
    script = RUN.format(root=str(ROOT), kill_at=kill_at, keeper=str(tmp_path / "keeper"), batch=BATCH,
                        steps=STEPS, out=str(tmp_path / f"{name}.pt"))
    return subprocess.run([sys.executable, "-c", script], cwd=tmp_path, capture_output=True, text=True, timeout=300, check=False,
                          env={"OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"})


def test_fit_resumes_by_itself_from_the_keeper_after_sigkill(tmp_path: Path) -> None:
    straight = _run(tmp_path, "straight", kill_at=0)
    assert straight.returncode == 0, straight.stderr[-3000:]
    killed = _run(tmp_path, "killed", kill_at=STEPS)  # the end of epoch 1: Lightning resumes with epoch 2
    assert killed.returncode == -9, killed.stderr[-3000:]
    resumed = _run(tmp_path, "resumed", kill_at=0)  # plain fit(), no ckpt_path
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"restored step {STEPS} (ranks [0] from their own keeper)" in resumed.stdout + resumed.stderr
    want, got = torch.load(tmp_path / "straight.pt"), torch.load(tmp_path / "resumed.pt")
    assert got["global_step"] == want["global_step"] == 2 * STEPS
    assert got["losses"] == want["losses"][STEPS:]  # only epoch 2 ran after the restart
    for name, value in want["params"].items():
        assert torch.equal(got["params"][name], value), name


def _checkpointed_and_straight(rank: int, world: int, keeper: str, ckpt_dir: str) -> dict:
    from lightning.pytorch.callbacks import ModelCheckpoint

    from memtrain.checkpoint.manager import CheckpointManager

    persisted: list[str] = []  # saves written from a snapshot in the background (not a synchronous DCP save)
    persist = CheckpointManager.persist
    CheckpointManager.persist = lambda self, path, meta=None: (persisted.append(Path(path).name),  # type: ignore
                                                               persist(self, path, meta))[1]
    strategy = {"zero_stage": 3, "checkpoint": {"snapshot_every_n_steps": 1, "keeper_dir": keeper}}
    common = dict(strategy=strategy, global_batch_size=BATCH, data_steps=STEPS, steps=-1)
    straight = fit(rank, world, epochs=2, **common)
    checkpoint = ModelCheckpoint(dirpath=ckpt_dir, save_last=True, every_n_train_steps=1, save_top_k=2,
                                 monitor="step", mode="max")
    first = fit(rank, world, epochs=1, callbacks=[checkpoint], **common)
    resumed = fit(rank, world, epochs=2, ckpt_path="last", callbacks=[ModelCheckpoint(dirpath=ckpt_dir,
                                                                                      save_last=True)], **common)
    return {"straight": straight, "first": first, "resumed": resumed, "persisted": persisted}


def test_model_checkpoint_writes_from_snapshots_and_resumes_bitwise(tmp_path: Path) -> None:
    ckpt_dir = tmp_path / "ckpts"
    for got in run_distributed(_checkpointed_and_straight, 2, str(tmp_path / "keeper"), str(ckpt_dir)):
        assert "last.ckpt" in got["persisted"] and len(got["persisted"]) >= STEPS, got["persisted"]
        assert got["first"]["losses"] + got["resumed"]["losses"] == got["straight"]["losses"]
        for name, value in got["straight"]["params"].items():
            assert torch.equal(got["resumed"]["params"][name], value), name
    # Written by the durable tier: committed with checksums; top-2 retention left exactly two step folders.
    saved = sorted(p.name for p in ckpt_dir.iterdir())
    assert "last.ckpt" in saved and len([n for n in saved if n.startswith("epoch=")]) >= 2, saved
    for folder in ckpt_dir.iterdir():
        sums = json.loads((folder / "checksums.json").read_text())
        assert "__0_0.distcp" in sums and "__1_0.distcp" in sums
