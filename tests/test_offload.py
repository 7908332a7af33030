"""Offload parity: optimizer state on CPU / NVMe (and stage 3 parameters on NVMe) gives the parameters of the same
run without offload, on 2 gloo processes; resume from a checkpoint; errors before training."""
from __future__ import annotations

import dataclasses
import functools
from pathlib import Path
from typing import Any

import pytest
import torch

from tests.distributed import run_distributed
from tests.parity import LR, TINY, full_params, global_batch, mean_across_ranks, rank_slice, tiny_gpt

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
        x, y = rank_slice(x, rank, world), rank_slice(y, rank, world)
        total = 0.0
        for micro in range(accumulate):
            xs, ys = rank_slice(x, micro, accumulate), rank_slice(y, micro, accumulate)
            sync = micro == accumulate - 1
            with (torch.enable_grad() if sync else engine.no_gradient_sync(model)):
                loss = model.loss(xs, ys) / accumulate
                loss.backward()
            total += loss.item()
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


@functools.cache
def _baseline(stage: int, steps: int, clip: float | None = None, accumulate: int = 1,
              vocab: int = TINY.vocab_size) -> dict[str, Any]:
    """The same run without offload (computed once per session)."""
    return run_distributed(_train, 2, stage, {}, range(steps), clip, accumulate, None, None, vocab)[0]


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
    "params-nvme-opt-nvme": dict(optimizer="nvme", params="nvme", overlap_backward=False),
    "params-nvme-opt-nvme-overlap": dict(optimizer="nvme", params="nvme", prefetch_blocks=2),
    "params-nvme-opt-cpu-overlap": dict(optimizer="cpu", params="nvme", prefetch_blocks=0),
}


@pytest.mark.parametrize("combo", list(COMBOS))
def test_stage3_offload_is_bitwise_equal_to_no_offload(combo: str, tmp_path: Path) -> None:
    want = _baseline(3, STEPS)
    combo_settings = COMBOS[combo]
    for got in run_distributed(_train, 2, 3, _offload(tmp_path, **combo_settings), range(STEPS)):
        _assert_same(got, want, exact=True)
        # Telemetry counts each part on its tier.
        params, state = got["memory"]["params"], got["memory"]["optimizer_state"]
        if combo_settings.get("params") == "nvme":
            assert params["nvme"] > 0 and params["host"] == 0
        nvme_share = 0.0 if combo_settings["optimizer"] == "cpu" else 1 - combo_settings.get("optimizer_cpu_fraction", 0)
        assert (state["nvme"] > 0) == (nvme_share > 0) and (state["host"] > 0) == (nvme_share < 1)
        assert got["swap"] is None or not Path(got["swap"]).exists()  # removed at exit
    assert not list(tmp_path.glob("memtrain-swap-*"))


def test_embedding_and_head_as_their_own_units(tmp_path: Path) -> None:
    """A vocabulary large enough that the embedding and head outweigh a block: with offload they become FSDP2
    groups of their own (the head's update overlaps backward), with the same results."""
    want = _baseline(3, STEPS, vocab=1024)
    offload = _offload(tmp_path, optimizer="nvme", params="nvme")
    for got in run_distributed(_train, 2, 3, offload, range(STEPS), None, 1, None, None, 1024):
        _assert_same(got, want, exact=True)
        assert got["units"] == ["<root>", "wte", "blocks.0", "blocks.1", "lm_head"]


@pytest.mark.parametrize("stage", [1, 2])
def test_optimizer_offload_at_stages_1_and_2(stage: int, tmp_path: Path) -> None:
    want = _baseline(stage, STEPS)
    for got in run_distributed(_train, 2, stage, _offload(tmp_path, optimizer="nvme"), range(STEPS)):
        _assert_same(got, want, exact=True)


def test_overlapped_update_waits_for_the_clipping_norm(tmp_path: Path) -> None:
    # A threshold below the gradient norm: clipping changes every step. The offloaded optimizer sums the norm as
    # blocks are reduced and updates after it; the reference clips with torch's clip_grad_norm_ (another
    # summation order, hence not bitwise).
    want = _baseline(3, STEPS, 0.05)
    unclipped = _baseline(3, STEPS)
    offload = _offload(tmp_path, optimizer="nvme", params="nvme")
    for got in run_distributed(_train, 2, 3, offload, range(STEPS), 0.05):
        _assert_same(got, want, exact=False)
    assert not torch.allclose(want["params"]["lm_head.weight"], unclipped["params"]["lm_head.weight"])


def test_accumulation_with_overlap(tmp_path: Path) -> None:
    want = _baseline(3, STEPS, None, 2)
    for got in run_distributed(_train, 2, 3, _offload(tmp_path, optimizer="nvme", params="nvme"), range(STEPS),
                               None, 2):
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


@pytest.mark.parametrize("offload", [dict(optimizer="nvme", params="nvme"), dict(optimizer="nvme",
                                                                                 optimizer_cpu_fraction=0.5)])
def test_resume_with_nvme_offload_is_exact(offload: dict[str, Any], tmp_path: Path) -> None:
    ckpt = tmp_path / "ckpt"
    want = _baseline(3, 4)
    run_distributed(_train, 2, 3, _offload(tmp_path, **offload), range(2), None, 1, None, str(ckpt))
    for got in run_distributed(_train, 2, 3, _offload(tmp_path, **offload), range(2, 4), None, 1, str(ckpt)):
        torch.testing.assert_close(got["losses"], want["losses"][2:], rtol=0, atol=0)
        for name in want["params"]:
            torch.testing.assert_close(got["params"][name], want["params"][name], rtol=0, atol=0)


def test_offloaded_checkpoint_resumes_without_offload(tmp_path: Path) -> None:
    """The checkpoint format does not depend on where the state lived."""
    ckpt = tmp_path / "ckpt"
    want = _baseline(3, 4)
    run_distributed(_train, 2, 3, _offload(tmp_path, optimizer="nvme", params="nvme"), range(2), None, 1, None,
                    str(ckpt))
    for got in run_distributed(_train, 2, 3, {}, range(2, 4), None, 1, str(ckpt)):
        for name in want["params"]:
            torch.testing.assert_close(got["params"][name], want["params"][name], rtol=0, atol=0)
