"""Benchmark: tokens/s and peak per-rank memory of memtrain ZeRO stages 0-3 against plain FSDP2 and DeepSpeed ZeRO-3.

One run, one contender after another, each in its own fresh set of N gloo processes on CPU (spawned here, one
torch thread each, process group from a file:// store in a temp folder), all on the same reference GPT, seed,
byte corpus and per-rank batch, all with the same optimizer (torch AdamW, foreach). With ``--device cuda`` the
ranks are nccl processes instead, rank r on cuda:r (at most ``torch.cuda.device_count()`` ranks), with the
model, data and optimizer state on that GPU:

    memtrain-zero{0,1,2,3}  Lightning Trainer + MemTrainStrategy(zero_stage=s), launched externally
    lightning-fsdp2         Lightning Trainer + ModelParallelStrategy, fully_shard by hand in configure_model
                            (each block, then the GPT root) -- the anchor for the memtrain ratios
    deepspeed-zero3         deepspeed.initialize(ZeRO stage 3) in a plain loop (CPU accelerator and gloo, or CUDA
                            and nccl with --device cuda; no gradient clipping like the others); optional
                            (``pip install --no-build-isolation deepspeed``): reported as skipped when it cannot be
                            imported. On CPU its first run JIT-builds a small CPU comm op (about a minute, cached in
                            ~/.cache/torch_extensions; not timed).
    memtrain-engine-zero3   (opt-in) memtrain's Engine at stage 3 in a plain loop: like for like with DeepSpeed's loop

Only the steps after ``--warmup`` are timed: barrier, clock, ``--steps`` optimizer steps, barrier, clock (on CUDA
with ``torch.cuda.synchronize()`` before each barrier and each clock reading).
tokens/s = tokens of all ranks in the timed steps / the slowest rank's wall seconds.

Memory is per rank, the maximum over ranks is reported (CPU resident memory with the default ``--device cpu``):
    peak_train_delta  peak RSS during the timed steps (the kernel's RSS high-water mark, reset through
                      /proc/self/clear_refs when the timed steps start, read through memtrain's
                      ``peak_memory_bytes``) minus the RSS right before the model was built (after imports and the
                      process group). The headline figure.
    peak_setup_delta  the high-water mark from process start to the first timed step, minus the same baseline
                      (includes building the full model on every rank before it is sharded).
    accounted         bytes of params / grads / optimizer state (and DeepSpeed's fp32 master partitions) this
                      rank holds after the last step: ``memtrain.telemetry.account_training_state`` for the
                      FSDP2-based contenders, the ZeRO-3 optimizer's partitions for DeepSpeed.
With ``--device cuda`` the same fields hold CUDA caching-allocator bytes instead of RSS: the baseline is
``torch.cuda.memory_allocated()`` before the model is built, the setup peak ``torch.cuda.max_memory_allocated()``
at the first timed step, where ``torch.cuda.reset_peak_memory_stats()`` is called, and the train peak
``torch.cuda.max_memory_allocated()`` after the last timed step (peak allocated bytes during the timed steps).

    python scripts/bench/sharding.py --nproc 2 --steps 30 --warmup 5 --out bench_results/sharding.json
    python scripts/bench/sharding.py --device cuda --nproc 1 --steps 20 --warmup 5 --out bench_results/sharding_gpu.json

On a shared machine, ``--repeats R`` runs all contenders R times round-robin and reports the median tokens/s.
A contender that crashes or hangs is reported as failed (with its error) and the others still run. Each rank's
stdout/stderr go to ``<out without .json>_logs/<contender>.rank<r>.log``.
"""
from __future__ import annotations

import argparse
import datetime
import importlib.metadata
import json
import logging
import os
import platform
import queue as queue_mod
import re
import resource
import socket
import statistics
import sys
import tempfile
import time
import traceback
import warnings
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

os.environ.setdefault("OMP_NUM_THREADS", "1")  # inherited by the spawned ranks before torch starts there

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
import torch.multiprocessing as mp  # noqa: E402

MEMTRAIN_STAGES = ("memtrain-zero0", "memtrain-zero1", "memtrain-zero2", "memtrain-zero3")
DEFAULT_CONTENDERS = (*MEMTRAIN_STAGES, "lightning-fsdp2", "deepspeed-zero3")
ALL_CONTENDERS = (*DEFAULT_CONTENDERS, "memtrain-engine-zero3")
ANCHOR = "lightning-fsdp2"
MIB = 2**20
MEM_LABEL = {"cpu": "dRSS", "cuda": "dAlloc"}  # what the memory columns measure: resident set, CUDA allocated bytes


class Skipped(Exception):
    """The contender cannot run here (a missing optional package); reported as skipped, not failed."""


# ------------------------------------------------------------------------------------------------------------
# Per-rank measurement
# ------------------------------------------------------------------------------------------------------------
def _proc_status_kib(key: str) -> int | None:
    try:
        m = re.search(rf"^{key}:\s+(\d+) kB", Path("/proc/self/status").read_text(), re.M)
    except OSError:
        return None
    return int(m.group(1)) if m else None


