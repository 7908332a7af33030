"""Benchmark: asynchronous checkpoints of a >= 1 GB training state, memtrain vs torch.save, Lightning's
AsyncCheckpointIO and DCP async_save, plus restore after a kill (keeper memory vs durable files), in one run.

    flock /tmp/memtrain-bench.lock python scripts/bench/checkpoint.py --out bench_results/checkpoint.json

Model and loop (the same for every contender): an MLP of ``--layers`` Linear(``--width``, ``--width``) layers
(ReLU between), fp32, AdamW (foreach), MSE loss on a fixed random batch of ``--batch`` rows; prepared by memtrain's
Engine (world size 1 over gloo, ``sharding.stage=0``), so parameters are DTensors and memtrain's own path runs.
Defaults: 8 x 3584 -> 102.8M parameters, params + AdamW's two moments = 1.23 GB of state (all of it checkpointed).
Each contender runs in its own fresh process: ``--warmup`` steps, ``--steps`` timed steps without checkpoints,
``--ckpt-warmup`` checkpointed steps (first-touch of buffers and files), then ``--steps`` timed steps with a
checkpoint after every optimizer step. Step time = wall clock of one whole iteration (forward, backward,
optimizer step, zero_grad, checkpoint call and any wait). Throughput cost = median checkpointed step /
median plain step of the same process - 1.

Contenders and what counts as the stall (time the training thread is blocked by checkpointing, per checkpoint):

    none             no checkpoints (the baseline loop)
    torch.save       torch.save({"model": sd, "optimizer": osd}, file) on the training thread: the whole save,
                     state-dict calls included (file overwritten each step, page cache, no fsync)
    lightning-async  Lightning's AsyncCheckpointIO(TorchCheckpointIO()).save_checkpoint(ckpt, file): the call (it
                     clones every tensor on the training thread, then saves in its thread) + waiting for the
                     previous save to finish before the next one (no unbounded backlog of 1.2 GB clones)
    dcp-async        torch.distributed.checkpoint.async_save(state, checkpoint_id=dir, async_stager=
                     DefaultStager(StagingOptions(use_pinned_memory=True, use_shared_memory=False,
                     use_async_staging=True, use_non_blocking_copy=False))) (thread executor): the call + waiting
                     for its staging copy before the next optimizer step changes the state + waiting for the
                     previous upload before the next save. torch ignores pin_memory without CUDA (it warns), and
                     non-blocking copies need an accelerator: on this CPU machine the staging is a plain copy in
                     DCP's staging thread, into buffers it caches across saves.
    memtrain         checkpoint.snapshot_every_n_steps=1 (keeper on, no durable flush): engine.snapshot(...)
                     after each step. Stall = wall clock of the engine.snapshot call + the wait for the previous
                     copy inside optimizer.step (CheckpointStats.stall_s delta around it); the stats' own total
                     (stall_s delta per step) is reported beside it as a cross-check.
    memtrain-flush   the same plus a durable DCP flush of every ``--flush-every``-th snapshot (checkpoint.dirpath,
                     persist_every_n_snapshots), written in the background from the keeper slot.

Restore after a kill: a trainer (memtrain, keeper on, durable flush of every snapshot) trains and snapshots,
waits until the last flush committed, takes one more step without a snapshot (the run that never stopped; its
state's checksum is recorded) and is SIGKILLed. Then, each in a new process with the same config: (a) restore
from the keeper's memory; (b) the keeper is shut down, the page cache dropped (``sync; echo 3 >
/proc/sys/vm/drop_caches``, root; else only the checkpoint's files are evicted with posix_fadvise DONTNEED,
and the output says so), library imports re-warmed by a throwaway ``import torch, memtrain`` process, and the
state restored from the durable checkpoint (a fresh, empty keeper is started by the trainer). Figures:
restore = ``engine.restore(model, optimizer)`` from its call until it returns and training can step (from
memory the optimizer state is still arriving in the background then; the step's update waits for it); all in
place = from the call until every restored tensor is filled (CheckpointStats.restore_complete_s); + first step
= until the first training step after the restore is done; whole restart = from the parent's Popen until then.
The state after that first step is checked against the never-stopped run's (sum of every parameter and moment,
float64).

Not a test: it takes a few minutes and several GB of memory and disk. Results: table, ratios against the
issue's targets, JSON at ``--out`` (logs of each child in ``<out>_logs/``).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

CONTENDERS = ("none", "torch.save", "lightning-async", "dcp-async", "memtrain", "memtrain-flush")
GB = 1e9
TARGETS = {"stall_vs_torch_save": 1 / 20, "stall_vs_dcp_async": 1 / 3, "throughput_cost": 0.05,
           "restore_speedup": 10.0}


# ------------------------------------------------------------------------------------------------------------
# Child side
# ------------------------------------------------------------------------------------------------------------
def build(args: argparse.Namespace, checkpoint: dict[str, Any] | None) -> tuple[Any, Any, Any]:
    """Engine-prepared MLP + AdamW; ``checkpoint``: memtrain's checkpoint section (None: snapshots off)."""
    import torch

    from memtrain import Engine, MemTrainConfig

    torch.manual_seed(0)
    layers: list[torch.nn.Module] = []
    for i in range(args.layers):
        layers.append(torch.nn.Linear(args.width, args.width))
        if i < args.layers - 1:
            layers.append(torch.nn.ReLU())
    model = torch.nn.Sequential(*layers)
    cfg: dict[str, Any] = {"sharding": {"stage": 0}}
    if checkpoint is not None:
        cfg["checkpoint"] = checkpoint
    engine = Engine.create(MemTrainConfig.from_dict(cfg), 1, 1, "cpu")
    engine.prepare_model(model)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.1, foreach=True)
    engine.prepare_optimizer(opt, model)
    return engine, model, opt


