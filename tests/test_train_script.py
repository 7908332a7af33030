"""scripts/train.py under torchrun: parity with its plain single-process run, bitwise resume, Hydra overrides."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import torch

from memtrain.checkpoint import consolidate

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = str(ROOT / "scripts" / "train.py")
# No biases: the key bias has a zero true gradient, whose round-off Adam would amplify (see tests/parity.py).
SMALL = ["model.bias=false", "model.n_layer=2", "model.n_embd=32", "model.n_head=2", "model.seq_len=32", "data.max_bytes=100000",
         "trainer.log_every_n_steps=1", "optim.warmup_steps=2", "trainer.max_steps=6"]


def _run(cmd: list[str], cwd: Path) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    line = next(l for l in proc.stdout.splitlines() if l.startswith("memtrain summary: "))
    return json.loads(line.removeprefix("memtrain summary: "))


def torchrun(nproc: int, overrides: list[str], cwd: Path) -> dict:
    return _run([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
                 SCRIPT, *overrides], cwd)


def test_torchrun_matches_plain_run_and_resumes_bitwise(tmp_path: Path) -> None:
    straight_dir, split_dir = tmp_path / "straight", tmp_path / "split"
    # Global batch 8 either way: 2 ranks x 4 samples, or the plain run's 8 (same samples in each step).
    two_ranks = SMALL + ["data.batch_size=4", "sharding.stage=3"]
    torchrun(2, two_ranks + [f"callbacks.checkpoint_dir={straight_dir}"], tmp_path)
    _run([sys.executable, SCRIPT, "--plain", *SMALL, "data.batch_size=8", f"callbacks.checkpoint_dir={tmp_path}"],
         tmp_path)
    got = consolidate(straight_dir / "step-6", tmp_path / "straight.pt")
    want = torch.load(tmp_path / "step-6.pt", weights_only=True)
    assert got.keys() == want.keys()
    for name, value in want.items():
        torch.testing.assert_close(got[name], value, rtol=1e-5, atol=1e-6, msg=lambda m, n=name: f"{n}: {m}")

    # Interrupted at step 3 and resumed: bitwise equal to the straight run.
    torchrun(2, two_ranks + [f"callbacks.checkpoint_dir={split_dir}", "trainer.max_steps=3"], tmp_path)
    torchrun(2, two_ranks + [f"callbacks.checkpoint_dir={split_dir}", f"ckpt_path={split_dir / 'step-3'}"], tmp_path)
    resumed = consolidate(split_dir / "step-6", tmp_path / "resumed.pt")
    for name, value in got.items():
        assert torch.equal(resumed[name], value), name


def test_exit_worker_flushes_output_and_keeps_the_exit_code(tmp_path: Path) -> None:
    # Piped stdout is block-buffered: without the flush, os._exit would drop the line.
    code = ("import logging, sys; from memtrain.distributed import exit_worker\n"
            "logging.basicConfig(stream=sys.stderr, level=logging.INFO)\n"
            "print('summary line'); logging.getLogger('t').info('log line'); exit_worker(3)\n"
            "print('not reached')\n")
    proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONPATH": str(ROOT), "PYTHONUNBUFFERED": ""})
    assert proc.returncode == 3
    assert proc.stdout == "summary line\n"
    assert "log line" in proc.stderr
