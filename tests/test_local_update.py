"""CO2 local updates: exactness against DDP, golden values from an independent simulation, the clipping and
race defects of the reference code, overlap timestamps, bitwise resume, bad input, the sharded outer state."""
from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

import pytest
import torch

from tests.distributed import run_distributed
from tests.local_update_sim import OPTIMIZERS, simulate
from tests.parity import assert_close_params, full_params, global_batch, rank_slice, tiny_gpt

BATCH = 8


def engine_run(rank: int, world: int, sharding: dict[str, Any], lu: dict[str, Any] | None, steps: range, *,
               optimizer: str = "adamw", local_world: int | None = None, load_from: str | None = None,
               save_to: str | None = None, setup: Any = None) -> dict[str, Any]:
    """Each rank trains on its slice of every global batch; returns this rank's (replica's) full parameters."""
    from memtrain import Engine, MemTrainConfig

    data = {"sharding": sharding, **({"local_update": lu} if lu else {})}
    engine = Engine.create(MemTrainConfig.from_dict(data), world, local_world or world, "cpu")
    # Replicated stages: ranks build differently seeded models, replicas must still start equal (rank 0's).
    model = engine.prepare_model(tiny_gpt(seed=rank if sharding["stage"] < 2 else 0))
    opt = engine.prepare_optimizer(OPTIMIZERS[optimizer](model), model)
    if load_from is not None:
        engine.load_checkpoint(load_from, model, opt)
    if setup is not None:
        setup(engine, model, opt)
    step_times = []
    for step in steps:
        x, y = global_batch(step, BATCH)
        model.loss(rank_slice(x, rank, world), rank_slice(y, rank, world)).backward()
        opt.step()
        opt.zero_grad()
        step_times.append(time.perf_counter())
    if save_to is not None:
        engine.save_checkpoint(save_to, model, opt, meta={"step": steps.stop})
    out = {"params": full_params(model), "step_times": step_times}
    if engine.local_update is not None:
        out["outer_steps"] = engine.local_update.outer_steps
        out["outer_state_bytes"] = engine.local_update.outer_state_bytes
        if engine.local_update.background is not None:
            out["rounds"] = [vars(t) for t in engine.local_update.background.history]
    engine.close()  # before the harness destroys the process group: a round may still be reducing
    return out


def _run(rank: int, world: int, kw: dict) -> dict:
    return engine_run(rank, world, **kw)


# -- exactness ----------------------------------------------------------------------------------------------
def test_tau_one_synchronous_plain_averaging_equals_ddp() -> None:
    """Local SGD with tau=1, outer lr 1, no momentum averages parameters after every (linear) SGD step: the
    same update as averaging gradients first (DDP), up to the reduction order."""
    steps = range(6)
    ddp = run_distributed(_run, 2, dict(sharding={"stage": 0}, lu=None, steps=steps, optimizer="sgd"))
    lu = {"tau": 1, "asynchronous": False, "outer_lr": 1.0, "outer_momentum": 0.0}
    for stage in (0, 1):  # stage 1: ZeRO-1 inside each replica (a group of one rank here)
        got = run_distributed(_run, 2, dict(sharding={"stage": stage}, lu=lu, steps=steps, optimizer="sgd"))
        for r in range(2):
            assert got[r]["outer_steps"] == 6
            assert_close_params(got[r]["params"], ddp[0]["params"], rtol=1e-5, atol=2e-6)
    # a test that can fail: averaging less often (tau=2) is not DDP (the replicas' data differ)
    tau2 = simulate(2, 6, BATCH, {**lu, "tau": 2}, "sgd")
    assert max((tau2[0][n] - ddp[0]["params"][n]).abs().max().item() for n in tau2[0]) > 1e-4


