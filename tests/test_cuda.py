"""CUDA paths (NCCL, GPU tier accounting, NVML, the Trainer on a GPU). Run by scripts/gpu_check.sh."""
from __future__ import annotations

import pytest
import torch

from tests.distributed import run_distributed
from tests.parity import BATCH_SIZE, assert_close_params, full_params, global_batch, make_optimizer, tiny_gpt

pytestmark = [pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


def _reference_on_gpu(steps: int) -> dict[str, torch.Tensor]:
    model = tiny_gpt().cuda()
    opt = make_optimizer(model)
    for step in range(steps):
        x, y = (t.cuda() for t in global_batch(step, BATCH_SIZE))
        model.loss(x, y).backward()
        opt.step()
        opt.zero_grad()
    return {k: v.detach().cpu() for k, v in model.named_parameters()}


def _engine_on_gpu(rank: int, world: int, stage: int, steps: int) -> dict:
    import torch.distributed as dist

    from memtrain import Engine, MemTrainConfig

    dist.destroy_process_group()  # the helper's gloo group; this test wants NCCL
    dist.init_process_group("nccl", init_method="tcp://127.0.0.1:29631", rank=rank, world_size=world)
    torch.cuda.set_device(rank)
    engine = Engine.create(MemTrainConfig.from_dict({"sharding": {"stage": stage}}), world, world, "cuda")
    model = engine.prepare_model(tiny_gpt().cuda())
    opt = engine.prepare_optimizer(make_optimizer(model), model)
    for step in range(steps):
        x, y = (t.cuda() for t in global_batch(step, BATCH_SIZE))
        model.loss(x, y).backward()
        opt.step()
        report = engine.memory(model, opt)
        opt.zero_grad()
    return {"params": {k: v.cpu() for k, v in full_params(model).items()}, "memory": report.bytes}


@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_engine_on_one_gpu_matches_plain_gpu_run(stage: int) -> None:
    want = _reference_on_gpu(3)
    got = run_distributed(_engine_on_gpu, 1, stage, 3)[0]
    assert_close_params(got["params"], want)
    assert got["memory"]["params"]["gpu"] > 0 and got["memory"]["optimizer_state"]["gpu"] > 0
    assert got["memory"]["params"]["host"] == 0


def test_nvml_reads_this_gpu() -> None:
    pytest.importorskip("pynvml", reason="nvidia-ml-py (pynvml) is not installed here: NVML readings not checked")
    from memtrain.telemetry import gpu_readings

    held = torch.ones(64 << 20, dtype=torch.uint8, device="cuda")
    got = gpu_readings(torch.cuda.current_device())
    assert got is not None and got["gpu_memory_total"] >= got["gpu_memory_used"] >= held.numel()


def test_trainer_on_gpu_with_bf16() -> None:
    import lightning.pytorch as L
    from torch.utils.data import DataLoader

    import memtrain  # noqa: F401  (registers "memtrain")
    from tests.lightning_run import TinyModule, step_dataset

    module = TinyModule()
    trainer = L.Trainer(accelerator="gpu", devices=1, strategy="memtrain", precision="bf16-mixed", max_steps=3,
                        logger=False, enable_checkpointing=False, enable_progress_bar=False)
    trainer.fit(module, DataLoader(step_dataset(3, BATCH_SIZE), batch_size=BATCH_SIZE))
    assert trainer.global_step == 3
    assert all(torch.isfinite(torch.tensor(module.losses)))


def _offload_on_gpu(rank: int, world: int, offload: dict, steps: int) -> dict:
    import torch.distributed as dist

    from memtrain import Engine, MemTrainConfig

    dist.destroy_process_group()
    dist.init_process_group("nccl", init_method="tcp://127.0.0.1:29632", rank=rank, world_size=world)
    torch.cuda.set_device(rank)
    config = MemTrainConfig.from_dict({"sharding": {"stage": 3}, "offload": offload})
    engine = Engine.create(config, world, world, "cuda")
    # With parameter offload the shards stay on the host (FSDP2's CPU offload policy): build the model there.
    model = tiny_gpt() if offload.get("params", "none") != "none" else tiny_gpt().cuda()
    model = engine.prepare_model(model)
    opt = engine.prepare_optimizer(make_optimizer(model), model)
    for step in range(steps):
        x, y = (t.cuda() for t in global_batch(step, BATCH_SIZE))
        model.loss(x, y).backward()
        opt.step()
        opt.zero_grad()
    out = {"params": {k: v.cpu() for k, v in full_params(model).items()}}
    engine.offload.close()
    return out


@pytest.mark.parametrize("offload", [{"optimizer": "cpu"}, {"optimizer": "nvme"},
                                     {"optimizer": "nvme", "params": "nvme"}])
def test_offload_on_one_gpu_matches_plain_gpu_run(offload: dict, tmp_path) -> None:
    want = _reference_on_gpu(3)
    got = run_distributed(_offload_on_gpu, 1, {**offload, "nvme_path": str(tmp_path)}, 3)[0]
    assert_close_params(got["params"], want)


def _co2_on_gpu(rank: int, world: int, lu: dict, steps: int) -> dict:
    import torch.distributed as dist

    from memtrain.config import LocalUpdateConfig
    from memtrain.local_update.rounds import LocalUpdate

    dist.destroy_process_group()
    dist.init_process_group("nccl", init_method="tcp://127.0.0.1:29633", rank=rank, world_size=world)
    torch.cuda.set_device(rank)
    model = tiny_gpt().cuda()
    opt = make_optimizer(model)
    # One replica (one GPU; the engine refuses it): the round's collectives and its stream run all the same.
    update = LocalUpdate(model, opt, LocalUpdateConfig(**lu), dist.group.WORLD)
    for step in range(steps):
        x, y = (t.cuda() for t in global_batch(step, BATCH_SIZE))
        model.loss(x, y).backward()
        opt.step()
        opt.zero_grad()
    update.close()
    return {"params": {k: v.detach().cpu() for k, v in model.named_parameters()}, "outer_steps": update.outer_steps}


def test_co2_round_with_a_sharded_outer_state_on_the_host() -> None:
    """NCCL takes no host tensors: the staleness penalty's per-tensor sums of an outer state kept on the host are
    reduced on the GPU and brought back; the rounds run on the background thread's stream."""
    co2 = {"tau": 2, "asynchronous": True, "outer_lr": 0.8, "outer_momentum": 0.5, "staleness_penalty": True,
           "outer_clip": 2e-3, "outer_state_sharding": True}
    on_host = run_distributed(_co2_on_gpu, 1, {**co2, "outer_state_device": "cpu"}, 7)[0]
    on_gpu = run_distributed(_co2_on_gpu, 1, co2, 7)[0]
    assert on_host["outer_steps"] == on_gpu["outer_steps"] == 2  # rounds of steps 2 and 4 applied; 6 in flight
    assert_close_params(on_host["params"], on_gpu["params"])


def test_snapshot_of_gpu_state_restores_bitwise(tmp_path) -> None:
    """The CUDA snapshot path: device-to-host copies on a side stream into page-locked keeper memory, overlapped
    with the next step, waited for before the update; restored into a fresh model equal to the state it copied."""
    from memtrain.checkpoint.manager import CheckpointManager
    from memtrain.config import CheckpointConfig

    config = CheckpointConfig(snapshot_every_n_steps=1, keeper_dir=str(tmp_path / "keeper"))
    manager = CheckpointManager(config, "cuda-test", rank=0, world=1, ranks_per_node=1, device_type="cuda")
    model = tiny_gpt().cuda()
    opt = make_optimizer(model)
    inner_step = opt.step
    opt.step = lambda *a, **k: (manager.wait_copied(), inner_step(*a, **k))[1]
    want = {}
    for step in range(1, 4):
        x, y = (t.cuda() for t in global_batch(step, BATCH_SIZE))
        model.loss(x, y).backward()
        opt.step()
        opt.zero_grad()
        manager.snapshot(step, {"model": model.state_dict(), "optimizer": opt.state_dict()})
        want = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
    manager.wait()
    assert manager.store._open and all(slot.flat.is_pinned() for slot in manager.store._open.values())
    manager.close()  # the trainer is gone before its restart (the keeper refuses a second live trainer per rank)
    restarted = CheckpointManager(config, "cuda-test", rank=0, world=1, ranks_per_node=1, device_type="cuda")
    fresh = tiny_gpt().cuda()
    fresh_opt = make_optimizer(fresh)
    fresh.loss(*(t.cuda() for t in global_batch(0, BATCH_SIZE))).backward()
    fresh_opt.step()
    restored = restarted.restore(lambda: {"model": fresh.state_dict(), "optimizer": fresh_opt.state_dict()})
    assert restored is not None and restored.step == 3
    # Found slots are page-locked too: the next snapshots copy into them asynchronously.
    assert restarted.store._open and all(slot.flat.is_pinned() for slot in restarted.store._open.values())
    fresh.load_state_dict(restored.state["model"])
    for name, value in want.items():
        assert torch.equal(fresh.state_dict()[name].cpu(), value), name
    restarted.close(finished=True)
