"""Offload parity: optimizer state on CPU / NVMe (and stage 3 parameters on NVMe) gives the parameters of the same
run without offload, on 2 gloo processes; resume from a checkpoint; errors before training."""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import torch

from tests.distributed import run_distributed
from tests.parity import LR, TINY, full_params, global_batch, mean_across_ranks, rank_backward, tiny_gpt

STEPS, BATCH = 3, 8
TILE = 4096  # the smallest tile: each block's state moves in several tiles


def _train(rank: int, world: int, stage: int, offload: dict[str, Any], steps: range, clip: float | None = None,
           accumulate: int = 1, load_from: str | None = None, save_to: str | None = None,
           vocab: int = TINY.vocab_size) -> dict[str, Any]:
    from memtrain import Engine, MemTrainConfig
    from memtrain.offload import offload_state

    cfg = dataclasses.replace(TINY, vocab_size=vocab)

    config = MemTrainConfig.from_dict({"sharding": {"stage": stage}, "offload": offload})
    engine = Engine.create(config, world, world, "cpu")
    model = engine.prepare_model(tiny_gpt(cfg=cfg))
    # The fused CPU kernel on both sides: the offloaded step runs the same kernel on tiles of the same values.
    opt = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=0.1, fused=True)
    in_optimizer_clip = clip is not None and config.offload.enabled and config.offload.overlap_backward
    engine.prepare_optimizer(opt, model, max_grad_norm=clip if in_optimizer_clip else None)
    if load_from is not None:
        engine.load_checkpoint(load_from, model, opt)
    losses = []
    for step in steps:
        x, y = global_batch(step, BATCH, cfg)
        total = rank_backward(engine, model, x, y, rank, world, accumulate)
        if clip is not None and not in_optimizer_clip:
            engine.clip_grad_norm_(model, clip, opt)
        opt.step()
        memory = engine.memory(model, opt).bytes
        opt.zero_grad()
        losses.append(mean_across_ranks(total))
    if save_to is not None:
        engine.save_checkpoint(save_to, model, opt, meta={"step": steps.stop})
    swap = engine.offload.directory.path if engine.offload.directory is not None else None
    offloaded = offload_state(opt)
    out = {"losses": losses, "params": full_params(model), "swap": str(swap) if swap else None,
           "units": [u.name for u in offloaded.units] if offloaded is not None else None, "memory": memory,
           "swap_exists_during_run": swap.exists() if swap else None}
    engine.offload.close()
    return out


def _offload(tmp: Path, **kw: Any) -> dict[str, Any]:
    return {"tile_size": TILE, "nvme_path": str(tmp), **kw}


def _assert_same(got: dict[str, Any], want: dict[str, Any], exact: bool) -> None:
    tol = {"rtol": 0, "atol": 0} if exact else {"rtol": 1e-6, "atol": 1e-7}
    torch.testing.assert_close(got["losses"], want["losses"], **tol)
    for name in want["params"]:
        torch.testing.assert_close(got["params"][name], want["params"][name], **tol, msg=lambda m, n=name: f"{n}: {m}")


COMBOS = {
    "opt-cpu": dict(optimizer="cpu"),
    "opt-nvme": dict(optimizer="nvme", overlap_backward=False),
    "opt-nvme-overlap": dict(optimizer="nvme"),
    "opt-half-cpu-half-nvme": dict(optimizer="nvme", optimizer_cpu_fraction=0.5),
    # The budget left after the swap buffers holds part of the state: both tiers in use.
    "opt-auto-fraction": dict(optimizer="nvme", optimizer_cpu_fraction="auto", host_memory_budget=100 * 1024),
    "params-nvme-opt-nvme": dict(optimizer="nvme", params="nvme", overlap_backward=False),
    "params-nvme-opt-nvme-overlap": dict(optimizer="nvme", params="nvme", prefetch_blocks=2),
    "params-nvme-opt-cpu-overlap": dict(optimizer="cpu", params="nvme", prefetch_blocks=0),
}


def _train_each(rank: int, world: int, stage: int, configs: list[dict[str, Any]], steps: int) -> list[dict[str, Any]]:
    """Several runs in the same processes (one launch: spawning is what costs here)."""
    return [_train(rank, world, stage, offload, range(steps)) for offload in configs]


def test_stage3_offload_combinations_are_bitwise_equal_to_no_offload(tmp_path: Path) -> None:
    names = list(COMBOS)
    configs = [{}] + [_offload(tmp_path / name, **COMBOS[name]) for name in names]
    for want, *runs in run_distributed(_train_each, 2, 3, configs, STEPS):
        for name, got in zip(names, runs):
            settings = COMBOS[name]
            try:
                _assert_same(got, want, exact=True)
            except AssertionError as err:
                raise AssertionError(f"offload combination {name}: {err}") from None
            assert got["swap"] is None or not Path(got["swap"]).exists(), name  # removed at exit
            # Telemetry counts each part on its tier.
            params, state = got["memory"]["params"], got["memory"]["optimizer_state"]
            if settings.get("params") == "nvme":
                assert params["nvme"] > 0 and params["host"] == 0, (name, params)
            fraction = settings.get("optimizer_cpu_fraction", 0)
            nvme_share = 0.0 if settings["optimizer"] == "cpu" else 0.5 if fraction == "auto" else 1 - fraction
            assert (state["nvme"] > 0) == (nvme_share > 0) and (state["host"] > 0) == (nvme_share < 1), (name, state)
    assert not list(tmp_path.glob("*/memtrain-swap-*"))