def data(args: argparse.Namespace) -> tuple[Any, Any]:
    import torch

    gen = torch.Generator().manual_seed(1)
    return torch.randn(args.batch, args.width, generator=gen), torch.randn(args.batch, args.width, generator=gen)


def _local(t: Any) -> Any:
    from torch.distributed.tensor import DTensor

    return t.to_local() if isinstance(t, DTensor) else t


def state_bytes(model: Any, opt: Any) -> int:
    total = sum(_local(p).numel() * _local(p).element_size() for p in model.parameters())
    for s in opt.state.values():
        total += sum(_local(v).numel() * _local(v).element_size() for v in s.values() if hasattr(v, "numel"))
    return total


def checksum(model: Any, opt: Any) -> float:
    """Sum of every parameter and optimizer moment (float64): equal states give equal sums."""
    import torch

    total = torch.zeros((), dtype=torch.float64)
    with torch.no_grad():
        for p in model.parameters():
            total += _local(p).double().sum()
            for v in opt.state.get(p, {}).values():
                if isinstance(v, torch.Tensor) and v.numel() > 1:
                    total += _local(v).double().sum()
    return float(total)


def run_throughput(args: argparse.Namespace, name: str, out: dict[str, Any]) -> None:
    import torch.nn.functional as F

    folder = Path(args.dir) / name
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    checkpoint = None
    if name.startswith("memtrain"):
        checkpoint = {"snapshot_every_n_steps": 1, "keeper": True, "keeper_dir": str(Path(args.dir) / "keeper"),
                      "keeper_idle_timeout_s": 60.0}
        if name == "memtrain-flush":
            checkpoint.update(dirpath=str(folder / "durable"), persist_every_n_snapshots=args.flush_every,
                              keep_latest_k=1)
    out["memtrain_checkpoint_config"] = checkpoint
    engine, model, opt = build(args, checkpoint)
    x, y = data(args)

    saver = make_saver(args, name, folder, engine, model, opt, out)
    plain, ckpt, stalls, stalls_stats = [], [], [], []
    total = args.warmup + args.steps + args.ckpt_warmup + args.steps
    for i in range(total):
        do_ckpt = name != "none" and i >= args.warmup + args.steps
        timed = args.warmup <= i < args.warmup + args.steps or i >= args.warmup + args.steps + args.ckpt_warmup
        start = time.perf_counter()
        loss = F.mse_loss(model(x), y)
        loss.backward()
        blocked = saver["before_step"]() if do_ckpt else 0.0
        stats0 = engine.checkpoints.stats.stall_s if engine.checkpoints is not None else 0.0
        t = time.perf_counter()
        opt.step()
        step_wait = 0.0
        if engine.checkpoints is not None:  # memtrain: the wait for the previous copy happens inside step()
            step_wait = engine.checkpoints.stats.stall_s - stats0
        opt_s = time.perf_counter() - t
        opt.zero_grad(set_to_none=True)
        if do_ckpt:
            blocked += step_wait + saver["save"](i + 1)
        elapsed = time.perf_counter() - start
        stats_stall = engine.checkpoints.stats.stall_s - stats0 if engine.checkpoints is not None else None
        print(f"[{name}] step {i + 1} {'ckpt' if do_ckpt else 'plain'} {elapsed:.3f}s stall {blocked:.4f}s "
              f"(optimizer.step {opt_s:.3f}s) loss {loss.item():.5f}", flush=True)
        if timed:
            (ckpt if do_ckpt else plain).append(elapsed)
            if do_ckpt:
                stalls.append(blocked)
                stalls_stats.append(stats_stall)
    t = time.perf_counter()
    saver["finish"]()
    out["final_wait_s"] = time.perf_counter() - t
    out.update(plain_step_s=plain, ckpt_step_s=ckpt, stall_s=stalls, median_plain_step_s=statistics.median(plain),
               state_bytes=state_bytes(model, opt),
               params=sum(p.numel() for p in model.parameters()))
    if name != "none":
        out["median_ckpt_step_s"] = statistics.median(ckpt)
        out["median_stall_s"] = statistics.median(stalls)
        out["mean_stall_s"] = statistics.fmean(stalls)
        out["throughput_cost"] = out["median_ckpt_step_s"] / out["median_plain_step_s"] - 1
    if engine.checkpoints is not None:
        out["stats_stall_s"] = stalls_stats
        out["median_stats_stall_s"] = statistics.median(stalls_stats)
        out["checkpoint_status"] = engine.checkpoints.status()
    engine.close(finished=True)
    shutil.rmtree(folder, ignore_errors=True)


