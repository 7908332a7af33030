"""The Hydra app: composition and overrides, config errors, a short real run, and a sweep under torchrun."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

from memtrain import ConfigError
from memtrain.cli.train import CONFIG_DIR, memtrain_config

ROOT = Path(__file__).resolve().parent.parent
QUICK = ["trainer.max_steps=4", "model.n_layer=2", "model.n_embd=32", "model.n_head=2", "model.seq_len=32",
         "data.max_bytes=100000", "data.batch_size=4", "trainer.val_check_interval=2", "trainer.limit_val_batches=2",
         "callbacks.checkpoint_every_n_train_steps=2", "trainer.enable_progress_bar=false"]


def _compose(overrides: list[str]):
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        return compose(config_name="train", overrides=overrides)


def test_overrides_compose_the_hydra_way() -> None:
    cfg = _compose(["strategy=zero2", "model=gpt_small", "trainer.max_steps=50"])
    assert memtrain_config(cfg).sharding.stage == 2
    assert cfg.model.n_layer == 6 and cfg.trainer.max_steps == 50
    assert memtrain_config(_compose([])).sharding.stage == 3
    hybrid = memtrain_config(_compose(["strategy=hybrid", "sharding.shard_size=2"])).sharding
    assert hybrid.hybrid and hybrid.shard_size == 2


def test_bad_override_is_a_clear_error() -> None:
    with pytest.raises(ConfigError, match=r"sharding.stage=7 is not valid: choose one of \[0, 1, 2, 3\]"):
        memtrain_config(_compose(["sharding.stage=7"]))


def _env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}


def test_default_app_runs_on_two_processes(tmp_path: Path) -> None:
    proc = subprocess.run([sys.executable, "-m", "memtrain.cli.train", *QUICK, f"hydra.run.dir={tmp_path}"],
                          cwd=tmp_path, env=_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "memtrain summary: 4 steps on 2 ranks, ZeRO stage 3" in proc.stdout
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["steps"] == 4
    assert all(summary["bytes_per_rank"][k] > 0 for k in ("params", "grads", "optimizer_state"))
    assert (tmp_path / "checkpoints" / "last.ckpt" / ".metadata").is_file()


def test_sweep_without_external_launcher_is_refused(tmp_path: Path) -> None:
    proc = subprocess.run([sys.executable, "-m", "memtrain.cli.train", "-m", "sharding.stage=2,3", *QUICK,
                           f"hydra.sweep.dir={tmp_path}"], cwd=tmp_path, env=_env(), capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode != 0
    assert "Hydra sweeps (-m) must be launched externally" in proc.stderr


@pytest.mark.slow
def test_sweep_under_torchrun(tmp_path: Path) -> None:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           "-m", "memtrain.cli.train", "-m", "launcher=torchrun", "sharding.stage=2,3", *QUICK,
           f"hydra.sweep.dir={tmp_path}"]
    proc = subprocess.run(cmd, cwd=tmp_path, env=_env(), capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    stages = [json.loads((tmp_path / str(job) / "summary.json").read_text())["sharding"]["stage"] for job in (0, 1)]
    assert stages == [2, 3]