def _runs(rank: int, world: int, runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Several ``_train`` runs, one after the other, in the same processes (one launch)."""
    out = []
    for run in runs:
        run = dict(run)
        first, stop = run.pop("steps", (0, STEPS))
        out.append(_train(rank, world, run.pop("stage", 3), run.pop("offload", {}), range(first, stop), **run))
    return out


def test_embedding_and_head_as_their_own_units(tmp_path: Path) -> None:
    """A vocabulary large enough that the embedding and head outweigh a block: with offload they become FSDP2
    groups of their own (the head's update overlaps backward), with the same results."""
    offload = _offload(tmp_path, optimizer="nvme", params="nvme")
    for want, got in run_distributed(_runs, 2, [{"vocab": 1024}, {"vocab": 1024, "offload": offload}]):
        _assert_same(got, want, exact=True)
        assert got["units"] == ["<root>", "wte", "blocks.0", "blocks.1", "lm_head"]


def test_optimizer_offload_at_stages_1_and_2(tmp_path: Path) -> None:
    offload = _offload(tmp_path, optimizer="nvme")
    runs = [{"stage": 1}, {"stage": 1, "offload": offload}, {"stage": 2}, {"stage": 2, "offload": offload}]
    for want1, got1, want2, got2 in run_distributed(_runs, 2, runs):
        _assert_same(got1, want1, exact=True)
        _assert_same(got2, want2, exact=True)


def test_overlapped_update_waits_for_the_clipping_norm(tmp_path: Path) -> None:
    # A threshold below the gradient norm: clipping changes every step. The offloaded optimizer sums the norm as
    # blocks are reduced and updates after it; the reference clips with torch's clip_grad_norm_ (another
    # summation order, hence not bitwise).
    offload = _offload(tmp_path, optimizer="nvme", params="nvme")
    runs = [{"clip": 0.05}, {}, {"clip": 0.05, "offload": offload}]
    for want, unclipped, got in run_distributed(_runs, 2, runs):
        _assert_same(got, want, exact=False)
        assert not torch.allclose(want["params"]["lm_head.weight"], unclipped["params"]["lm_head.weight"])


def test_accumulation_with_overlap(tmp_path: Path) -> None:
    offload = _offload(tmp_path, optimizer="nvme", params="nvme")
    for want, got in run_distributed(_runs, 2, [{"accumulate": 2}, {"accumulate": 2, "offload": offload}]):
        _assert_same(got, want, exact=True)


def _reduce_twice(rank: int, world: int, tmp: str) -> str:
    from memtrain import Engine, MemTrainConfig

    config = MemTrainConfig.from_dict({"sharding": {"stage": 3}, "offload": _offload(Path(tmp), optimizer="cpu")})
    engine = Engine.create(config, world, world, "cpu")
    model = engine.prepare_model(tiny_gpt())
    opt = engine.prepare_optimizer(torch.optim.AdamW(model.parameters(), lr=LR), model)
    x, y = global_batch(0, 4)
    model.loss(x, y).backward()
    try:
        model.loss(x, y).backward()  # a second reduced backward before the step: the blocks were already updated
    except RuntimeError as err:
        return str(err)
    finally:
        opt.zero_grad()
    return "no error"


def test_reducing_gradients_twice_before_a_step_is_refused(tmp_path: Path) -> None:
    for message in run_distributed(_reduce_twice, 2, str(tmp_path)):
        assert "reduced twice before optimizer.step()" in message and "no_gradient_sync" in message


def test_resume_with_nvme_offload_is_exact_and_checkpoints_move_between_tiers(tmp_path: Path) -> None:
    """Save after 2 steps, resume for 2 more: bitwise equal to 4 uninterrupted steps, with the state on NVMe (and
    half in host memory), and from an offloaded checkpoint into a run without offload."""
    params_nvme = _offload(tmp_path, optimizer="nvme", params="nvme")
    half = _offload(tmp_path, optimizer="nvme", optimizer_cpu_fraction=0.5)
    a, b = str(tmp_path / "ckpt-a"), str(tmp_path / "ckpt-b")
    runs = [
        {"steps": (0, 4)},
        {"steps": (0, 2), "offload": params_nvme, "save_to": a},
        {"steps": (2, 4), "offload": params_nvme, "load_from": a},
        {"steps": (0, 2), "offload": half, "save_to": b},
        {"steps": (2, 4), "offload": half, "load_from": b},
        {"steps": (2, 4), "load_from": a},  # the checkpoint format does not depend on where the state lived
    ]
    for want, _, resumed_a, _, resumed_b, plain in run_distributed(_runs, 2, runs):
        for name, got in (("params+optimizer on NVMe", resumed_a), ("optimizer half on host", resumed_b),
                          ("no offload, from the NVMe checkpoint", plain)):
            torch.testing.assert_close(got["losses"], want["losses"][2:], rtol=0, atol=0, msg=name)
            for param in want["params"]:
                torch.testing.assert_close(got["params"][param], want["params"][param], rtol=0, atol=0,
                                           msg=lambda m, n=f"{name}: {param}": f"{n}: {m}")
