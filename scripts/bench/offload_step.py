"""Benchmark: step time and peak RSS of one GPT with parameters + optimizer state on NVMe, memtrain vs DeepSpeed
ZeRO-Infinity, plus both without offload, in one run (CPU, gloo, one rank).

    python scripts/bench/offload_step.py --nvme-path /local_nvme/bench --layers 16 --embd 1024 --heads 16 \\
        --warmup 1 --steps 2 --host-budget 2.5GiB --out bench_results/offload_step.json

Contenders (each in its own fresh process, world size 1 over gloo, same model, same init, same batches):

    memtrain-nvme        Engine at ZeRO-3, offload.params='nvme', offload.optimizer='nvme' (overlap_backward on,
                         the default), offload.host_memory_budget=--host-budget; torch AdamW(fused=True). The
                         model is built on the meta device and materialized after sharding (prepare_model's
                         ``materialize``), so the whole fp32 model is never allocated at once.
    deepspeed-nvme       deepspeed.initialize, ZeRO stage 3 with offload_param / offload_optimizer device 'nvme'
                         (DeepSpeed's default buffer sizes, as in the issue's figures) and an ``aio`` section;
                         the config's AdamW (DeepSpeed builds its CPU Adam for offload). Model built on CPU.
    memtrain-none        Engine at ZeRO-3, no offload; torch AdamW(fused=True).
    deepspeed-none       deepspeed.initialize, ZeRO stage 3, no offload; the same torch AdamW(fused=True).

Every contender does ``--warmup`` steps and then ``--steps`` timed steps (forward + backward + optimizer step +
zero_grad, wall clock); the median is reported. Peak RSS: the child's VmHWM (whole process lifetime, read from
/proc/self/status at exit, cross-checked with ``os.wait4``'s ru_maxrss), and the peak during the training
steps alone (VmHWM reset through /proc/self/clear_refs after setup). No gradient clipping anywhere.

memtrain's host budget: memtrain charges its own host buffers against ``offload.host_memory_budget`` (printed).
The check here is: peak RSS <= budget + fixed overhead, where the fixed overhead is stated and measured in the
same process: the runtime (RSS after imports and process-group init, before the model exists) + what autograd
holds for backward in one step (activations and gathered weights, counted by a saved_tensors_hooks pass over the
warm-up step's forward; unique storages) + fp32 gradients of the two largest FSDP units (one being reduced, one
being updated).
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import shutil
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

from memtrain.config import parse_bytes  # after the path is set

CONTENDERS = ("memtrain-nvme", "deepspeed-nvme", "memtrain-none", "deepspeed-none")
GIB = 2**30


# ------------------------------------------------------------------------------------------------------------
# Child side: one contender in this process
# ------------------------------------------------------------------------------------------------------------
def _status_kib(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    raise KeyError(key)


def rss() -> int:
    return _status_kib("VmRSS") * 1024


def hwm() -> int:
    return _status_kib("VmHWM") * 1024


def reset_hwm() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")  # "5": reset the peak RSS (VmHWM) to the current RSS
        return True
    except OSError:
        return False


def gpt_config(args: argparse.Namespace) -> Any:
    from memtrain.models import GPTConfig

    return GPTConfig(vocab_size=args.vocab, seq_len=args.seq, n_layer=args.layers, n_head=args.heads,
                     n_embd=args.embd, dropout=0.0, bias=True)


def init_weights(model: Any) -> None:
    """GPT's own init (memtrain/models/gpt.py), from a fixed seed, so that a model materialized from meta is
    initialized like one built on CPU (same values where the random streams agree)."""
    import math

    import torch

    from memtrain.models import GPT

    torch.manual_seed(0)
    for module in model.modules():  # LayerNorm: ones / zeros (its constructor's init; _init_weights skips it)
        if isinstance(module, torch.nn.LayerNorm):
            module.reset_parameters()
    model.apply(GPT._init_weights)
    for name, p in model.named_parameters():
        if name.endswith("proj.weight"):
            torch.nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * model.config.n_layer))


def batch(args: argparse.Namespace, step: int) -> tuple[Any, Any]:
    import torch

    gen = torch.Generator().manual_seed(1000 + (0 if args.same_batch else step))
    tokens = torch.randint(0, args.vocab, (args.batch, args.seq + 1), generator=gen)
    return tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous()


class SavedBytes:
    """Bytes autograd saves for backward during one forward (unique storages): activations + gathered weights."""

    def __init__(self) -> None:
        self.storages: dict[int, int] = {}

    def pack(self, t: Any) -> Any:
        try:
            s = t.untyped_storage()
            self.storages[s.data_ptr()] = max(self.storages.get(s.data_ptr(), 0), s.nbytes())
        except Exception:  # noqa: BLE001, S110 - e.g. tensor subclasses without a plain storage: not counted
            pass
        return t

    @staticmethod
    def unpack(t: Any) -> Any:
        return t

    @property
    def total(self) -> int:
        return sum(self.storages.values())


def train(args: argparse.Namespace, step_fn: Any, out: dict[str, Any], count_saved: bool = False) -> None:
    import torch

    times, losses = [], []
    out["rss_before_steps"] = rss()
    out["hwm_reset"] = reset_hwm()
    saved = SavedBytes()
    for i in range(args.warmup + args.steps):
        x, y = batch(args, i)
        start = time.perf_counter()
        if count_saved and i == 0:
            with torch.autograd.graph.saved_tensors_hooks(saved.pack, saved.unpack):
                loss = step_fn(x, y)
        else:
            loss = step_fn(x, y)
        elapsed = time.perf_counter() - start
        losses.append(loss)
        if i >= args.warmup:
            times.append(elapsed)
        print(f"[{args.child}] step {i} loss {loss:.6f} {elapsed:.2f}s rss {rss() / GIB:.2f} GiB", flush=True)
    out.update(step_s=times, losses=losses, median_step_s=statistics.median(times),
               peak_rss_steps=hwm(), saved_for_backward_bytes=saved.total if count_saved else None)


def du(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) if path.exists() else 0


def _fraction(value: str) -> float | str:
    return value if value == "auto" else float(value)


def run_memtrain(args: argparse.Namespace, out: dict[str, Any], offload: bool, folder: Path) -> None:
    import torch

    from memtrain import Engine, MemTrainConfig
    from memtrain.models import GPT

    cfg: dict[str, Any] = {"sharding": {"stage": 3}}
    if offload:
        cfg["offload"] = {"optimizer": "nvme", "params": "nvme", "nvme_path": str(folder),
                          "host_memory_budget": args.host_budget, "prefetch_blocks": args.prefetch_blocks,
                          "optimizer_cpu_fraction": _fraction(args.optimizer_cpu_fraction)}
    config = MemTrainConfig.from_dict(cfg)
    out["memtrain_config"] = cfg
    engine = Engine.create(config, 1, 1, "cpu")
    with torch.device("meta"):
        model = GPT(gpt_config(args))
    out["params"] = sum(p.numel() for p in model.parameters())

    def materialize(m: torch.nn.Module) -> None:
        m.to_empty(device="cpu")
        init_weights(m)

    model = engine.prepare_model(model, materialize=materialize)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.95), weight_decay=0.1, fused=True)
    engine.prepare_optimizer(opt, model)
    out["rss_after_setup"] = rss()
    if offload:
        out["memtrain_host_bytes"] = dict(engine.offload.host_bytes)
        out["memtrain_host_bytes_total"] = sum(engine.offload.host_bytes.values())
        out["host_budget_bytes"] = config.offload.host_memory_budget
        from memtrain.offload.apply import fsdp_groups

        units = sorted((sum(p._sharded_param_data.nbytes for p in g.fsdp_params) for _, g in fsdp_groups(model)),
                       reverse=True)
        out["two_largest_units_bytes"] = sum(units[:2])

    def step(x: torch.Tensor, y: torch.Tensor) -> float:
        loss = model.loss(x, y)
        loss.backward()
        opt.step()
        opt.zero_grad()
        return loss.item()

    try:
        train(args, step, out, count_saved=offload)
        out["swap_bytes_on_disk"] = du(folder)
    finally:
        engine.offload.close()
    out["swap_bytes_after_close"] = du(folder)


def deepspeed_config(args: argparse.Namespace, offload: bool, folder: Path) -> dict[str, Any]:
    zero: dict[str, Any] = {"stage": 3}
    config: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": args.batch,
        "gradient_accumulation_steps": 1,
        "gradient_clipping": 0.0,  # DeepSpeed would clip at 1.0 otherwise; memtrain does not clip here
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
        "zero_optimization": zero,
    }
    if offload:
        zero["offload_param"] = {"device": "nvme", "nvme_path": str(folder), "pin_memory": False}
        zero["offload_optimizer"] = {"device": "nvme", "nvme_path": str(folder), "pin_memory": False}
        config["aio"] = {"block_size": 1048576, "queue_depth": 8, "intra_op_parallelism": 1,
                         "single_submit": False, "overlap_events": True}
        config["optimizer"] = {"type": "AdamW", "params": {"lr": args.lr, "betas": [0.9, 0.95], "eps": 1e-8,
                                                           "weight_decay": 0.1}}
    else:
        config["zero_allow_untested_optimizer"] = True
    return config


def run_deepspeed(args: argparse.Namespace, out: dict[str, Any], offload: bool, folder: Path) -> None:
    import deepspeed
    import torch
    from deepspeed.utils import logger as ds_logger

    from memtrain.models import GPT

    ds_logger.setLevel(logging.WARNING)

    class WithLoss(torch.nn.Module):  # DeepSpeed's engine calls forward; the GPT's loss is a method
        def __init__(self, gpt: torch.nn.Module) -> None:
            super().__init__()
            self.gpt = gpt

        def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
            return self.gpt.loss(x, y)

    deepspeed.init_distributed("gloo")  # wraps the process group that already exists
    gpt = GPT(gpt_config(args))
    init_weights(gpt)
    out["params"] = sum(p.numel() for p in gpt.parameters())
    model = WithLoss(gpt)
    config = deepspeed_config(args, offload, folder)
    out["deepspeed_config"] = config
    optimizer = None if offload else torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.95),
                                                       weight_decay=0.1, fused=True)
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=config)
    del gpt, model
    out["rss_after_setup"] = rss()
    out["optimizer_class"] = type(engine.optimizer.optimizer if hasattr(engine.optimizer, "optimizer")
                                  else engine.optimizer).__name__

    def step(x: torch.Tensor, y: torch.Tensor) -> float:
        loss = engine(x, y)
        engine.backward(loss)
        engine.step()
        return loss.item()

    train(args, step, out)
    out["swap_bytes_on_disk"] = du(folder)


def child(args: argparse.Namespace) -> int:
    import torch
    import torch.distributed as dist

    out: dict[str, Any] = {"contender": args.child, "status": "failed"}
    folder = Path(args.nvme_path) / args.child
    try:
        torch.set_num_threads(args.threads)
        dist.init_process_group("gloo", rank=0, world_size=1)
        out["rss_runtime"] = rss()  # imports + process group, before any model exists
        offload = args.child.endswith("-nvme")
        if offload:
            folder.mkdir(parents=True, exist_ok=True)
        (run_memtrain if args.child.startswith("memtrain") else run_deepspeed)(args, out, offload, folder)
        out["status"] = "ok"
    except BaseException as err:  # noqa: BLE001 - reported to the parent, printed there
        out["error"] = f"{type(err).__name__}: {err}"
        out["traceback"] = traceback.format_exc()
        print(out["traceback"], file=sys.stderr, flush=True)
    finally:
        out["peak_rss"] = hwm()
        Path(args.result).write_text(json.dumps(out))
        shutil.rmtree(folder, ignore_errors=True)
    os._exit(0 if out["status"] == "ok" else 1)  # skip interpreter teardown (DeepSpeed's aio threads)


# ------------------------------------------------------------------------------------------------------------
# Parent side
# ------------------------------------------------------------------------------------------------------------
CGROUP_ROOT = Path("/sys/fs/cgroup/memory")


def memory_cgroup(name: str, limit: int | None) -> Path | None:
    """A cgroup (v1) that caps the contender's memory (RSS + page cache, reclaimed first) at ``limit``."""
    if limit is None:
        return None
    group = CGROUP_ROOT / f"memtrain_bench_{name}_{os.getpid()}"
    group.mkdir()
    (group / "memory.limit_in_bytes").write_text(str(limit))
    return group