def make_saver(args: argparse.Namespace, name: str, folder: Path, engine: Any, model: Any, opt: Any,
               out: dict[str, Any]) -> dict[str, Any]:
    """before_step() -> seconds blocked before optimizer.step; save(step) -> seconds blocked by the save;
    finish(): everything written."""
    import torch

    nothing = {"before_step": lambda: 0.0, "save": lambda step: 0.0, "finish": lambda: None}
    if name == "none":
        return nothing
    if name.startswith("memtrain"):
        def snap(step: int) -> float:
            t = time.perf_counter()
            engine.snapshot(step, model, opt, meta={"step": step}, rank_state={"rng": torch.get_rng_state()})
            return time.perf_counter() - t

        return {**nothing, "save": snap, "finish": engine.checkpoints.wait}
    if name == "torch.save":
        def save(step: int) -> float:
            t = time.perf_counter()
            torch.save({"model": model.state_dict(), "optimizer": opt.state_dict(), "step": step},
                       folder / "last.pt")
            return time.perf_counter() - t

        return {**nothing, "save": save}
    if name == "lightning-async":
        from lightning.pytorch.plugins.io import AsyncCheckpointIO, TorchCheckpointIO

        io = AsyncCheckpointIO(TorchCheckpointIO())

        def wait_previous() -> None:
            if io._executor is not None:  # its single worker runs saves in order: a no-op after them = all done
                io._executor.submit(lambda: None).result()

        def save(step: int) -> float:
            t = time.perf_counter()
            wait_previous()
            io.save_checkpoint({"state_dict": model.state_dict(), "optimizer_states": [opt.state_dict()],
                                "global_step": step}, folder / "last.ckpt")
            return time.perf_counter() - t

        def finish() -> None:
            io.teardown()

        return {**nothing, "save": save, "finish": finish}
    if name == "dcp-async":
        import torch.distributed as dist
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.staging import DefaultStager, StagingOptions
        from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

        options = StagingOptions(use_pinned_memory=True, use_shared_memory=False, use_async_staging=True,
                                 use_non_blocking_copy=False)
        stager = DefaultStager(options)
        out["dcp_staging_options"] = str(options)
        out["dcp_pinned_effective"] = bool(stager._state_dict_stager.pin_memory)
        pending: dict[str, Any] = {"response": None}
        group = dist.new_group(backend="gloo")  # its own: the training loop's group all-reduces gradients meanwhile

        def before_step() -> float:  # the staging copy must finish before the optimizer changes the state
            response = pending["response"]
            if response is None:
                return 0.0
            t = time.perf_counter()
            response.staging_completion.result()
            return time.perf_counter() - t

        def save(step: int) -> float:
            t = time.perf_counter()
            if pending["response"] is not None:
                pending["response"].upload_completion.result()
            state = {"model": get_model_state_dict(model), "optimizer": get_optimizer_state_dict(model, opt)}
            pending["response"] = dcp.async_save(state, checkpoint_id=str(folder / "last"), async_stager=stager,
                                                 process_group=group)
            return time.perf_counter() - t

        def finish() -> None:
            if pending["response"] is not None:
                pending["response"].upload_completion.result()
            stager.close()

        out["dcp_response_type"] = "AsyncSaveResponse"
        return {"before_step": before_step, "save": save, "finish": finish}
    raise ValueError(name)