def _current_rss_bytes() -> int:
    kib = _proc_status_kib("VmRSS")
    if kib is not None:
        return kib * 1024
    import psutil

    return int(psutil.Process().memory_info().rss)


def _reset_rss_high_water_mark() -> bool:
    """Linux: writing 5 to clear_refs resets VmHWM (and so ru_maxrss) to the current RSS."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def _involuntary_switches() -> int:
    """Times this process was descheduled against its will: a sign that something else wanted the cores."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_nivcsw


def rank_device(args: argparse.Namespace, rank: int) -> torch.device:
    """Where this rank's model, data and optimizer state live: the CPU, or cuda:rank."""
    return torch.device("cuda", rank) if args.device == "cuda" else torch.device("cpu")


class Probe:
    """Clocks the timed steps and reads this rank's memory; created right before the model is built.

    On CPU the memory figures are RSS; on CUDA they are the caching allocator's allocated bytes on this rank's GPU
    (baseline: allocated now; peaks: ``max_memory_allocated``, reset at the first timed step).
    """

    def __init__(self, warmup: int, steps: int, device: torch.device | None = None) -> None:
        from memtrain.telemetry import peak_memory_bytes

        self.device = device if device is not None else torch.device("cpu")
        self.cuda = self.device.type == "cuda"
        self._peak = lambda: peak_memory_bytes(self.device)  # ru_maxrss on CPU, max_memory_allocated on CUDA
        self.warmup, self.steps = warmup, steps
        self.baseline_rss = int(torch.cuda.memory_allocated(self.device)) if self.cuda else _current_rss_bytes()
        self.losses: list[float] = []
        self.t0 = self.t1 = None
        self.setup_peak = self.train_peak = None
        self.hwm_reset = False
        self.accounted: dict[str, int] = {}
        self.train_peak_reserved: int | None = None

    def _barrier(self) -> None:
        if self.cuda:
            # Wait for this rank's queued GPU work, then for the other ranks, then for the barrier's own kernel.
            torch.cuda.synchronize(self.device)
            dist.barrier(device_ids=[self.device.index])
            torch.cuda.synchronize(self.device)
        else:
            dist.barrier()

    def start(self) -> None:
        self._barrier()
        self.setup_peak = self._peak()
        if self.cuda:
            torch.cuda.reset_peak_memory_stats(self.device)
            self.hwm_reset = True
        else:
            self.hwm_reset = _reset_rss_high_water_mark()
        self.t0, self.c0, self.ivcsw0 = time.perf_counter(), time.process_time(), _involuntary_switches()

    def stop(self) -> None:
        self._barrier()
        self.t1, self.c1, self.ivcsw1 = time.perf_counter(), time.process_time(), _involuntary_switches()
        self.train_peak = self._peak()
        if self.cuda:
            self.train_peak_reserved = int(torch.cuda.max_memory_reserved(self.device))

    def result(self) -> dict[str, Any]:
        if self.t0 is None or self.t1 is None:
            raise RuntimeError(f"the timed window never closed ({len(self.losses)} steps ran)")
        extra = {"train_peak_reserved": self.train_peak_reserved} if self.cuda else {}
        return {
            "wall_s": self.t1 - self.t0,
            "cpu_s": self.c1 - self.c0,
            "involuntary_switches": self.ivcsw1 - self.ivcsw0,
            "baseline_rss": self.baseline_rss,
            "setup_peak": self.setup_peak,
            "train_peak": self.train_peak,
            "hwm_reset": self.hwm_reset,
            "accounted": self.accounted,
            "losses": self.losses,
            "torch_threads": torch.get_num_threads(),
            **extra,
        }


def _account_fsdp(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, int]:
    from memtrain.telemetry import account_training_state

    report = account_training_state(model, optimizer)
    return {c: report.total(c) for c in ("params", "grads", "optimizer_state")}


def _account_deepspeed(engine: Any) -> dict[str, int]:
    """What a ZeRO-3 rank holds: model-dtype parameter partitions, fp32 master partitions, grad partitions, Adam."""
    seen: set[tuple[int, int]] = set()

    def nbytes(tensors: Any) -> int:
        total = 0
        for t in tensors:
            if not isinstance(t, torch.Tensor) or t.numel() == 0 or (t.data_ptr(), t.numel()) in seen:
                continue
            seen.add((t.data_ptr(), t.numel()))
            total += t.numel() * t.element_size()
        return total

    zero = engine.optimizer
    out = {"params": nbytes(getattr(p, "ds_tensor", p.data) for p in engine.module.parameters())}
    masters = list(getattr(zero, "fp32_partitioned_groups_flat", []))
    out["master_params"] = nbytes(masters)
    grads = getattr(zero, "grad_partitions_flat_buffer", None)
    out["grads"] = nbytes([grads] if grads is not None else [m.grad for m in masters])
    inner = getattr(zero, "optimizer", zero)
    out["optimizer_state"] = nbytes(v for s in inner.state.values() for v in s.values())
    return out


