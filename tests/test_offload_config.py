"""Offload settings: validation before training, the DeepSpeed JSON import, the host budget, I/O errors."""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest
import torch

from memtrain.config import ConfigError, MemTrainConfig, parse_bytes
from memtrain.deepspeed_config import from_deepspeed
from tests.distributed import run_distributed
from tests.parity import LR, global_batch, tiny_gpt


@pytest.mark.parametrize(("data", "message"), [
    ({"offload": {"optimizer": "disk"}}, "offload.optimizer='disk'"),
    ({"offload": {"optimizer": "nvme"}}, "offload.nvme_path is required"),
    ({"offload": {"params": "nvme", "nvme_path": "/x"}}, "needs offload.optimizer"),
    ({"sharding": {"stage": 2}, "offload": {"optimizer": "cpu", "params": "cpu"}}, "needs sharding.stage=3"),
    ({"sharding": {"stage": 0}, "offload": {"optimizer": "cpu"}}, "stage 1, 2 or 3"),
    ({"offload": {"optimizer": "cpu", "optimizer_cpu_fraction": 0.5}}, "only meaningful with offload.optimizer='nvme'"),
    ({"offload": {"optimizer": "cpu", "host_memory_budget": "lots"}}, "offload.host_memory_budget='lots'"),
    ({"offload": {"optimizer": "cpu", "block_size": 1000}}, "multiple of 4096"),
    ({"offload": {"optimizer": "cpu", "io_backend": "aio"}}, "offload.io_backend"),
    ({"offload": {"optimizer": "cpu", "prefetch": 2}}, "unknown key(s) ['offload.prefetch']"),
])
def test_bad_offload_settings_name_the_key(data: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError, match=None) as err:
        MemTrainConfig.from_dict(data)
    assert message in str(err.value)


def test_sizes_parse() -> None:
    assert parse_bytes("k", "8GiB") == 8 * 2**30
    assert parse_bytes("k", "1.5GB") == 1_500_000_000
    assert parse_bytes("k", "64 MiB") == 64 * 2**20
    assert parse_bytes("k", 4096) == 4096
    for bad in (0, -1, True, "GiB", "1XB", 1.5):
        with pytest.raises(ConfigError):
            parse_bytes("k", bad)


DS_CONFIG = {
    "train_micro_batch_size_per_gpu": 1,
    "gradient_accumulation_steps": 4,
    "gradient_clipping": 1.0,
    "bf16": {"enabled": True},
    "optimizer": {"type": "AdamW", "params": {"lr": 1e-4}},
    "zero_optimization": {
        "stage": 3,
        "offload_param": {"device": "nvme", "nvme_path": "/local_nvme", "pin_memory": True, "buffer_count": 5},
        "offload_optimizer": {"device": "nvme", "nvme_path": "/local_nvme", "pin_memory": True},
        "sub_group_size": 1_000_000,
        "overlap_comm": True,
        "stage3_prefetch_bucket_size": 5e8,
    },
    "aio": {"block_size": 1048576, "queue_depth": 16, "thread_count": 2, "single_submit": False,
            "overlap_events": True},
}


def test_deepspeed_json_is_mapped(tmp_path: Path) -> None:
    path = tmp_path / "ds.json"
    path.write_text(json.dumps(DS_CONFIG))
    imported = from_deepspeed(path)
    cfg = imported.config
    assert cfg.sharding.stage == 3
    assert (cfg.offload.optimizer, cfg.offload.params, cfg.offload.nvme_path) == ("nvme", "nvme", "/local_nvme")
    assert (cfg.offload.block_size, cfg.offload.queue_depth, cfg.offload.io_threads) == (1048576, 16, 2)
    assert cfg.offload.tile_size == 4_000_000
    assert imported.trainer_kwargs == {"accumulate_grad_batches": 4, "gradient_clip_val": 1.0,
                                       "precision": "bf16-mixed"}
    noted = " ".join(imported.notes)
    for key in ("pin_memory", "buffer_count", "overlap_comm", "stage3_prefetch_bucket_size", "single_submit",
                "optimizer", "train_micro_batch_size_per_gpu"):
        assert key in noted  # not used, and said so