def restore_config(args: argparse.Namespace) -> dict[str, Any]:
    return {"snapshot_every_n_steps": 1, "keeper": True, "keeper_dir": str(Path(args.dir) / "keeper"),
            "keeper_idle_timeout_s": 120.0, "dirpath": str(Path(args.dir) / "restore" / "durable"),
            "persist_every_n_snapshots": 1, "keep_latest_k": 1}


def run_victim(args: argparse.Namespace, out: dict[str, Any]) -> None:
    """Train and snapshot (keeper + durable flush of each snapshot), then wait to be killed."""
    import torch
    import torch.nn.functional as F

    engine, model, opt = build(args, restore_config(args))
    x, y = data(args)
    for step in range(1, args.victim_steps + 1):
        F.mse_loss(model(x), y).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        engine.snapshot(step, model, opt, meta={"step": step}, rank_state={"rng": torch.get_rng_state()})
        print(f"[victim] step {step}", flush=True)
    engine.checkpoints.wait()  # the last snapshot's copy and its durable flush are committed
    out.update(step=args.victim_steps, checksum_at_snapshot=checksum(model, opt), state_bytes=state_bytes(model, opt),
               status_before_kill=engine.checkpoints.status())
    # The run that never stopped takes one more step (no snapshot of it): a restored trainer's first step must
    # end in the same state.
    F.mse_loss(model(x), y).backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    out.update(checksum=checksum(model, opt), status="ok")
    Path(args.result).write_text(json.dumps(out))
    print("ready", flush=True)
    time.sleep(3600)