# ------------------------------------------------------------------------------------------------------------
# Shared pieces: model, data, optimizer -- the same for every contender
# ------------------------------------------------------------------------------------------------------------
def build_model(args: argparse.Namespace) -> torch.nn.Module:
    from memtrain.models import GPT, GPTConfig

    torch.manual_seed(args.seed)
    return GPT(GPTConfig(vocab_size=args.vocab, seq_len=args.seq_len, n_layer=args.n_layer, n_head=args.n_head,
                         n_embd=args.n_embd, bias=True))


def build_loader(args: argparse.Namespace, rank: int, world: int) -> torch.utils.data.DataLoader:
    from torch.utils.data import DataLoader, DistributedSampler

    from memtrain.data import ByteCorpus, build_stdlib_corpus

    data = build_stdlib_corpus(args.corpus_bytes)
    if args.vocab < 256:
        data = data % args.vocab
    corpus = ByteCorpus(data, args.seq_len)
    needed = world * args.batch * (args.warmup + args.steps)
    if len(corpus) < needed:
        raise ValueError(f"--corpus-bytes {args.corpus_bytes} gives {len(corpus)} windows, {needed} are needed")
    sampler = DistributedSampler(corpus, num_replicas=world, rank=rank, shuffle=True, seed=args.seed, drop_last=True)
    return DataLoader(corpus, batch_size=args.batch, sampler=sampler, drop_last=True)


def build_optimizer(params: Any, args: argparse.Namespace) -> torch.optim.Optimizer:
    return torch.optim.AdamW(params, lr=args.lr, betas=(0.9, 0.95), weight_decay=0.1, foreach=True)