def run_child(args: argparse.Namespace, name: str, argv: list[str], port: int) -> dict[str, Any]:
    result = Path(tempfile.mkstemp(prefix=f"offload_step_{name}_", suffix=".json")[1])
    env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "RANK": "0", "LOCAL_RANK": "0",
           "WORLD_SIZE": "1", "LOCAL_WORLD_SIZE": "1", "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": str(args.threads),
           "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    log = Path(args.out).with_suffix("").as_posix() + f"_logs/{name}.log"
    Path(log).parent.mkdir(parents=True, exist_ok=True)
    print(f"--- {name} (log: {log})", flush=True)
    start = time.perf_counter()
    with open(log, "w") as logf:
        group = memory_cgroup(name, args.memory_limit)
        # The child joins the cgroup before it starts (preexec), so everything it allocates is capped.
        join = (lambda: (group / "cgroup.procs").write_text(str(os.getpid()))) if group else None
        proc = subprocess.Popen([sys.executable, os.path.abspath(__file__), *argv, "--child", name,
                                 "--result", str(result)], env=env, stdout=logf, stderr=subprocess.STDOUT,
                                preexec_fn=join)
        deadline = start + args.timeout
        ru = None
        while True:
            pid, status, ru = os.wait4(proc.pid, os.WNOHANG)
            if pid:
                break
            if time.perf_counter() > deadline:
                proc.kill()
                _, status, ru = os.wait4(proc.pid, 0)
                break
            time.sleep(0.5)
    wall = time.perf_counter() - start
    try:
        out = json.loads(result.read_text() or "{}")
    except json.JSONDecodeError:
        out = {}
    if group is not None:
        out["cgroup_limit"] = args.memory_limit
        out["cgroup_max_usage"] = int((group / "memory.max_usage_in_bytes").read_text())
        out["cgroup_limit_hits"] = int((group / "memory.failcnt").read_text())
        oom = (group / "memory.oom_control").read_text()
        out["cgroup_oom_kills"] = int(oom.split("oom_kill ")[1].split()[0]) if "oom_kill " in oom else None
        group.rmdir()
        if out["cgroup_oom_kills"]:
            out["status"], out["error"] = "oom", f"killed by the kernel at the {fmt_gib(args.memory_limit)} GiB memory limit"
    result.unlink(missing_ok=True)
    out.setdefault("contender", name)
    out.setdefault("status", "failed")
    if wall > args.timeout:
        out["status"], out["error"] = "timeout", f"killed after {args.timeout:.0f} s (--timeout)"
    elif "error" not in out and out["status"] != "ok":
        out["error"] = f"child exited with status {status} without a result; see {log}"
    out["process_wall_s"] = wall
    out["ru_maxrss"] = ru.ru_maxrss * 1024 if ru is not None else None  # KiB on Linux
    out["log"] = log
    for line in Path(log).read_text().splitlines():
        if "] step " in line:
            print("   ", line)
    if out["status"] != "ok":
        print(f"    {name}: {out['status'].upper()}: {out.get('error')}")
        if out.get("traceback"):
            print("    " + out["traceback"].replace("\n", "\n    "))
    return out