@pytest.mark.slow
def test_tau_one_synchronous_on_hybrid_zero3_is_data_parallel_sgd() -> None:
    """2 replicas x ZeRO-3 over 2 ranks: each shard group reduce-scatters inside itself, the outer step averages
    across groups every step; with SGD that is one data-parallel step on the whole batch (the simulation with
    tau=1: every replica ends each step at the average)."""
    lu = {"tau": 1, "asynchronous": False}
    want = simulate(2, 4, BATCH, lu, "sgd")
    got = run_distributed(_run, 4, dict(sharding={"stage": 3, "hybrid": True, "shard_size": 2}, lu=lu, steps=range(4),
                                        optimizer="sgd", local_world=2))
    assert_close_params(want[0], want[1], rtol=0, atol=0)
    for r in range(4):
        assert_close_params(got[r]["params"], want[0], rtol=1e-5, atol=2e-6)


# -- golden values: asynchronous CO2 against the independent single-process simulation ------------------------
CO2 = {"tau": 2, "asynchronous": True, "outer_lr": 0.8, "outer_momentum": 0.5, "staleness_penalty": True,
       "outer_clip": 2e-3}


# AdamW on 4 replicas of 2 samples each turns the reduction order's last-bit differences into visible steps on
# near-zero gradients, so the 4-process cases use SGD with momentum (the outer math is what is under test).
@pytest.mark.parametrize("world, sharding, replicas, optimizer", [
    (2, {"stage": 0}, 2, "adamw"),
    (4, {"stage": 0}, 4, "sgd"),
    pytest.param(4, {"stage": 3, "hybrid": True, "shard_size": 2}, 2, "sgd", marks=pytest.mark.slow),
])
def test_asynchronous_co2_matches_simulation(world: int, sharding: dict, replicas: int, optimizer: str) -> None:
    steps = 9  # boundaries after steps 2, 4, 6, 8: three outer steps applied, one round still in flight
    want = simulate(replicas, steps, BATCH, CO2, optimizer)
    got = run_distributed(_run, world, dict(sharding=sharding, lu=CO2, steps=range(steps), optimizer=optimizer,
                                            local_world=world // replicas))
    for rank, result in enumerate(got):
        replica = rank // (world // replicas)
        assert result["outer_steps"] == 3
        assert_close_params(result["params"], want[replica], rtol=1e-4, atol=1e-5)
    # the replicas really differ (each keeps its own newest round of progress): the comparison is per replica
    first, last = want[0], want[-1]
    assert max((first[n] - last[n]).abs().max().item() for n in first) > 1e-4


def test_simulation_variants_differ() -> None:
    """The golden values pin down each ingredient: dropping any one of them changes the result."""
    base = simulate(2, 9, BATCH, CO2)
    for change in ({"outer_clip": None}, {"staleness_penalty": False}, {"outer_momentum": 0.0},
                   {"asynchronous": False, "staleness_penalty": False}):
        other = simulate(2, 9, BATCH, {**CO2, **change})
        # well above the golden tests' tolerance (1e-5)
        assert max((base[0][n] - other[0][n]).abs().max().item() for n in base[0]) > 2e-4, change


# -- the outer optimizer on its own ------------------------------------------------------------------------------
def _outer(**kw: Any):
    from memtrain.local_update.outer import OuterOptimizer

    args = dict(optimizer="sgd", lr=0.7, momentum=0.9, clip=None, staleness_penalty=False)
    args.update(kw)
    return OuterOptimizer(torch.zeros(6), [(0, 6)], **args)


@pytest.mark.parametrize("nesterov", [False, True])
def test_outer_momentum_is_torch_sgd_on_the_pseudo_gradient(nesterov: bool) -> None:
    """SlowMo / DiLoCo: the outer step is SGD (heavy ball or Nesterov) with the pseudo-gradient as gradient."""
    outer = _outer(optimizer="nesterov" if nesterov else "sgd")
    p = torch.nn.Parameter(torch.zeros(6))
    ref = torch.optim.SGD([p], lr=0.7, momentum=0.9, nesterov=nesterov)
    g = torch.Generator().manual_seed(0)
    for _ in range(4):
        pseudo = torch.randn(6, generator=g)
        p.grad = pseudo.clone()
        ref.step()
        outer.step(pseudo)
        torch.testing.assert_close(outer.anchor, p.detach(), rtol=1e-6, atol=1e-7)


def test_outer_clipping_changes_the_update_when_the_threshold_is_hit() -> None:
    """The reference code's clip called torch.clamp out of place and dropped the result (a no-op)."""
    pseudo = torch.tensor([0.5, -3.0, 0.1, 2.0, -0.2, 0.0])
    free, clipped, loose = _outer(), _outer(clip=1.0), _outer(clip=10.0)
    for outer in (free, clipped, loose):
        outer.step(pseudo)
        outer.step(pseudo)
    assert not torch.equal(clipped.anchor, free.anchor)
    assert clipped.momentum.abs().max() == 1.0  # the stored momentum itself is clipped
    torch.testing.assert_close(clipped.anchor[[0, 2, 4, 5]], free.anchor[[0, 2, 4, 5]])  # below the threshold
    assert torch.equal(loose.anchor, free.anchor)  # threshold never hit: no change at all


def test_staleness_penalty_scales_by_the_measured_gap() -> None:
    """The reference code's penalty was a constant; here it is 1 + |previous outer step| / rms(pseudo-grad)."""
    outer = _outer(momentum=0.0, lr=1.0, staleness_penalty=True)
    first = torch.tensor([1.0, -1.0, 2.0, 0.0, 0.5, -0.5])
    outer.step(first)  # nothing moved before: no penalty
    torch.testing.assert_close(outer.anchor, -first)
    second = torch.ones(6)
    rms = 1.0
    expected_lambda = 1 + first.abs() / rms
    before = outer.anchor.clone()
    outer.step(second)
    torch.testing.assert_close(outer.anchor - before, -second / expected_lambda)


# -- compression ------------------------------------------------------------------------------------------------
def test_int8_blocks_round_within_half_a_step() -> None:
    from memtrain.local_update.compress import dequantize_int8, quantize_int8

    x = torch.randn(1000, generator=torch.Generator().manual_seed(0)) * torch.linspace(0.01, 10, 1000)
    q, scales = quantize_int8(x, 64)
    assert q.dtype == torch.int8 and scales.numel() == 16
    back = dequantize_int8(q, scales, x.numel(), 64)
    step = scales.repeat_interleave(64)[:1000]
    assert ((back - x).abs() <= step / 2 + 1e-7).all()
    assert not torch.equal(back, x)


# -- the reference code's race, and the overlap itself --------------------------------------------------------------
HELD_STEPS = 2  # local steps the background reduction waits for before its collective


def _slow_reduction(engine: Any, model: Any, opt: Any) -> None:
    """Hold each reduction until HELD_STEPS local steps after the launching one have completed (not a fixed time:
    a loaded machine makes steps slow), so the live parameters change while the snapshot waits. The launching
    step returns only once the reduction thread has started: the steps counted are then surely during it."""
    background = engine.local_update.background
    fast, fast_launch = background.reduce, background.launch
    stepped = threading.Condition()
    count = [0]
    started = threading.Event()
    inner_step = opt.step

    def counting_step(*args: Any, **kwargs: Any) -> Any:
        started.set()  # a step without a launch does not wait
        out = inner_step(*args, **kwargs)
        started.wait(timeout=10.0)
        with stepped:
            count[0] += 1
            stepped.notify_all()
        return out

    def counted_launch(snapshot: torch.Tensor) -> None:
        started.clear()
        fast_launch(snapshot)

    def slow(flat: torch.Tensor) -> torch.Tensor:
        with stepped:
            launching = count[0]  # the launching step is not counted before started is set
            started.set()
            stepped.wait_for(lambda: count[0] >= launching + 1 + HELD_STEPS, timeout=3.0)  # last round: 3 s
        return fast(flat)

    opt.step = counting_step
    background.launch = counted_launch
    background.reduce = slow


@pytest.mark.parametrize("outer_state_sharding", [False, True])  # True: the whole sharded round is held
def test_slow_reduction_overlaps_local_steps_and_keeps_their_progress(outer_state_sharding: bool) -> None:
    lu = {**CO2, "tau": 3, "outer_state_sharding": outer_state_sharding}
    steps = 10  # boundaries after 3, 6, 9
    want = simulate(2, steps, BATCH, lu)
    got = run_distributed(_run, 2, dict(sharding={"stage": 0}, lu=lu, steps=range(steps), setup=_slow_reduction))
    for rank, result in enumerate(got):
        # the reduction read the snapshot, not the live parameters, and each replica kept its local progress
        assert_close_params(result["params"], want[rank], rtol=1e-5, atol=1e-6)
        rounds, times = result["rounds"], result["step_times"]
        assert len(rounds) == 2  # the rounds launched at steps 3 and 6 were applied; the third is in flight
        for r in rounds:
            during = [t for t in times if r["started"] < t < r["finished"]]
            assert len(during) >= 2, (r, times)  # local steps completed while the all-reduce ran
            assert r["waited"] < r["finished"] - r["launched"]  # part of it was hidden


# -- checkpoints ----------------------------------------------------------------------------------------------------
def _resume(rank: int, world: int, sharding: dict, ckpt: str, local_world: int,
            lu: dict[str, Any] = CO2) -> dict[str, Any]:
    kw = dict(lu=lu, local_world=local_world)
    straight = engine_run(rank, world, sharding, steps=range(0, 7), **kw)
    # saved after step 5: the round launched at the boundary after step 4 is still in flight
    engine_run(rank, world, sharding, steps=range(0, 5), save_to=ckpt, **kw)
    resumed = engine_run(rank, world, sharding, steps=range(5, 7), load_from=ckpt, **kw)
    return {"straight": straight["params"], "resumed": resumed["params"], "outer_steps": resumed["outer_steps"]}


@pytest.mark.parametrize("world, sharding, local_world", [
    (2, {"stage": 0}, 2),
    pytest.param(4, {"stage": 3, "hybrid": True, "shard_size": 2}, 2, marks=pytest.mark.slow),
])
def test_a_checkpoint_holds_one_replica_whole(tmp_path: Path, world: int, sharding: dict, local_world: int) -> None:
    """Mid-round the replicas differ; DCP's default would take each tensor from whichever rank wrote least."""
    from memtrain.checkpoint import consolidate

    ckpt = tmp_path / "ckpt"
    results = run_distributed(_run, world, dict(sharding=sharding, lu={"tau": 4, "asynchronous": True},
                                                steps=range(3), save_to=str(ckpt), local_world=local_world))
    saved = consolidate(ckpt, tmp_path / "consolidated.pt")
    first, other = results[0]["params"], results[-1]["params"]
    assert sum(not torch.equal(first[name], other[name]) for name in first) > len(first) // 2  # replicas differ
    assert saved.keys() == first.keys()
    for name, value in saved.items():
        assert torch.equal(value, first[name]), name


def test_resume_onto_more_replicas_starts_every_replica_from_replica_0(tmp_path: Path) -> None:
    ckpt = tmp_path / "ckpt"
    lu = {"tau": 4, "asynchronous": True}
    saved = run_distributed(_run, 2, dict(sharding={"stage": 0}, lu=lu, steps=range(3), save_to=str(ckpt)))[0]
    # No per-rank state applies at another world size: the outer loop restarts from the loaded model.
    for got in run_distributed(_run, 4, dict(sharding={"stage": 0}, lu=lu, steps=range(3, 3), load_from=str(ckpt))):
        assert got["params"].keys() == saved["params"].keys()
        for name, value in saved["params"].items():
            assert torch.equal(got["params"][name], value), name


@pytest.mark.parametrize("world, sharding, local_world, lu", [
    (2, {"stage": 0}, 2, CO2),
    (2, {"stage": 0}, 2, {**CO2, "outer_state_sharding": True}),  # each rank saves and reloads its own slice
    pytest.param(4, {"stage": 2, "hybrid": True, "shard_size": 2}, 2, CO2, marks=pytest.mark.slow),
    pytest.param(4, {"stage": 2, "hybrid": True, "shard_size": 2}, 2, {**CO2, "outer_state_sharding": True},
                 marks=pytest.mark.slow),
])
def test_resume_with_a_round_in_flight_is_bitwise_equal(tmp_path: Path, world: int, sharding: dict,
                                                       local_world: int, lu: dict) -> None:
    results = run_distributed(_resume, world, sharding, str(tmp_path / "ckpt"), local_world, lu)
    for got in results:
        assert got["outer_steps"] == 2  # the saved round was applied after the resume, at step 6
        for name, value in got["straight"].items():
            assert torch.equal(got["resumed"][name], value), name
    assert not torch.equal(results[0]["straight"]["wte.weight"], results[-1]["straight"]["wte.weight"])


# -- bad input ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("data, message", [
    ({"tau": 0}, "local_update.tau=0 is not valid: use a positive integer"),
    ({"tau": 2, "outer_optimizer": "adam"}, "local_update.outer_optimizer='adam' is not valid: choose one of ['sgd', 'nesterov']"),
    ({"tau": 2, "outer_momentum": 1.0}, "local_update.outer_momentum=1.0"),
    ({"tau": 2, "compression": "fp8"}, "local_update.compression='fp8'"),
    ({"tau": 2, "asynchronous": False, "staleness_penalty": True}, "there is no staleness"),
    ({"outer_lr": 0.7}, "local updates are off (local_update.tau=null)"),
    ({"tau": 2, "outer": 1}, "unknown key(s) ['local_update.outer']"),
    ({"tau": 2, "offload": True}, "local updates with an offloaded optimizer are not supported yet"),
    ({"tau": 2, "outer_state_sharding": "yes"}, "local_update.outer_state_sharding='yes' is not valid: use true or false"),
    ({"outer_state_sharding": True}, "local_update.outer_state_sharding=True is not valid: local updates are off"),
])
def test_bad_local_update_settings_name_the_key(data: dict, message: str) -> None:
    from memtrain import ConfigError, MemTrainConfig

    data = dict(data)
    other = {"sharding": {"stage": 2}, "offload": {"optimizer": "cpu"}} if data.pop("offload", False) else {}
    with pytest.raises(ConfigError) as err:
        MemTrainConfig.from_dict({"local_update": data, **other})
    assert message in str(err.value)