def run_restore(args: argparse.Namespace, out: dict[str, Any]) -> None:
    import torch.nn.functional as F

    t_setup = time.perf_counter()
    engine, model, opt = build(args, restore_config(args))
    x, y = data(args)
    out["setup_s"] = time.perf_counter() - t_setup
    template = type(engine)._template
    spent: list[float] = []

    def timed_template(*a: Any) -> Any:  # the live state to fill (allocates and initializes optimizer state)
        t = time.perf_counter()
        try:
            return template(*a)
        finally:
            spent.append(time.perf_counter() - t)

    engine._template = timed_template  # the instance attribute shadows the static method restore() calls
    start = time.perf_counter()
    restored = engine.restore(model, opt)
    out["restore_s"] = time.perf_counter() - start  # training can step: the optimizer state may still be arriving
    out["template_s"] = sum(spent)
    assert restored is not None, "nothing restored"
    out.update(restored_step=restored.step, source=restored.source, manager_seconds=restored.seconds,
               late_tensors=len(restored.late))
    t = time.perf_counter()
    F.mse_loss(model(x), y).backward()
    opt.step()  # waits for the late part of the restore, if it is not in place yet
    opt.zero_grad(set_to_none=True)
    out["first_step_s"] = time.perf_counter() - t
    out["first_step_done_unix"] = time.time()
    out["restore_until_first_step_done_s"] = time.perf_counter() - start
    stats = engine.checkpoints.stats
    out["state_complete_s"] = stats.restore_complete_s  # from the restore call until every tensor was in place
    out["first_step_waited_s"] = stats.restore_wait_s
    out["checksum"] = checksum(model, opt)  # after the first step: compared with the victim's next step


def child(args: argparse.Namespace) -> int:
    out: dict[str, Any] = {"contender": args.child, "status": "failed", "process_start_unix": time.time(),
                           "load_at_start": os.getloadavg()}
    import torch
    import torch.distributed as dist

    try:
        torch.set_num_threads(args.threads)
        dist.init_process_group("gloo", rank=0, world_size=1)
        out["imports_and_pg_s"] = time.time() - out["process_start_unix"]
        if args.child == "victim":
            run_victim(args, out)
        elif args.child.startswith("restore"):
            run_restore(args, out)
        else:
            run_throughput(args, args.child, out)
        out["status"] = "ok"
    except BaseException as err:  # noqa: BLE001 - reported to the parent
        out["error"] = f"{type(err).__name__}: {err}"
        out["traceback"] = traceback.format_exc()
        print(out["traceback"], file=sys.stderr, flush=True)
    out["load_at_end"] = os.getloadavg()
    Path(args.result).write_text(json.dumps(out))
    os._exit(0 if out["status"] == "ok" else 1)  # no teardown: a restored trainer leaves the keeper's slots as they are