@pytest.mark.parametrize(("patch", "key"), [
    ({"fp16": {"enabled": True}}, "fp16.enabled"),
    ({"zero_optimization": {"stage": 3, "zero_quantized_weights": True}}, "zero_optimization.zero_quantized_weights"),
    ({"zero_optimization": {"stage": 3, "offload_optimizer": {"device": "nvme", "nvme_path": "/a", "ratio": 0.3}}},
     "offload_optimizer.ratio"),
    ({"aio": {"use_gds": True}}, "aio.use_gds"),
    ({"amp": {"enabled": True}}, "amp"),
    ({"zero_optimization": {"stage": 3, "offload_param": {"device": "nvme", "nvme_path": "/a"},
                            "offload_optimizer": {"device": "nvme", "nvme_path": "/b"}}}, "one nvme_path"),
])
def test_deepspeed_keys_without_meaning_are_refused(patch: dict[str, Any], key: str) -> None:
    with pytest.raises(ConfigError) as err:
        from_deepspeed(patch)
    assert key in str(err.value)


def _budget_too_small(rank: int, world: int, tmp: str) -> str:
    from memtrain import Engine

    config = MemTrainConfig.from_dict({"offload": {"optimizer": "nvme", "params": "nvme", "nvme_path": tmp,
                                                   "host_memory_budget": 4096}})
    engine = Engine.create(config, world, world, "cpu")
    try:
        engine.prepare_model(tiny_gpt())
    except ConfigError as err:
        return str(err)
    return "no error"


def test_a_host_budget_below_the_buffers_is_refused_before_training(tmp_path: Path) -> None:
    (message,) = run_distributed(_budget_too_small, 1, str(tmp_path))
    assert "offload.host_memory_budget=4.00 KiB is too small" in message and "parameter swap buffers" in message


def test_nvme_path_that_is_a_file_or_unwritable_is_refused(tmp_path: Path) -> None:
    from memtrain.swap import SwapDirectory

    a_file = tmp_path / "file"
    a_file.write_text("")
    with pytest.raises(ConfigError, match="is a file"):
        SwapDirectory(a_file, "job")
    with pytest.raises(ConfigError, match="need"):
        SwapDirectory(tmp_path, "job", required_bytes=2**62)
    if os.geteuid() != 0:  # root writes anywhere
        locked = tmp_path / "locked"
        locked.mkdir(mode=0o500)
        with pytest.raises(ConfigError, match="not writable"):
            SwapDirectory(locked, "job")


def _io_error_mid_run(rank: int, world: int, tmp: str) -> str:
    from memtrain import Engine

    config = MemTrainConfig.from_dict({"offload": {"optimizer": "nvme", "params": "nvme", "nvme_path": tmp,
                                                   "overlap_backward": False}})
    engine = Engine.create(config, world, world, "cpu")
    model = engine.prepare_model(tiny_gpt())
    opt = engine.prepare_optimizer(torch.optim.AdamW(model.parameters(), lr=LR), model)
    x, y = global_batch(0, 4)
    model.loss(x, y).backward()
    opt.step()
    opt.zero_grad()
    # The drive loses the optimizer's swap file: the next step must fail naming it, not train on zeros.
    (engine.offload.directory.path / "optimizer-exp_avg.bin").unlink()
    model.loss(x, y).backward()
    try:
        opt.step()
    except RuntimeError as err:
        return str(err)
    finally:
        engine.offload.close()
    return "no error"


def test_an_io_error_mid_run_names_the_file(tmp_path: Path) -> None:
    (message,) = run_distributed(_io_error_mid_run, 1, str(tmp_path))
    assert "optimizer-exp_avg.bin" in message, message
