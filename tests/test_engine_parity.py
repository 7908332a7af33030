"""Parity of ZeRO stages 0-3 and hybrid with a plain single-process run (same seed, same data)."""
from __future__ import annotations

from typing import Any

import pytest
import torch

from tests.distributed import run_distributed
from tests.parity import assert_close_params, engine_train, reference_run

STEPS, BATCH = 4, 8


def _train(rank: int, world: int, sharding: dict[str, Any], clip: float | None, accumulate: int,
           local_world: int) -> dict[str, Any]:
    return engine_train(rank, world, sharding, range(STEPS), BATCH, clip=clip, accumulate=accumulate,
                        local_world=local_world)


@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_stage_matches_single_process(stage: int) -> None:
    # A clip threshold below the gradient norm: the global norm over shards must equal the unsharded one.
    want = reference_run(STEPS, BATCH, clip=0.5)
    results = run_distributed(_train, 2, {"stage": stage}, 0.5, 1, 2)
    for got in results:
        torch.testing.assert_close(got["losses"], want["losses"], rtol=1e-5, atol=0)
        assert_close_params(got["params"], want["params"])


def test_hybrid_on_four_ranks_with_clipping_and_accumulation() -> None:
    want = reference_run(STEPS, BATCH, clip=0.5, accumulate=2)
    results = run_distributed(_train, 4, {"stage": 3, "hybrid": True, "shard_size": 2}, 0.5, 2, 2)
    for got in results:
        torch.testing.assert_close(got["losses"], want["losses"], rtol=1e-5, atol=0)
        assert_close_params(got["params"], want["params"])


def _differently_seeded_replicas(rank: int, world: int) -> dict[str, Any]:
    from memtrain import Engine, MemTrainConfig
    from tests.parity import full_params, tiny_gpt

    engine = Engine.create(MemTrainConfig.from_dict({"sharding": {"stage": 0}}), world, world, "cpu")
    return full_params(engine.prepare_model(tiny_gpt(seed=rank)))  # each rank initialised differently


def test_replicated_stages_start_from_the_first_ranks_weights() -> None:
    from tests.parity import full_params, tiny_gpt

    want = full_params(tiny_gpt(seed=0))
    for got in run_distributed(_differently_seeded_replicas, 2):
        assert_close_params(got, want, rtol=0, atol=0)


def _wrapped_and_early_optimizer(rank: int, world: int, stage: int, local_update: bool) -> dict[str, Any]:
    from torch.distributed.tensor import DTensor

    from memtrain import Engine, MemTrainConfig
    from tests.parity import tiny_gpt

    data: dict[str, Any] = {"sharding": {"stage": stage}}
    if local_update:
        data["local_update"] = {"tau": 2}
    engine = Engine.create(MemTrainConfig.from_dict(data), world, world, "cpu")
    model = tiny_gpt(seed=0)
    early = torch.optim.AdamW(model.parameters())  # built before prepare_model
    engine.prepare_model(model)
    try:
        engine.prepare_optimizer(early, model)
        early_error = None
    except RuntimeError as err:
        early_error = str(err)
    return {"dtensor": [isinstance(p, DTensor) for p in model.parameters()], "early_error": early_error}


@pytest.mark.parametrize("stage, world, local_update, wrapped", [
    (0, 1, False, False), (1, 1, False, False),  # one device: nothing to replicate over
    (0, 2, True, False),  # local updates: each rank is its own replica
    (0, 2, False, True), (3, 2, False, True),
])
def test_a_one_rank_data_parallel_mesh_leaves_the_model_unwrapped(stage: int, world: int, local_update: bool,
                                                                   wrapped: bool) -> None:
    for got in run_distributed(_wrapped_and_early_optimizer, world, stage, local_update):
        assert set(got["dtensor"]) == {wrapped}
        # Sharding replaces the parameters, so an optimizer over the old ones must be refused; unwrapped, the
        # parameters are the same objects and such an optimizer is right.
        if wrapped:
            assert "build the optimizer after engine.prepare_model" in got["early_error"]
        else:
            assert got["early_error"] is None


def test_one_rank_stages_match_single_process() -> None:
    want = reference_run(STEPS, BATCH, clip=0.5)
    for stage in (0, 1):
        got, = run_distributed(_train, 1, {"stage": stage}, 0.5, 1, 1)
        torch.testing.assert_close(got["losses"], want["losses"], rtol=1e-5, atol=0)
        assert_close_params(got["params"], want["params"])
