"""MemTrainStrategy through the Lightning Trainer: parity with a single-process run, features, checkpoints."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tests.distributed import run_distributed
from tests.lightning_run import fit
from tests.parity import assert_close_params, full_params, reference_run

STEPS, BATCH = 4, 8


@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_stage_matches_reference_through_trainer(stage: int) -> None:
    want = reference_run(STEPS, BATCH)
    kw = dict(strategy={"zero_stage": stage}, steps=STEPS, global_batch_size=BATCH,
              build_in_configure_model=stage == 3)
    for got in run_distributed(_fit, 2, kw):
        torch.testing.assert_close(got["losses"], want["losses"], rtol=1e-5, atol=0)
        assert_close_params(got["params"], want["params"])


def _fit(rank: int, world: int, kw: dict) -> dict:
    return fit(rank, world, **kw)


def test_hybrid_with_accumulation_and_clipping_on_four_ranks() -> None:
    want = reference_run(STEPS, BATCH, clip=0.5, accumulate=2)
    kw = dict(strategy={"zero_stage": 3, "hybrid": True, "shard_size": 2}, steps=STEPS, global_batch_size=BATCH,
              accumulate=2, trainer={"gradient_clip_val": 0.5, "gradient_clip_algorithm": "norm"})
    for got in run_distributed(_fit, 4, kw):
        torch.testing.assert_close(got["losses"], want["losses"], rtol=1e-5, atol=0)
        assert_close_params(got["params"], want["params"])


def test_bf16_mixed_matches_an_autocast_reference() -> None:
    want = reference_run(STEPS, BATCH, bf16=True)
    kw = dict(strategy={"zero_stage": 2}, steps=STEPS, global_batch_size=BATCH, trainer={"precision": "bf16-mixed"})
    for got in run_distributed(_fit, 2, kw):
        # bf16 matmuls on half-size batches round differently from the reference's: compare loosely.
        torch.testing.assert_close(got["losses"], want["losses"], rtol=2e-2, atol=0)
        assert_close_params(got["params"], want["params"], rtol=0, atol=2e-2)


def _interrupted_and_straight(rank: int, world: int, ckpt_dir: str) -> dict:
    from lightning.pytorch.callbacks import ModelCheckpoint

    # Epoch-end checkpoints: Lightning replays a plain DataLoader from the epoch start when resuming mid-epoch.
    common = dict(strategy={"zero_stage": 3}, global_batch_size=BATCH, data_steps=STEPS, steps=-1)
    straight = fit(rank, world, epochs=2, **common)
    first = fit(rank, world, epochs=1, callbacks=[ModelCheckpoint(dirpath=ckpt_dir, save_last=True)], **common)
    resumed = fit(rank, world, epochs=2, ckpt_path=str(Path(ckpt_dir) / "last.ckpt"), **common)
    return {"straight": straight, "first": first, "resumed": resumed}


def test_model_checkpoint_and_fit_ckpt_path_resume_bitwise(tmp_path: Path) -> None:
    for got in run_distributed(_interrupted_and_straight, 2, str(tmp_path / "ckpts")):
        assert got["resumed"]["global_step"] == 2 * STEPS
        assert got["first"]["losses"] + got["resumed"]["losses"] == got["straight"]["losses"]
        for name, value in got["straight"]["params"].items():
            assert torch.equal(got["resumed"]["params"][name], value), name
    assert (tmp_path / "ckpts" / "last.ckpt" / ".metadata").is_file()


@pytest.mark.parametrize(
    "name, stage, hybrid",
    [("memtrain", 3, False), ("memtrain_zero1", 1, False), ("memtrain_zero2", 2, False),
     ("memtrain_zero3", 3, False), ("memtrain_hybrid", 3, True)],
)
@pytest.mark.parametrize("namespace", ["lightning.pytorch", "pytorch_lightning"])
def test_registered_names(namespace: str, name: str, stage: int, hybrid: bool) -> None:
    import importlib

    import memtrain  # noqa: F401  (registers the names)
    from memtrain.strategies.strategy import strategy_class

    pl = importlib.import_module(namespace)
    trainer = pl.Trainer(strategy=name, accelerator="cpu", devices=2, logger=False)
    assert isinstance(trainer.strategy, strategy_class(namespace))
    assert trainer.strategy.memtrain_config.sharding.stage == stage
    assert trainer.strategy.memtrain_config.sharding.hybrid is hybrid


def test_strategy_keywords_are_validated_before_training() -> None:
    from memtrain import ConfigError
    from memtrain.strategies import MemTrainStrategy

    with pytest.raises(ConfigError, match="sharding.stage=5"):
        MemTrainStrategy(zero_stage=5)
    strategy = MemTrainStrategy({"sharding": {"stage": 1}}, wrap=["Block"])
    assert strategy.memtrain_config.sharding.stage == 1
    assert strategy.memtrain_config.sharding.wrap == ("Block",)


def test_devices_that_disagree_with_torchrun_fail_before_any_process_group(monkeypatch: pytest.MonkeyPatch) -> None:
    import lightning.pytorch as L
    import torch.distributed as dist

    from memtrain import ConfigError
    from memtrain.strategies import MemTrainStrategy
    from tests.lightning_run import TinyModule

    for key, value in {"TORCHELASTIC_RUN_ID": "job", "WORLD_SIZE": "4", "LOCAL_WORLD_SIZE": "4", "RANK": "0",
                       "LOCAL_RANK": "0", "GROUP_RANK": "0", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29777"}.items():
        monkeypatch.setenv(key, value)
    trainer = L.Trainer(accelerator="cpu", devices=2, strategy=MemTrainStrategy(), max_steps=1, logger=False)
    with pytest.raises(ConfigError, match="devices=2 but torchrun started 4 processes per node"):
        trainer.fit(TinyModule(), [])
    assert not dist.is_initialized()


def test_fp16_loss_scaling_is_refused_with_a_fix() -> None:
    from types import SimpleNamespace

    from memtrain import ConfigError
    from memtrain.strategies.strategy import check_precision

    check_precision(SimpleNamespace(precision="bf16-mixed"))  # no scaler: fine
    with pytest.raises(ConfigError, match="Use precision='bf16-mixed'"):
        check_precision(SimpleNamespace(precision="16-mixed", scaler=object()))


def _fit_built_on_meta(rank: int, world: int, stage: int) -> dict:
    import os

    import lightning.pytorch as L
    from torch.utils.data import DataLoader, DistributedSampler

    from memtrain.strategies import MemTrainStrategy
    from tests.lightning_run import TinyModule, launched_env, step_dataset

    os.environ.update(launched_env(rank, world))
    trainer = L.Trainer(accelerator="cpu", devices=world, strategy=MemTrainStrategy(zero_stage=stage), max_steps=2,
                        logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, use_distributed_sampler=False)
    with trainer.init_module(empty_init=True):  # no memory for the full model on any rank
        module = TinyModule()
    built_on_meta = all(p.is_meta for p in module.parameters())
    data = step_dataset(2, BATCH)
    trainer.fit(module, DataLoader(data, batch_size=BATCH // world, sampler=DistributedSampler(data, world, rank, shuffle=False)))
    local = [p.to_local() for p in module.parameters()]
    return {"built_on_meta": built_on_meta, "meta_after": any(p.is_meta for p in local),
            "finite": all(bool(torch.isfinite(p).all()) for p in local), "losses": module.losses,
            "params": full_params(module.model)}


@pytest.mark.parametrize("stage", [0, 3])
def test_empty_init_builds_on_meta_then_materializes(stage: int) -> None:
    import math

    results = run_distributed(_fit_built_on_meta, 2, stage)
    for got in results:
        assert got["built_on_meta"] and not got["meta_after"] and got["finite"]
        assert all(math.isfinite(x) and x < 2 * math.log(64) for x in got["losses"])  # reset_parameters' init
    assert_close_params(results[0]["params"], results[1]["params"], rtol=0, atol=0)  # replicas agree
