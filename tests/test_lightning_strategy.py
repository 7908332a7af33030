"""MemTrainStrategy through the Lightning Trainer: parity with a single-process run, features, checkpoints."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tests.distributed import run_distributed
from tests.lightning_run import fit
from tests.parity import assert_close_params, reference_run

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
