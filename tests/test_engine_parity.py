"""Parity of ZeRO stages 0-3 and hybrid with a plain single-process run (same seed, same data)."""
from __future__ import annotations

from typing import Any

import pytest
import torch

from memtrain import Engine, MemTrainConfig
from tests.distributed import run_distributed
from tests.parity import (
    assert_close_params,
    full_params,
    global_batch,
    make_optimizer,
    mean_across_ranks,
    rank_slice,
    reference_run,
    tiny_gpt,
)

STEPS, BATCH = 4, 8


def _train(rank: int, world: int, sharding: dict[str, Any], clip: float | None, accumulate: int,
           local_world: int) -> dict[str, Any]:
    engine = Engine.create(MemTrainConfig.from_dict({"sharding": sharding}), world, local_world, "cpu")
    model = engine.prepare_model(tiny_gpt())
    opt = engine.prepare_optimizer(make_optimizer(model), model)
    losses = []
    for step in range(STEPS):
        x, y = global_batch(step, BATCH)
        x, y = rank_slice(x, rank, world), rank_slice(y, rank, world)
        total = 0.0
        for micro in range(accumulate):
            xs, ys = rank_slice(x, micro, accumulate), rank_slice(y, micro, accumulate)
            last = micro == accumulate - 1
            ctx = engine.no_gradient_sync(model) if not last else torch.enable_grad()
            with ctx:
                loss = model.loss(xs, ys) / accumulate
                loss.backward()
            total += loss.item()
        if clip is not None:
            engine.clip_grad_norm_(model, clip)
        opt.step()
        opt.zero_grad()
        losses.append(mean_across_ranks(total))
    return {"losses": losses, "params": full_params(model), "memory": engine.memory(model, opt).bytes}


@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_stage_matches_single_process(stage: int) -> None:
    want = reference_run(STEPS, BATCH)
    results = run_distributed(_train, 2, {"stage": stage}, None, 1, 2)
    for got in results:
        torch.testing.assert_close(got["losses"], want["losses"], rtol=1e-5, atol=0)
        assert_close_params(got["params"], want["params"])


def test_hybrid_on_four_ranks_with_clipping_and_accumulation() -> None:
    want = reference_run(STEPS, BATCH, clip=0.5, accumulate=2)
    results = run_distributed(_train, 4, {"stage": 3, "hybrid": True, "shard_size": 2}, 0.5, 2, 2)
    for got in results:
        torch.testing.assert_close(got["losses"], want["losses"], rtol=1e-5, atol=0)
        assert_close_params(got["params"], want["params"])
