"""NVMe offload through the Lightning Trainer: parity with the same strategy without offload (clipping and
accumulation included), ModelCheckpoint + fit(ckpt_path=...) resume, and the registered strategy names."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tests.distributed import run_distributed
from tests.lightning_run import fit
from tests.parity import assert_close_params

STEPS, BATCH = 3, 8


def _fit(rank: int, world: int, kw: dict) -> dict:
    return fit(rank, world, **kw)


def test_nvme_offload_matches_no_offload_with_clipping_and_accumulation(tmp_path: Path) -> None:
    common = dict(steps=STEPS, global_batch_size=BATCH, accumulate=2, build_in_configure_model=True,
                  trainer={"gradient_clip_val": 0.05, "gradient_clip_algorithm": "norm"})
    want = run_distributed(_fit, 2, dict(strategy={"zero_stage": 3}, **common))[0]
    nvme = {"zero_stage": 3, "offload_params": "nvme", "offload_optimizer": "nvme", "nvme_path": str(tmp_path),
            "host_memory_budget": "64MiB"}
    for got in run_distributed(_fit, 2, dict(strategy=nvme, **common)):
        # The user's AdamW(foreach) against the offloaded fused CPU kernel: equal to rounding.
        torch.testing.assert_close(got["losses"], want["losses"], rtol=1e-6, atol=0)
        assert_close_params(got["params"], want["params"], rtol=1e-5, atol=1e-7)
    assert not list(tmp_path.glob("memtrain-swap-*"))  # the run's swap folder is gone after fit


def _interrupted_and_straight(rank: int, world: int, nvme: str, ckpt_dir: str) -> dict:
    from lightning.pytorch.callbacks import ModelCheckpoint

    strategy = {"zero_stage": 3, "offload_params": "nvme", "offload_optimizer": "nvme", "nvme_path": nvme}
    common = dict(strategy=strategy, global_batch_size=BATCH, data_steps=STEPS, steps=-1)
    straight = fit(rank, world, epochs=2, **common)
    first = fit(rank, world, epochs=1, callbacks=[ModelCheckpoint(dirpath=ckpt_dir, save_last=True)], **common)
    resumed = fit(rank, world, epochs=2, ckpt_path=str(Path(ckpt_dir) / "last.ckpt"), **common)
    return {"straight": straight, "first": first, "resumed": resumed}


def test_nvme_offload_checkpoint_resumes_bitwise(tmp_path: Path) -> None:
    for got in run_distributed(_interrupted_and_straight, 2, str(tmp_path / "nvme"), str(tmp_path / "ckpts")):
        assert got["first"]["losses"] + got["resumed"]["losses"] == got["straight"]["losses"]
        for name, value in got["straight"]["params"].items():
            assert torch.equal(got["resumed"]["params"][name], value), name


@pytest.mark.parametrize("namespace", ["lightning.pytorch", "pytorch_lightning"])
def test_offload_strategy_names(namespace: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import importlib

    import memtrain  # noqa: F401  (registers the names)
    from memtrain import ConfigError

    pl = importlib.import_module(namespace)
    trainer = pl.Trainer(strategy="memtrain_zero3_offload", accelerator="cpu", devices=2, logger=False)
    offload = trainer.strategy.memtrain_config.offload
    assert (offload.optimizer, offload.params) == ("cpu", "cpu")
    monkeypatch.delenv("MEMTRAIN_NVME_PATH", raising=False)
    with pytest.raises(ConfigError, match="MEMTRAIN_NVME_PATH"):
        pl.Trainer(strategy="memtrain_zero3_nvme", accelerator="cpu", devices=2, logger=False)
    monkeypatch.setenv("MEMTRAIN_NVME_PATH", str(tmp_path))
    trainer = pl.Trainer(strategy="memtrain_zero3_nvme", accelerator="cpu", devices=2, logger=False)
    offload = trainer.strategy.memtrain_config.offload
    assert (offload.optimizer, offload.params, offload.nvme_path) == ("nvme", "nvme", str(tmp_path))