def _mismatched_resume(rank: int, world: int, ckpt: str) -> str:
    engine_run(rank, world, {"stage": 0}, {**CO2, "outer_state_sharding": True}, range(3), save_to=ckpt)
    try:
        engine_run(rank, world, {"stage": 0}, CO2, range(3, 4), load_from=ckpt)
    except ValueError as e:
        return str(e)
    return "loaded"


def test_sharded_outer_state_refuses_an_unsharded_resume(tmp_path: Path) -> None:
    """Each rank saved only its slice: resuming without sharding (or with another replica count) is refused."""
    for message in run_distributed(_mismatched_resume, 2, str(tmp_path / "ckpt")):
        assert "'outer_state_sharding': 2" in message and "outer state sharding (replica count)" in message


def test_async_key_of_the_issue_is_accepted() -> None:
    from memtrain import MemTrainConfig

    cfg = MemTrainConfig.from_dict({"local_update": {"tau": 12, "async": False}}).local_update
    assert cfg.tau == 12 and cfg.asynchronous is False


@pytest.mark.parametrize("sharding, world", [({"stage": 3}, 4), ({"stage": 0}, 1), ({"stage": 1}, 1)])
def test_a_replica_group_of_one_fails_before_training(sharding: dict, world: int) -> None:
    from memtrain import ConfigError, Engine, MemTrainConfig

    cfg = MemTrainConfig.from_dict({"sharding": sharding, "local_update": {"tau": 4}})
    with pytest.raises(ConfigError, match="replica group of size 1"):
        Engine.plan(cfg, world, 4)