def fmt_gib(n: Any) -> str:
    return "-" if n is None else f"{n / GIB:.2f}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--nvme-path", required=True, help="a folder on the local disk (not tmpfs)")
    parser.add_argument("--layers", type=int, default=16)
    parser.add_argument("--embd", type=int, default=1024)
    parser.add_argument("--heads", type=int, default=16)
    parser.add_argument("--vocab", type=int, default=50304)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--host-budget", default="2.5GiB", help="memtrain's offload.host_memory_budget")
    parser.add_argument("--prefetch-blocks", type=int, default=1, help="memtrain's offload.prefetch_blocks")
    parser.add_argument("--optimizer-cpu-fraction", default="0",
                        help="memtrain's offload.optimizer_cpu_fraction: a number in [0, 1] or 'auto' (what the "
                             "host budget leaves after the swap buffers)")
    parser.add_argument("--contenders", nargs="+", default=list(CONTENDERS), choices=CONTENDERS)
    parser.add_argument("--timeout", type=float, default=420, help="seconds per contender process")
    parser.add_argument("--out", default="bench_results/offload_step.json")
    parser.add_argument("--memory-limit", type=lambda v: parse_bytes("--memory-limit", v), default=None,
                        help="cap each contender's memory with a cgroup (v1; root), e.g. 16GiB: the same host "
                             "memory for every contender (a contender killed at the cap is reported as oom)")
    parser.add_argument("--same-batch", action="store_true",
                        help="every step trains on the same batch (the loss must fall: a quick check that a large "
                             "model really learns)")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--result", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        return child(args)

    raw = sys.argv[1:] if argv is None else argv
    Path(args.nvme_path).mkdir(parents=True, exist_ok=True)
    results = {}
    for i, name in enumerate(args.contenders):
        results[name] = run_child(args, name, raw, 29500 + os.getpid() % 1000 + i)

    print(f"\nGPT {args.layers}L x {args.embd}, vocab {args.vocab}, batch {args.batch}x{args.seq}, 1 rank (gloo, "
          f"{args.threads} threads); {args.warmup} warm-up + {args.steps} timed steps, median. Shared 2-core machine: "
          "noisy.")
    print(f"{'contender':<16} | {'status':<7} | {'params':>7} | {'step s (median)':>15} | {'steps s':<18} | "
          f"{'peak RSS GiB':>12} | {'in steps':>8} | {'runtime':>7} | losses")
    for name, r in results.items():
        steps = ", ".join(f"{s:.2f}" for s in r.get("step_s", []))
        med = r.get("median_step_s")
        print(f"{name:<16} | {r['status']:<7} | {r.get('params', 0) / 1e6:>6.1f}M | "
              f"{'-' if med is None else f'{med:.2f}':>15} | {steps:<18} | {fmt_gib(r.get('peak_rss')):>12} | "
              f"{fmt_gib(r.get('peak_rss_steps')):>8} | {fmt_gib(r.get('rss_runtime')):>7} | "
              f"{', '.join(f'{x:.4f}' for x in r.get('losses', []))}")

    ratios: dict[str, Any] = {}
    mt, ds = results.get("memtrain-nvme", {}), results.get("deepspeed-nvme", {})
    print()
    if mt.get("status") == "ok" and ds.get("status") == "ok":
        ratios["step_speedup_memtrain_nvme_vs_deepspeed_nvme"] = ds["median_step_s"] / mt["median_step_s"]
        ratios["peak_rss_memtrain_nvme_over_deepspeed_nvme"] = mt["peak_rss"] / ds["peak_rss"]
        ratios["peak_rss_in_steps_memtrain_nvme_over_deepspeed_nvme"] = mt["peak_rss_steps"] / ds["peak_rss_steps"]
        print(f"step time, ZeRO-Infinity / memtrain (NVMe): {ratios['step_speedup_memtrain_nvme_vs_deepspeed_nvme']:.2f}x"
              f" (target >= 1.5x: {'met' if ratios['step_speedup_memtrain_nvme_vs_deepspeed_nvme'] >= 1.5 else 'NOT met'})")
        print(f"peak RSS, memtrain / ZeRO-Infinity (NVMe): {ratios['peak_rss_memtrain_nvme_over_deepspeed_nvme']:.2f}"
              f" (target <= 0.5: {'met' if ratios['peak_rss_memtrain_nvme_over_deepspeed_nvme'] <= 0.5 else 'NOT met'});"
              f" during the steps only: {ratios['peak_rss_in_steps_memtrain_nvme_over_deepspeed_nvme']:.2f}")
    else:
        print("memtrain-nvme vs deepspeed-nvme: no ratio (a contender did not finish; see above)")
    for a, b in (("memtrain-none", "deepspeed-none"), ("memtrain-nvme", "memtrain-none"),
                 ("deepspeed-nvme", "deepspeed-none")):
        ra, rb = results.get(a, {}), results.get(b, {})
        if ra.get("status") == "ok" and rb.get("status") == "ok":
            ratios[f"step_s_{a}_over_{b}"] = ra["median_step_s"] / rb["median_step_s"]
            ratios[f"peak_rss_{a}_over_{b}"] = ra["peak_rss"] / rb["peak_rss"]
            print(f"{a} / {b}: step time {ratios[f'step_s_{a}_over_{b}']:.2f}, "
                  f"peak RSS {ratios[f'peak_rss_{a}_over_{b}']:.2f}")

    budget_check: dict[str, Any] = {}
    if mt.get("status") == "ok":
        overhead = {"runtime_rss": mt["rss_runtime"], "saved_for_backward": mt["saved_for_backward_bytes"],
                    "grads_two_largest_units": mt["two_largest_units_bytes"]}
        bound = mt["host_budget_bytes"] + sum(overhead.values())
        budget_check = {"budget": mt["host_budget_bytes"], "memtrain_charged": mt["memtrain_host_bytes"],
                        "memtrain_charged_total": mt["memtrain_host_bytes_total"], "fixed_overhead": overhead,
                        "bound": bound, "peak_rss": mt["peak_rss"], "peak_rss_steps": mt["peak_rss_steps"],
                        "within": mt["peak_rss"] <= bound, "within_steps": mt["peak_rss_steps"] <= bound}
        print(f"\nmemtrain host budget {fmt_gib(mt['host_budget_bytes'])} GiB; memtrain's own charged buffers "
              f"{fmt_gib(mt['memtrain_host_bytes_total'])} GiB ({', '.join(f'{k} {fmt_gib(v)}' for k, v in mt['memtrain_host_bytes'].items())})")
        print(f"fixed overhead {fmt_gib(sum(overhead.values()))} GiB = runtime {fmt_gib(overhead['runtime_rss'])} + "
              f"saved for backward {fmt_gib(overhead['saved_for_backward'])} + grads of the 2 largest units "
              f"{fmt_gib(overhead['grads_two_largest_units'])}; bound = budget + overhead = {fmt_gib(bound)} GiB")
        print(f"peak RSS {fmt_gib(mt['peak_rss'])} GiB (whole process) -> "
              f"{'WITHIN' if budget_check['within'] else 'OVER'} the bound; during the steps "
              f"{fmt_gib(mt['peak_rss_steps'])} GiB -> {'WITHIN' if budget_check['within_steps'] else 'OVER'}")
        if mt["losses"] and results.get("memtrain-none", {}).get("status") == "ok":
            same = mt["losses"] == results["memtrain-none"]["losses"]
            budget_check["losses_bitwise_equal_to_no_offload"] = same
            print(f"memtrain-nvme losses bitwise equal to memtrain-none: {same}")

    leftovers = list(Path(args.nvme_path).rglob("*"))
    print(f"files left under {args.nvme_path}: {len(leftovers)}")
    report = {
        "benchmark": "offload_step", "command": " ".join([Path(sys.argv[0]).as_posix(), *raw]),
        "date_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "machine": platform.platform(),
        "cpus": os.cpu_count(), "settings": {k: v for k, v in vars(args).items() if k not in ("child", "result")},
        "results": results, "ratios": ratios, "memtrain_budget_check": budget_check,
        "files_left_in_nvme_path": len(leftovers),
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2, default=str))
    print(f"wrote {args.out}")
    return 0 if all(r["status"] == "ok" for r in results.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