# ------------------------------------------------------------------------------------------------------------
# Parent side
# ------------------------------------------------------------------------------------------------------------
def child_env(port: int) -> dict[str, str]:
    return {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "RANK": "0", "LOCAL_RANK": "0",
            "WORLD_SIZE": "1", "LOCAL_WORLD_SIZE": "1",
            "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}


def child_argv(args: argparse.Namespace, name: str, result: Path) -> list[str]:
    return [sys.executable, os.path.abspath(__file__), "--dir", args.dir, "--layers", str(args.layers),
            "--width", str(args.width), "--batch", str(args.batch), "--warmup", str(args.warmup),
            "--steps", str(args.steps), "--ckpt-warmup", str(args.ckpt_warmup), "--threads", str(args.threads),
            "--flush-every", str(args.flush_every), "--victim-steps", str(args.victim_steps),
            "--child", name, "--result", str(result)]


def log_path(args: argparse.Namespace, name: str) -> Path:
    path = Path(Path(args.out).with_suffix("").as_posix() + "_logs") / f"{name}.log"
    path.parent.mkdir(parents=True, exist_ok=True)
    return path


def read_result(result: Path, name: str) -> dict[str, Any]:
    try:
        out = json.loads(result.read_text() or "{}")
    except (OSError, json.JSONDecodeError):
        out = {}
    result.unlink(missing_ok=True)
    out.setdefault("contender", name)
    out.setdefault("status", "failed")
    return out


def run_child(args: argparse.Namespace, name: str, port: int) -> dict[str, Any]:
    result = Path(tempfile.mkstemp(prefix=f"ckpt_bench_{name}_", suffix=".json")[1])
    log = log_path(args, name)
    print(f"--- {name} (log: {log})", flush=True)
    launched = time.time()
    with open(log, "w") as logf:
        proc = subprocess.Popen(child_argv(args, name, result), env=child_env(port), stdout=logf,
                                stderr=subprocess.STDOUT)
        try:
            proc.wait(timeout=args.timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    out = read_result(result, name)
    out["launched_unix"] = launched
    out["process_wall_s"] = time.time() - launched
    out["log"] = str(log)
    if out["status"] != "ok":
        out.setdefault("error", f"exit status {proc.returncode}; see {log}")
        print(f"    {name}: FAILED: {out['error']}\n{out.get('traceback', '')}", flush=True)
    return out


def run_victim_and_kill(args: argparse.Namespace, port: int) -> dict[str, Any]:
    result = Path(tempfile.mkstemp(prefix="ckpt_bench_victim_", suffix=".json")[1])
    log = log_path(args, "victim")
    print(f"--- victim: train, snapshot, flush, SIGKILL (log: {log})", flush=True)
    with open(log, "w") as logf:
        proc = subprocess.Popen(child_argv(args, "victim", result), env=child_env(port), stdout=subprocess.PIPE,
                                stderr=logf, text=True)
        assert proc.stdout is not None
        deadline = time.time() + args.timeout
        ready = False
        for line in proc.stdout:
            logf.write(line)
            logf.flush()
            if line.strip() == "ready":
                ready = True
                break
            if time.time() > deadline:
                break
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    out = read_result(result, "victim")
    out["killed"] = ready
    if not ready:
        out["status"] = "failed"
        out.setdefault("error", f"the victim never got ready; see {log}")
    return out


def keeper_sockets(args: argparse.Namespace) -> list[Path]:
    return sorted((Path(args.dir) / "keeper").glob("*.sock"))


def shutdown_keepers(args: argparse.Namespace) -> int:
    from memtrain.checkpoint.keeper import KeeperClient

    n = 0
    for sock in keeper_sockets(args):
        try:
            KeeperClient(sock, 30.0, start=False).shutdown()
            n += 1
        except OSError:
            pass
    return n


def drop_page_cache(files_root: Path) -> str:
    """Drop the whole page cache (root); else evict the checkpoint's files. Returns how it was done."""
    subprocess.run(["sync"], check=False)
    try:
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
        return "drop_caches"
    except OSError as e:
        evicted = 0
        for f in files_root.rglob("*"):
            if f.is_file():
                fd = os.open(f, os.O_RDONLY)
                try:
                    os.fsync(fd)
                    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
                    evicted += 1
                finally:
                    os.close(fd)
        print(f"    could not drop the page cache ({e}): evicted only the checkpoint's {evicted} files "
              "(posix_fadvise DONTNEED)", flush=True)
        return f"fadvise_dontneed ({e})"


def run_restores(args: argparse.Namespace, port: int) -> dict[str, Any]:
    shutil.rmtree(Path(args.dir) / "restore", ignore_errors=True)
    shutdown_keepers(args)
    victim = run_victim_and_kill(args, port)
    out: dict[str, Any] = {"victim": victim}
    if victim["status"] != "ok":
        return out
    memory = run_child(args, "restore-memory", port + 1)
    memory["whole_restart_s"] = memory.get("first_step_done_unix", float("nan")) - memory["launched_unix"]
    out["memory"] = memory
    out["keepers_shut_down"] = shutdown_keepers(args)
    time.sleep(1.0)
    out["page_cache"] = drop_page_cache(Path(args.dir) / "restore")
    t = time.perf_counter()
    subprocess.run([sys.executable, "-c", "import torch, torch.distributed.checkpoint, memtrain"],
                   env=child_env(port), check=False)
    out["rewarm_imports_s"] = time.perf_counter() - t
    disk = run_child(args, "restore-durable", port + 2)
    disk["whole_restart_s"] = disk.get("first_step_done_unix", float("nan")) - disk["launched_unix"]
    out["durable"] = disk
    out["keepers_shut_down_end"] = shutdown_keepers(args)
    for key in ("memory", "durable"):
        r = out[key]
        r["bitwise_checksum_equal"] = r.get("checksum") == victim.get("checksum")
    return out


def verdict(value: float | None, ok: bool) -> str:
    return "n/a" if value is None else ("met" if ok else "NOT met")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--width", type=int, default=3584)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--steps", type=int, default=6, help="timed steps, without and again with checkpoints")
    parser.add_argument("--ckpt-warmup", type=int, default=3, help="checkpointed steps before the timed ones")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--flush-every", type=int, default=3, help="memtrain-flush: persist_every_n_snapshots")
    parser.add_argument("--victim-steps", type=int, default=3)
    parser.add_argument("--contenders", nargs="+", default=list(CONTENDERS), choices=CONTENDERS)
    parser.add_argument("--no-restore", action="store_true", help="skip the kill / restore part")
    parser.add_argument("--dir", default="/tmp/memtrain-bench-checkpoint",
                        help="checkpoint files and keeper sockets (a local disk, not tmpfs)")
    parser.add_argument("--timeout", type=float, default=600, help="seconds per child process")
    parser.add_argument("--port", type=int, default=29700)
    parser.add_argument("--out", default="bench_results/checkpoint.json")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--result", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        return child(args)

    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.dir).mkdir(parents=True, exist_ok=True)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True,
                            check=False).stdout.strip()
    report: dict[str, Any] = {
        "command": " ".join([sys.executable.split("/")[-1], *sys.argv]) if argv is None else argv,
        "settings": {k: v for k, v in vars(args).items() if k not in ("child", "result")},
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "python": platform.python_version()},
        "commit": commit, "date_utc": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "load_before": os.getloadavg(), "targets": TARGETS,
    }
    results: dict[str, dict[str, Any]] = {}
    try:
        for i, name in enumerate(args.contenders):
            results[name] = run_child(args, name, args.port + 10 * i)
            for line in Path(results[name]["log"]).read_text().splitlines():
                if "] step " in line:
                    print("   ", line)
        report["throughput"] = results
        if not args.no_restore:
            report["restore"] = run_restores(args, args.port + 100)
    finally:
        report["keepers_shut_down_final"] = shutdown_keepers(args)
    report["load_after"] = os.getloadavg()

    # -- table and ratios -------------------------------------------------------------------------------------
    ok = {n: r for n, r in results.items() if r["status"] == "ok"}
    some = next(iter(ok.values()), {})
    print(f"\nstate: {some.get('params', 0) / 1e6:.1f}M params, {some.get('state_bytes', 0) / GB:.2f} GB "
          f"(params + AdamW moments), checkpoint after every step")
    print(f"{'contender':<16} {'plain step s':>12} {'ckpt step s':>12} {'cost %':>8} {'stall s (median)':>17} "
          f"{'stall s (mean)':>15}")
    for name, r in results.items():
        if r["status"] != "ok":
            print(f"{name:<16} {r['status'].upper()}: {r.get('error')}")
            continue
        if name == "none":
            print(f"{name:<16} {r['median_plain_step_s']:>12.3f} {'-':>12} {'-':>8} {'-':>17} {'-':>15}")
            continue
        print(f"{name:<16} {r['median_plain_step_s']:>12.3f} {r['median_ckpt_step_s']:>12.3f} "
              f"{100 * r['throughput_cost']:>8.1f} {r['median_stall_s']:>17.4f} {r['mean_stall_s']:>15.4f}")
    ratios: dict[str, Any] = {}
    mt = ok.get("memtrain")
    if mt is not None:
        mt_stall = mt["median_stall_s"]
        print(f"\nmemtrain stall cross-check: wall {mt_stall:.4f} s, CheckpointStats.stall_s per step "
              f"{mt['median_stats_stall_s']:.4f} s (medians)")
        for other, key in (("torch.save", "stall_vs_torch_save"), ("dcp-async", "stall_vs_dcp_async")):
            if other in ok:
                value = mt_stall / ok[other]["median_stall_s"]
                ratios[key] = {"value": value, "target": TARGETS[key], "met": value <= TARGETS[key]}
        ratios["throughput_cost"] = {"value": mt["throughput_cost"], "target": TARGETS["throughput_cost"],
                                     "met": mt["throughput_cost"] <= TARGETS["throughput_cost"]}
        if "memtrain-flush" in ok:
            ratios["throughput_cost_with_flush"] = {"value": ok["memtrain-flush"]["throughput_cost"],
                                                    "target": TARGETS["throughput_cost"],
                                                    "met": ok["memtrain-flush"]["throughput_cost"]
                                                    <= TARGETS["throughput_cost"]}
    restore = report.get("restore", {})
    mem, disk = restore.get("memory", {}), restore.get("durable", {})
    if mem.get("status") == "ok" and disk.get("status") == "ok":
        print(f"\nrestore after SIGKILL ({restore['victim']['state_bytes'] / GB:.2f} GB, step "
              f"{restore['victim']['step']}; page cache: {restore['page_cache']}):")
        print(f"{'from':<16} {'source':>8} {'restore s':>10} {'all in place s':>15} {'of it template s':>17} "
              f"{'+ first step s':>15} {'step waited s':>14} {'whole restart s':>16} {'state equal':>12}")
        for label, r in (("keeper memory", mem), ("durable files", disk)):
            print(f"{label:<16} {r['source']:>8} {r['restore_s']:>10.3f} {r['state_complete_s']:>15.3f} "
                  f"{r['template_s']:>17.3f} {r['restore_until_first_step_done_s']:>15.3f} "
                  f"{r['first_step_waited_s']:>14.3f} {r['whole_restart_s']:>16.2f} "
                  f"{r['bitwise_checksum_equal']!s:>12}")
        value = disk["restore_s"] / mem["restore_s"]
        ratios["restore_speedup"] = {"value": value, "target": TARGETS["restore_speedup"],
                                     "met": value >= TARGETS["restore_speedup"]}
        ratios["restore_speedup_all_in_place"] = {"value": disk["state_complete_s"] / mem["state_complete_s"]}
        ratios["restore_and_first_step_speedup"] = {
            "value": disk["restore_until_first_step_done_s"] / mem["restore_until_first_step_done_s"]}
        ratios["whole_restart_speedup"] = {"value": disk["whole_restart_s"] / mem["whole_restart_s"]}
    elif not args.no_restore:
        print(f"\nrestore part failed: victim {restore.get('victim', {}).get('error')}, memory {mem.get('error')}, "
              f"durable {disk.get('error')}")
    report["ratios"] = ratios
    print("\nratios vs targets:")
    for key, r in ratios.items():
        target = r.get("target")
        if target is None:
            print(f"  {key:<28} {r['value']:.3f}")
        elif key.startswith("restore"):
            print(f"  {key:<28} x{r['value']:.1f}   target >= x{target:.0f}: {verdict(r['value'], r['met'])}")
        elif key.startswith("throughput"):
            print(f"  {key:<28} {100 * r['value']:.1f}%   target <= {100 * target:.0f}%: {verdict(r['value'], r['met'])}")
        else:
            print(f"  {key:<28} {r['value']:.4f} (1/{1 / r['value']:.1f})   target <= 1/{1 / target:.0f}: "
                  f"{verdict(r['value'], r['met'])}")
    print(f"\nload average before {report['load_before']}, after {report['load_after']}")
    Path(args.out).write_text(json.dumps(report, indent=1, default=str))
    print(f"wrote {args.out}")
    shutil.rmtree(Path(args.dir) / "restore", ignore_errors=True)
    return 0 if all(r["status"] == "ok" for r in results.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