# -- Lightning ------------------------------------------------------------------------------------------------------
def _lightning(rank: int, world: int, ckpt_dir: str) -> dict[str, Any]:
    import lightning.pytorch as L
    from lightning.pytorch.callbacks import ModelCheckpoint

    from tests.lightning_run import fit

    class Metrics(L.Callback):
        def __init__(self) -> None:
            self.seen: list[dict[str, float]] = []

        def on_train_batch_end(self, trainer: Any, *args: Any) -> None:
            self.seen.append({k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("local_update")})

    metrics = Metrics()
    strategy = {"zero_stage": 0, "local_update": CO2}
    run = fit(rank, world, strategy=strategy, steps=8, global_batch_size=BATCH, callbacks=[metrics],
              trainer={"default_root_dir": ckpt_dir})  # callbacks turn on Lightning's default checkpoints
    # epoch-end checkpoint after 3 steps: the round launched at step 2 is in flight
    common = dict(strategy=strategy, global_batch_size=BATCH, data_steps=3, steps=-1)
    straight = fit(rank, world, epochs=2, **common)
    fit(rank, world, epochs=1, callbacks=[ModelCheckpoint(dirpath=ckpt_dir, save_last=True)], **common)
    resumed = fit(rank, world, epochs=2, ckpt_path=str(Path(ckpt_dir) / "last.ckpt"), **common)
    return {"run": run["params"], "metrics": metrics.seen, "straight": straight["params"], "resumed": resumed["params"]}