# ------------------------------------------------------------------------------------------------------------
# Contenders (each runs on every rank of its own process group)
# ------------------------------------------------------------------------------------------------------------
def _lightning_classes(args: argparse.Namespace, probe: Probe) -> tuple[Any, Any, Any]:
    import lightning.pytorch as L

    class BenchModule(L.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.model = build_model(args)

        def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
            loss = self.model.loss(*batch)
            probe.losses.append(loss.item())
            return loss

        def configure_optimizers(self) -> torch.optim.Optimizer:
            return build_optimizer(self.parameters(), args)

    class FSDP2Module(BenchModule):
        def configure_model(self) -> None:
            # The documented ModelParallelStrategy recipe. Lightning calls training_step, not forward, so the
            # root is the inner GPT, whose forward runs inside model.loss.
            from torch.distributed.fsdp import FSDPModule, fully_shard

            if isinstance(self.model, FSDPModule):
                return
            mesh = self.device_mesh["data_parallel"]
            for block in self.model.blocks:
                fully_shard(block, mesh=mesh)
            fully_shard(self.model, mesh=mesh)

    class Clock(L.Callback):
        def on_train_batch_start(self, trainer: Any, module: Any, batch: Any, batch_idx: int) -> None:
            if batch_idx == args.warmup:
                probe.start()

        def on_train_batch_end(self, trainer: Any, module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
            if batch_idx == args.warmup + args.steps - 1:
                probe.stop()
                probe.accounted = _account_fsdp(module.model, trainer.optimizers[0])

    return BenchModule, FSDP2Module, Clock


def _run_lightning(args: argparse.Namespace, rank: int, world: int, name: str) -> dict[str, Any]:
    import lightning.pytorch as L

    for logger_name in ("lightning.pytorch", "lightning.fabric", "pytorch_lightning", "lightning_fabric"):
        logging.getLogger(logger_name).setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", module="lightning")
    probe = Probe(args.warmup, args.steps, rank_device(args, rank))
    BenchModule, FSDP2Module, Clock = _lightning_classes(args, probe)
    if name == "lightning-fsdp2":
        from lightning.pytorch.strategies import ModelParallelStrategy

        module = FSDP2Module()
        strategy = ModelParallelStrategy(data_parallel_size=world, tensor_parallel_size=1)
    else:
        from memtrain.strategies import MemTrainStrategy

        module = BenchModule()
        strategy = MemTrainStrategy(zero_stage=int(name[-1]))
    loader = build_loader(args, rank, world)
    trainer = L.Trainer(
        accelerator="gpu" if args.device == "cuda" else "cpu", devices=world, num_nodes=1, strategy=strategy,
        max_steps=args.warmup + args.steps, logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, num_sanity_val_steps=0, use_distributed_sampler=False, callbacks=[Clock()],
    )
    trainer.fit(module, loader)
    return probe.result()


def _run_memtrain_engine(args: argparse.Namespace, rank: int, world: int, name: str) -> dict[str, Any]:
    from memtrain.config import MemTrainConfig
    from memtrain.engine import Engine

    device = rank_device(args, rank)
    probe = Probe(args.warmup, args.steps, device)
    engine = Engine.create(MemTrainConfig.from_dict({"sharding": {"stage": int(name[-1])}}), world, world,
                           device.type)
    model = engine.prepare_model(build_model(args).to(device))  # a no-op on CPU
    optimizer = engine.prepare_optimizer(build_optimizer(model.parameters(), args), model)
    for i, (x, y) in enumerate(build_loader(args, rank, world)):
        if i == args.warmup:
            probe.start()
        x, y = x.to(device), y.to(device)  # no-ops on CPU
        optimizer.zero_grad(set_to_none=True)  # before backward, as Lightning does: grads exist when accounted
        loss = model.loss(x, y)
        loss.backward()
        optimizer.step()
        probe.losses.append(loss.item())
        if i == args.warmup + args.steps - 1:
            probe.stop()
            probe.accounted = _account_fsdp(model, optimizer)
            break
    return probe.result()


def deepspeed_config(args: argparse.Namespace) -> dict[str, Any]:
    return {
        "train_micro_batch_size_per_gpu": args.batch,
        "gradient_accumulation_steps": 1,
        "zero_optimization": {"stage": 3},  # DeepSpeed's defaults for everything else in this section
        # DeepSpeed (0.19.8 here) clips at norm 1.0 unless told otherwise; the other contenders do not clip.
        "gradient_clipping": 0.0,
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }


def _run_deepspeed(args: argparse.Namespace, rank: int, world: int, name: str) -> dict[str, Any]:
    device = rank_device(args, rank)
    os.environ.setdefault("DS_ACCELERATOR", device.type)  # "cpu" or "cuda"
    try:
        import deepspeed
    except Exception as e:  # ImportError, or an accelerator probe that fails at import
        raise Skipped(f"import deepspeed failed: {type(e).__name__}: {e}") from e
    from deepspeed.utils import logger as ds_logger

    ds_logger.setLevel(logging.WARNING)

    class WithLoss(torch.nn.Module):  # DeepSpeed's engine calls forward; the GPT's loss is a method
        def __init__(self, gpt: torch.nn.Module) -> None:
            super().__init__()
            self.gpt = gpt

        def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
            return self.gpt.loss(x, y)

    deepspeed.init_distributed(dist_backend=backend(args))  # wraps the process group that already exists
    probe = Probe(args.warmup, args.steps, device)
    model = WithLoss(build_model(args)).to(device)  # a no-op on CPU
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=build_optimizer(model.parameters(), args),
                                           config=deepspeed_config(args))
    for i, (x, y) in enumerate(build_loader(args, rank, world)):
        if i == args.warmup:
            probe.start()
        x, y = x.to(device), y.to(device)  # no-ops on CPU
        loss = engine(x, y)
        engine.backward(loss)
        engine.step()
        probe.losses.append(loss.item())
        if i == args.warmup + args.steps - 1:
            probe.stop()
            probe.accounted = _account_deepspeed(engine)
            break
    return probe.result()


def backend(args: argparse.Namespace) -> str:
    return "nccl" if args.device == "cuda" else "gloo"


def run_contender(args: argparse.Namespace, rank: int, world: int, name: str) -> dict[str, Any]:
    if name.startswith("memtrain-zero") or name == "lightning-fsdp2":
        return _run_lightning(args, rank, world, name)
    if name == "memtrain-engine-zero3":
        return _run_memtrain_engine(args, rank, world, name)
    if name == "deepspeed-zero3":
        return _run_deepspeed(args, rank, world, name)
    raise ValueError(f"unknown contender {name!r}")


def _worker(rank: int, world: int, name: str, args: argparse.Namespace, init_file: str, port: int, log_path: str,
            results: Any) -> None:
    log = open(log_path, "w", buffering=1)
    os.dup2(log.fileno(), 1)
    os.dup2(log.fileno(), 2)
    sys.stdout = sys.stderr = log
    # What torch's launchers export: Lightning then treats the processes as created externally.
    os.environ.update({"LOCAL_RANK": str(rank), "RANK": str(rank), "WORLD_SIZE": str(world),
                       "LOCAL_WORLD_SIZE": str(world), "NODE_RANK": "0", "MASTER_ADDR": "127.0.0.1",
                       "MASTER_PORT": str(port), "OMP_NUM_THREADS": "1"})
    torch.set_num_threads(1)
    torch.set_num_interop_threads(1)
    try:
        if args.device == "cuda":
            torch.cuda.set_device(rank)  # before the process group: nccl binds each rank to the current device
        dist.init_process_group(backend(args), init_method=f"file://{init_file}", rank=rank, world_size=world)
        out = run_contender(args, rank, world, name)
        results.put((rank, "ok", out))
    except Skipped as e:
        results.put((rank, "skipped", str(e)))
    except BaseException:
        traceback.print_exc()
        results.put((rank, "failed", traceback.format_exc()))
    finally:
        try:
            if dist.is_initialized():
                dist.destroy_process_group()
        finally:
            log.flush()


# ------------------------------------------------------------------------------------------------------------
# Parent: run the contenders one after another, aggregate, report
# ------------------------------------------------------------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(args: argparse.Namespace, name: str, log_dir: Path, round_: int = 0) -> dict[str, Any]:
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    started = time.perf_counter()
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="memtrain_bench_") as tmp:
        init_file = os.path.join(tmp, "pg_init")
        port = _free_port()
        suffix = f".round{round_ + 1}" if args.repeats > 1 else ""
        logs = [str(log_dir / f"{name}{suffix}.rank{r}.log") for r in range(args.nproc)]
        procs = [ctx.Process(target=_worker, args=(r, args.nproc, name, args, init_file, port, logs[r], results))
                 for r in range(args.nproc)]
        for p in procs:
            p.start()
        per_rank: dict[int, Any] = {}
        outcome: tuple[str, str] | None = None
        deadline = started + args.timeout
        try:
            while len(per_rank) < args.nproc:
                try:
                    rank, status, payload = results.get(timeout=2.0)
                except queue_mod.Empty:
                    # A rank killed outright (segfault, out of memory) posts nothing: fail fast, not at the deadline.
                    dead = [f"rank {r} exit code {p.exitcode}" for r, p in enumerate(procs)
                            if r not in per_rank and p.exitcode not in (None, 0)]
                    if dead:
                        outcome = ("failed", f"died without a result: {', '.join(dead)} (see its log)")
                    elif time.perf_counter() > deadline:
                        outcome = ("failed", f"timed out after {args.timeout:.0f} s (see the logs)")
                    if outcome is not None:
                        break
                    continue
                if status != "ok":
                    outcome = (status, f"rank {rank}: {payload}")
                    break
                per_rank[rank] = payload
        finally:
            for p in procs:
                p.join(timeout=30 if outcome is None else 2)
            for p in procs:
                if p.is_alive():
                    p.kill()
                    p.join()
    entry: dict[str, Any] = {"contender": name, "elapsed_s": round(time.perf_counter() - started, 1),
                             "loadavg_before": load_before, "loadavg_after": os.getloadavg(), "logs": logs}
    if outcome is not None:
        entry.update(status=outcome[0], error=outcome[1])
        return entry
    return {**entry, "status": "ok", **aggregate(args, [per_rank[r] for r in range(args.nproc)])}


