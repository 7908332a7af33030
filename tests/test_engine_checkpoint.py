"""Sharded checkpoints: bitwise resume, loading at another world size and stage, consolidation."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import subprocess
import sys

import pytest
import torch

from memtrain.models import GPT
from tests.distributed import run_distributed
from tests.parity import TINY, BATCH_SIZE as BATCH, assert_close_params, engine_train, reference_run


def _resume(rank: int, world: int, ckpt: str) -> dict[str, Any]:
    straight = engine_train(rank, world, {"stage": 3}, range(0, 4), BATCH)
    engine_train(rank, world, {"stage": 3}, range(0, 2), BATCH, save_to=ckpt)
    resumed = engine_train(rank, world, {"stage": 3}, range(2, 4), BATCH, load_from=ckpt)
    return {"straight": straight, "resumed": resumed}


def test_resume_is_bitwise_equal_to_uninterrupted(tmp_path: Path) -> None:
    for got in run_distributed(_resume, 2, str(tmp_path / "ckpt")):
        assert got["resumed"]["losses"] == got["straight"]["losses"][2:]
        for name, value in got["straight"]["params"].items():
            assert torch.equal(got["resumed"]["params"][name], value), name


def _save_on_four(rank: int, world: int, ckpt: str) -> dict[str, Any]:
    return engine_train(rank, world, {"stage": 3}, range(0, 2), BATCH, save_to=ckpt)


def _resume_on_two(rank: int, world: int, ckpt: str, stage: int) -> dict[str, Any]:
    return engine_train(rank, world, {"stage": stage}, range(2, 4), BATCH, load_from=ckpt)


@pytest.fixture(scope="module")
def saved_on_four(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, torch.Tensor]]:
    """A checkpoint of 2 steps at ZeRO-3 on 4 ranks, and the full parameters it holds."""
    ckpt = tmp_path_factory.mktemp("four") / "ckpt"
    return ckpt, run_distributed(_save_on_four, 4, str(ckpt))[0]["params"]


def test_reshard_four_ranks_to_two_and_to_another_stage(saved_on_four: tuple[Path, dict]) -> None:
    ckpt = str(saved_on_four[0])
    want = reference_run(4, BATCH)
    for stage in (3, 1):  # same stage on fewer ranks; and ZeRO-1's differently laid out optimizer state
        for got in run_distributed(_resume_on_two, 2, ckpt, stage):
            torch.testing.assert_close(got["losses"], want["losses"][2:], rtol=1e-5, atol=0)
            assert_close_params(got["params"], want["params"])


def test_consolidated_file_loads_into_a_plain_model(saved_on_four: tuple[Path, dict], tmp_path: Path) -> None:
    ckpt, trained = saved_on_four
    out = tmp_path / "model.pt"
    subprocess.run([sys.executable, "-m", "memtrain.cli.consolidate", str(ckpt), str(out)], check=True)
    model = GPT(TINY)
    model.load_state_dict(torch.load(out, weights_only=True), strict=True)
    for name, p in model.named_parameters():
        assert torch.equal(p.detach(), trained[name]), name