def test_lightning_strategy_trains_co2_logs_and_resumes(tmp_path: Path) -> None:
    want = simulate(2, 8, BATCH, CO2, split="strided")  # a DistributedSampler without shuffling
    for rank, got in enumerate(run_distributed(_lightning, 2, str(tmp_path / "ckpts"))):
        assert_close_params(got["run"], want[rank], rtol=1e-5, atol=1e-6)
        outer = [m["local_update/outer_steps"] for m in got["metrics"]]
        assert outer == [0, 0, 0, 1, 1, 2, 2, 3]  # boundaries after steps 2, 4, 6, 8; the first has nothing to apply
        timed = [m for m in got["metrics"] if "local_update/allreduce_s" in m]
        assert timed and all(m["local_update/allreduce_s"] >= 0 and m["local_update/hidden_s"] >= 0 for m in timed)
        for name, value in got["straight"].items():
            assert torch.equal(got["resumed"][name], value), name


def test_registered_co2_names() -> None:
    import lightning.pytorch as pl

    import memtrain  # noqa: F401  (registers the names)

    for name, stage, hybrid in (("memtrain_co2", 0, False), ("memtrain_co2_hybrid", 3, True)):
        strategy = pl.Trainer(strategy=name, accelerator="cpu", devices=2, logger=False).strategy
        cfg = strategy.memtrain_config
        assert (cfg.sharding.stage, cfg.sharding.hybrid, cfg.local_update.tau) == (stage, hybrid, 12)
        assert cfg.local_update.asynchronous and not cfg.local_update.staleness_penalty