def aggregate(args: argparse.Namespace, ranks: list[dict[str, Any]]) -> dict[str, Any]:
    world = len(ranks)
    wall = max(r["wall_s"] for r in ranks)
    tokens = world * args.steps * args.batch * args.seq_len
    categories = sorted({c for r in ranks for c in r["accounted"]})
    steps = len(ranks[0]["losses"])
    losses = [sum(r["losses"][i] for r in ranks) / world for i in range(steps)]
    return {
        "tokens_timed": tokens,
        "wall_s": wall,
        "tokens_per_s": tokens / wall,
        "s_per_step": wall / args.steps,
        # Load-robust secondary figures: CPU seconds of the busiest rank (compute plus the CPU side of
        # communication, without time spent waiting or descheduled), and how often the ranks were descheduled.
        "cpu_s_per_step": max(r["cpu_s"] for r in ranks) / args.steps,
        "involuntary_switches": sum(r["involuntary_switches"] for r in ranks),
        "peak_train_delta_bytes": max(r["train_peak"] - r["baseline_rss"] for r in ranks),
        "peak_train_rss_bytes": max(r["train_peak"] for r in ranks),
        "peak_setup_delta_bytes": max(r["setup_peak"] - r["baseline_rss"] for r in ranks),
        "baseline_rss_bytes": max(r["baseline_rss"] for r in ranks),
        **({"peak_train_reserved_bytes": max(r["train_peak_reserved"] for r in ranks)}
           if all(r.get("train_peak_reserved") is not None for r in ranks) else {}),
        "hwm_reset": all(r["hwm_reset"] for r in ranks),
        "accounted_bytes_per_rank_max": {c: max(r["accounted"].get(c, 0) for r in ranks) for c in categories},
        "torch_threads": sorted({r["torch_threads"] for r in ranks}),
        "loss_first": losses[0] if losses else None,
        "loss_last": losses[-1] if losses else None,
        "losses_mean_over_ranks": losses,
        "per_rank": [{k: v for k, v in r.items() if k != "losses"} for r in ranks],
    }