def _compressed(rank: int, world: int, sharded: bool = False) -> dict[str, Any]:
    lu = {**CO2, "compression_block": 64, "outer_state_sharding": sharded}
    return {c: engine_run(rank, world, {"stage": 0}, {**lu, "compression": c}, range(9))["params"]
            for c in ("bfloat16", "int8")}


def test_sharded_outer_state_composes_with_compression() -> None:
    """The reduce-scatter carries bf16, or int8 blocks (an all-to-all: each owner receives only its slice's
    blocks, aligned with the unsharded path's; 29,504 / 2 is not a multiple of 64, so the slices are padded):
    the same parameters as the unsharded compressed rounds, up to the penalty's piecewise rms."""
    plain, sharded = run_distributed(_compressed, 2), run_distributed(_compressed, 2, True)
    for p, s in zip(plain, sharded):
        for compression in p:
            assert_close_params(s[compression], p[compression], rtol=0, atol=1e-6)


def test_compressed_rounds_stay_close_to_fp32() -> None:
    """bf16 and int8 (per-block scales) on the wire: close to the fp32 golden values, not equal to them."""
    want = simulate(2, 9, BATCH, CO2)
    for rank, got in enumerate(run_distributed(_compressed, 2)):
        for compression, params in got.items():
            worst = max((params[n] - want[rank][n]).abs().max().item() for n in params)
            assert 0 < worst < 2e-3, (compression, worst)


# -- outer state sharded across the replica group ----------------------------------------------------------------
SYNC = {"tau": 2, "asynchronous": False, "outer_lr": 0.8, "outer_momentum": 0.5, "outer_clip": 2e-3}


def _sharded_and_not(rank: int, world: int, lu: dict, optimizer: str, sharding: dict, local_world: int,
                     steps: int) -> dict[str, Any]:
    def run(on: bool) -> dict[str, Any]:
        return engine_run(rank, world, sharding, {**lu, "outer_state_sharding": on}, range(steps),
                          optimizer=optimizer, local_world=local_world)

    return {"plain": run(False), "sharded": run(True)}


@pytest.mark.parametrize("world, lu, optimizer, sharding, local_world", [
    (2, SYNC, "adamw", {"stage": 0}, 2),
    (2, CO2, "adamw", {"stage": 0}, 2),
    (4, SYNC, "sgd", {"stage": 0}, 4),
    (4, CO2, "sgd", {"stage": 0}, 4),
    pytest.param(4, CO2, "sgd", {"stage": 3, "hybrid": True, "shard_size": 2}, 2, marks=pytest.mark.slow),
])
def test_sharded_outer_state_matches_unsharded(world: int, lu: dict, optimizer: str, sharding: dict,
                                               local_world: int) -> None:
    steps = 9  # four boundaries: with CO2 three outer steps applied and one round in flight
    results = run_distributed(_sharded_and_not, world, lu, optimizer, sharding, local_world, steps)
    replicas = world // sharding.get("shard_size", 1)
    for got in results:
        plain, sharded = got["plain"], got["sharded"]
        assert sharded["outer_steps"] == plain["outer_steps"] == (4 if lu is SYNC else 3)
        if lu is SYNC:  # element-wise outer step, and gloo's reduce-scatter sums in its all-reduce's order
            for name, value in plain["params"].items():
                assert torch.equal(sharded["params"][name], value), name
        else:  # the penalty's rms of a tensor split between two owners is summed in two pieces (last bits)
            assert_close_params(sharded["params"], plain["params"], rtol=0, atol=1e-6)
        # the outer state (anchor, momentum, previous step) of one rank is 1/R of the unsharded one's (the tiny
        # model's 29,504 parameters, and a hybrid rank's 14,752, divide by R: no padding)
        assert sharded["outer_state_bytes"] * replicas == plain["outer_state_bytes"], (sharded, plain)
    pieces = 29504 // sharding.get("shard_size", 1)  # this rank's flat parameters (its FSDP shard when hybrid)
    assert plain["outer_state_bytes"] == 4 * pieces * (3 if lu is CO2 else 2)  # anchor, momentum (+ previous step)