def combine(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """One entry per contender over its rounds: median throughput, the highest memory, every round listed."""
    bad = [r for r in runs if r["status"] != "ok"]
    if bad:
        return {**bad[0], "rounds_ok": len(runs) - len(bad)}
    by_speed = sorted(runs, key=lambda r: r["tokens_per_s"])
    entry = dict(by_speed[(len(by_speed) - 1) // 2])  # the (lower) median round carries the per-rank detail
    entry["tokens_per_s"] = statistics.median(r["tokens_per_s"] for r in runs)
    entry["s_per_step"] = statistics.median(r["s_per_step"] for r in runs)
    entry["wall_s"] = statistics.median(r["wall_s"] for r in runs)
    entry["cpu_s_per_step"] = statistics.median(r["cpu_s_per_step"] for r in runs)
    for key in ("peak_train_delta_bytes", "peak_train_rss_bytes", "peak_setup_delta_bytes",
                "peak_train_reserved_bytes"):
        if all(key in r for r in runs):  # peak_train_reserved_bytes: --device cuda only
            entry[key] = max(r[key] for r in runs)
    entry["rounds"] = [{k: r[k] for k in ("tokens_per_s", "wall_s", "cpu_s_per_step", "involuntary_switches",
                                          "peak_train_delta_bytes", "elapsed_s",
                                          "loadavg_before", "loadavg_after", "logs")} for r in runs]
    return entry


def ratios(entries: dict[str, dict[str, Any]]) -> dict[str, Any]:
    def ok(name: str) -> dict[str, Any] | None:
        e = entries.get(name)
        return e if e is not None and e.get("status") == "ok" else None

    def ratio(e: dict[str, Any], anchor: dict[str, Any]) -> dict[str, float]:
        return {
            "tokens_per_s": e["tokens_per_s"] / anchor["tokens_per_s"],
            "cpu_s_per_step": e["cpu_s_per_step"] / anchor["cpu_s_per_step"],
            "peak_train_delta": e["peak_train_delta_bytes"] / anchor["peak_train_delta_bytes"],
        }

    out: dict[str, Any] = {}
    pairs = [(name, ANCHOR) for name in (*MEMTRAIN_STAGES, "memtrain-engine-zero3")]
    pairs += [(name, "deepspeed-zero3") for name in ("memtrain-zero3", "memtrain-engine-zero3")]
    for name, anchor_name in pairs:
        e, anchor = ok(name), ok(anchor_name)
        if e is not None and anchor is not None:
            out[f"{name} / {anchor_name}"] = ratio(e, anchor)
    return out


def gpu_info(args: argparse.Namespace) -> dict[str, Any]:
    """The GPUs the ranks used (cuda:0 .. cuda:nproc-1); empty on CPU. Called after the runs (it starts CUDA here)."""
    if args.device != "cuda":
        return {}
    try:
        props = [torch.cuda.get_device_properties(i) for i in range(args.nproc)]
        nccl = torch.cuda.nccl.version() if dist.is_nccl_available() else None
        return {
            "gpu_name": torch.cuda.get_device_name(0),
            "gpu_names": [torch.cuda.get_device_name(i) for i in range(args.nproc)],
            "gpu_memory_total_bytes": [int(p.total_memory) for p in props],
            "gpu_capability": [f"{p.major}.{p.minor}" for p in props],
            "gpu_count": torch.cuda.device_count(),
            "cuda": torch.version.cuda,
            "nccl": ".".join(map(str, nccl)) if isinstance(nccl, tuple) else nccl,
        }
    except Exception as e:  # metadata only: never lose the results over it
        return {"gpu_name": None, "gpu_info_error": f"{type(e).__name__}: {e}"}


def machine_info(args: argparse.Namespace) -> dict[str, Any]:
    def version(pkg: str) -> str | None:
        try:
            return importlib.metadata.version(pkg)
        except importlib.metadata.PackageNotFoundError:
            return None

    cpu_model = None
    try:
        m = re.search(r"^model name\s*:\s*(.+)$", Path("/proc/cpuinfo").read_text(), re.M)
        cpu_model = m.group(1).strip() if m else None
    except OSError:
        pass
    try:
        m = re.search(r"^MemTotal:\s+(\d+) kB", Path("/proc/meminfo").read_text(), re.M)
        mem_total = int(m.group(1)) * 1024 if m else None
    except OSError:
        mem_total = None
    return {
        "date_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device": args.device,
        **gpu_info(args),
        "cpu_count": os.cpu_count(),
        "cpu_affinity": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "cpu_model": cpu_model,
        "mem_total_bytes": mem_total,
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "lightning": version("lightning"),
        "deepspeed": version("deepspeed"),
        "git_commit": _git_commit(),
    }


def _git_commit() -> str | None:
    head = REPO / ".git" / "HEAD"
    try:
        ref = head.read_text().strip()
        if ref.startswith("ref: "):
            return (REPO / ".git" / ref[5:]).read_text().strip()
        return ref
    except OSError:
        return None


def print_table(entries: dict[str, dict[str, Any]], rat: dict[str, Any], device: str = "cpu") -> None:
    mem = MEM_LABEL[device]
    w = max(10, len("setup " + mem))  # 10 on CPU
    head = (f"{'contender':<22} {'status':<8} {'tokens/s':>9} {'s/step':>7} {'cpu s':>6} {'peak ' + mem:>{w}} "
            f"{'setup ' + mem:>{w}} "
            f"{'params':>7} {'grads':>7} {'optim':>7} {'master':>7} {'loss last':>9}")
    print(head)
    print("-" * len(head))
    for name, e in entries.items():
        if e["status"] != "ok":
            first = e["error"].strip().splitlines()
            print(f"{name:<22} {e['status']:<8} {(first[-1] if first else '')[:90]}")
            continue
        acc = e["accounted_bytes_per_rank_max"]

        def mib(key: str) -> str:
            return f"{acc[key] / MIB:7.2f}" if key in acc else f"{'-':>7}"

        print(f"{name:<22} {'ok':<8} {e['tokens_per_s']:9.0f} {e['s_per_step']:7.3f} {e['cpu_s_per_step']:6.3f} "
              f"{e['peak_train_delta_bytes'] / MIB:{w}.1f} {e['peak_setup_delta_bytes'] / MIB:{w}.1f} "
              f"{mib('params')} {mib('grads')} {mib('optimizer_state')} {mib('master_params')} {e['loss_last']:9.4f}")
    peak = ("peak dRSS = peak RSS during the timed steps minus RSS before the model was built" if device == "cpu" else
            "peak dAlloc = peak CUDA allocated bytes during the timed steps minus those allocated before the model "
            "was built")
    print("(s/step: wall seconds per step; cpu s: CPU seconds per step of the busiest rank; memory in MiB per rank, "
          f"max over ranks; {peak}; "
          "params/grads/optim/master = accounted bytes held by one rank)")
    if rat:
        print()
        for key, r in rat.items():
            print(f"{key:<45} tokens/s x{r['tokens_per_s']:.3f}   cpu s/step x{r['cpu_s_per_step']:.3f}   "
                  f"peak {mem} x{r['peak_train_delta']:.3f}")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                   help="cpu: gloo ranks, one torch thread each; cuda: nccl ranks, rank r on cuda:r")
    p.add_argument("--nproc", type=int, default=2, help="ranks (processes) per contender (on cuda: at most the GPUs)")
    p.add_argument("--steps", type=int, default=30, help="timed optimizer steps")
    p.add_argument("--warmup", type=int, default=5, help="untimed steps before the timed ones")
    p.add_argument("--batch", type=int, default=4, help="sequences per rank per step")
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--n-layer", type=int, default=4)
    p.add_argument("--n-embd", type=int, default=256)
    p.add_argument("--n-head", type=int, default=4)
    p.add_argument("--vocab", type=int, default=256, help="byte-level: at most 256 (bytes are taken modulo it)")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--corpus-bytes", type=int, default=4 * MIB, help="bytes of stdlib source in the corpus")
    p.add_argument("--contenders", default=",".join(DEFAULT_CONTENDERS),
                   help=f"comma-separated, run in this order; known: {', '.join(ALL_CONTENDERS)}")
    p.add_argument("--repeats", type=int, default=1,
                   help="rounds over all contenders (round-robin); tokens/s is the median over rounds, memory the max")
    p.add_argument("--timeout", type=float, default=300.0, help="seconds before a contender counts as hung")
    p.add_argument("--out", default="bench_results/sharding.json")
    args = p.parse_args(argv)
    args.contenders = [c.strip() for c in args.contenders.split(",") if c.strip()]
    unknown = [c for c in args.contenders if c not in ALL_CONTENDERS]
    if unknown:
        p.error(f"unknown contender(s) {unknown}; known: {list(ALL_CONTENDERS)}")
    if args.n_embd % args.n_head:
        p.error(f"--n-embd {args.n_embd} must be divisible by --n-head {args.n_head}")
    if not 1 <= args.vocab <= 256:
        p.error("--vocab must be in 1..256 (the corpus is bytes)")
    if args.steps < 1 or args.warmup < 0 or args.nproc < 1 or args.repeats < 1:
        p.error("--steps >= 1, --warmup >= 0, --nproc >= 1, --repeats >= 1")
    if args.device == "cuda":
        # No CUDA context is made in this parent here; the ranks are spawned and each sets up its own GPU.
        n_gpu = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if n_gpu == 0:
            p.error(f"--device cuda: no CUDA GPU is visible (torch {torch.__version__}, built with CUDA "
                    f"{torch.version.cuda}; CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES')!r})")
        if args.nproc > n_gpu:
            p.error(f"--device cuda --nproc {args.nproc}: only {n_gpu} CUDA GPU(s) visible; each rank needs its own "
                    f"GPU (rank r uses cuda:r), so use --nproc {n_gpu} or fewer")
    return args


ACCOUNTED_METHOD = (
    "accounted_bytes_per_rank_max: bytes of params / grads / optimizer state held by a rank after the last step "
    "(memtrain.telemetry.account_training_state; for DeepSpeed ZeRO-3 its parameter partitions, fp32 master "
    "partitions, gradient partition buffer and inner optimizer state)."
)


def memory_method(device: str) -> str:
    if device == "cuda":
        return (
            "CUDA caching-allocator memory per rank (each rank on its own GPU, cuda:rank), max over ranks; the "
            "*_rss_* keys hold these allocator bytes, not host RSS. peak_train_delta_bytes: peak allocated bytes "
            "during the timed steps (torch.cuda.reset_peak_memory_stats() at the first timed step, "
            "torch.cuda.max_memory_allocated() after the last timed step; peak_train_rss_bytes) minus "
            "torch.cuda.memory_allocated() right before the model was built (after imports and process-group "
            "init; baseline_rss_bytes). peak_setup_delta_bytes: torch.cuda.max_memory_allocated() from process "
            "start to the first timed step (read before the reset) minus that baseline. "
            "peak_train_reserved_bytes: torch.cuda.max_memory_reserved() after the last timed step (allocator "
            "reserve incl. cache, also reset at the first timed step). Excludes the CUDA context and NCCL buffers, "
            "which the caching allocator does not see. " + ACCOUNTED_METHOD
        )
    return (
        "CPU resident memory per rank, max over ranks. peak_train_delta_bytes: peak RSS during the timed steps "
        "(kernel RSS high-water mark reset via /proc/self/clear_refs at the first timed step, read with "
        "memtrain.telemetry.peak_memory_bytes = ru_maxrss) minus the RSS right before the model was built "
        "(after imports and process-group init). peak_setup_delta_bytes: the high-water mark from process "
        "start to the first timed step minus that baseline. " + ACCOUNTED_METHOD
    )


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    log_dir = out.with_name(out.stem + "_logs")
    log_dir.mkdir(parents=True, exist_ok=True)
    command = "python " + " ".join([os.path.relpath(sys.argv[0], os.getcwd()) if sys.argv[0] else "sharding.py",
                                    *(argv if argv is not None else sys.argv[1:])])
    print(f"$ {command}")
    print(f"GPT n_layer={args.n_layer} n_embd={args.n_embd} n_head={args.n_head} seq_len={args.seq_len} "
          f"vocab={args.vocab}; {args.nproc} ranks x {args.batch} sequences; {args.warmup} warmup + {args.steps} "
          f"timed steps; device {args.device} ({backend(args)}); logs in {log_dir}")
    runs: dict[str, list[dict[str, Any]]] = {name: [] for name in args.contenders}
    for round_ in range(args.repeats):
        for name in args.contenders:
            if runs[name] and runs[name][-1]["status"] != "ok":
                continue  # failed or skipped once: not retried
            tag = f"[{name}]" + (f" round {round_ + 1}/{args.repeats}" if args.repeats > 1 else "")
            print(f"{tag} running ...", flush=True)
            e = launch(args, name, log_dir, round_)
            runs[name].append(e)
            if e["status"] == "ok":
                print(f"{tag} {e['tokens_per_s']:.0f} tokens/s, peak {MEM_LABEL[args.device]} "
                      f"{e['peak_train_delta_bytes'] / MIB:.1f} MiB "
                      f"({e['elapsed_s']} s, load {e['loadavg_before'][0]:.2f})", flush=True)
            else:
                lines = e["error"].strip().splitlines()
                print(f"{tag} {e['status']}: {lines[-1] if lines else ''}", flush=True)
    entries = {name: combine(r) for name, r in runs.items()}
    rat = ratios(entries)
    print()
    print_table(entries, rat, args.device)
    try:
        n_params: int | str = sum(p.numel() for p in build_model(args).parameters())
    except Exception as e:  # the contenders already reported the same error
        n_params = f"{type(e).__name__}: {e}"
    report = {
        "benchmark": "sharding",
        "command": command,
        "machine": machine_info(args),
        "settings": {**{k: v for k, v in vars(args).items() if k != "contenders"}, "contenders": args.contenders,
                     "model_params": n_params, "optimizer": "torch.optim.AdamW(betas=(0.9, 0.95), weight_decay=0.1, "
                     "foreach=True)", "dtype": "float32", "backend": backend(args), "torch_threads_per_rank": 1,
                     "deepspeed_config": deepspeed_config(args)},
        "memory_method": memory_method(args.device),
        "throughput_method": "tokens of all ranks in the timed steps / wall seconds of the slowest rank, timed "
                             "between barriers after the warmup steps; with --repeats, the median over rounds "
                             "(contenders run round-robin, each round in fresh processes). cpu_s_per_step: CPU "
                             "seconds (time.process_time) of the busiest rank per timed step, a secondary figure that "
                             "background load disturbs less; involuntary_switches: how often ranks were descheduled "
                             "in the timed steps (high = the machine was shared)",
        "results": entries,
        "ratios": rat,
    }
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"\nwrote {out}")
    return 0 if all(e["status"] in ("ok", "skipped") for e in entries.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
