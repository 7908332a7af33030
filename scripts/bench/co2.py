"""CO2 local updates vs DDP, periodic parameter averaging and no communication at all, over a shaped link.

    flock /tmp/memtrain-bench.lock python scripts/bench/co2.py                  # 10-25 minutes, needs root
    python scripts/bench/co2.py --rates 1gbit --loss-steps 48                   # a quicker look
    python scripts/bench/co2.py --rates 1gbit,100mbit --no-loss-phase --profile \
        --contenders nocomm,co2-12,co2-12-direct,co2-28-int8                    # targeted throughput, CPU by thread

The script makes a network namespace, brings its loopback up and shapes it with ``tc qdisc ... tbf`` (this
kernel has no netem) at each rate; 4 gloo processes run inside it, so every byte they exchange crosses that one
shaped link. Contenders, on the same model (an MLP stack) and data, each rank its own batches:

  nocomm     every rank trains alone: the throughput ceiling
  ddp        torch DistributedDataParallel (gradients all-reduced every step, overlapped with backward)
  avg        memtrain local_update, synchronous, outer lr 1, no momentum: periodic parameter averaging
  co2-<tau>  memtrain local_update, asynchronous CO2 (outer momentum 0.2, staleness penalty, clip 1.0), for two
             values of tau: 12 and one chosen so that the 100 Mbit/s all-reduce hides behind tau local steps

Throughput (samples/s over all ranks, the slowest rank's) is timed in steady state: DDP and nocomm after a
warm-up step; avg and CO2 over one full round after the first boundary (the window ends with the boundary that
waits for the reduction launched at its start). On the slower links the contenders run ``--rounds`` times
round-robin in the same processes and the median counts (this 2-core machine is shared: single windows vary).
Loss depends on the algorithm, not on the link, so it is measured once, in the first (fastest) phase, where
every contender runs ``--loss-steps`` steps (equal tokens): the evaluation MSE of the final model on a held-out
batch (local-update runs are synchronized first). Prints ratios to nocomm, DDP's share of the step spent
communicating, and writes JSON.

``--contenders`` picks other labels (``contender()``: outer hyperparameters, compression, ``-direct`` = the same
LocalUpdate installed on the plain model without the Engine's stage-0 wrapper). ``--profile`` adds, per timed
window, the CPU seconds of every thread of rank 0 (training thread, reduction thread, gloo's threads), the machine's
CPU by kind, and the training thread's CPU per step while a reduction runs and while none does. A second held-out
batch (``val_mse``) is for choosing outer hyperparameters; ``eval_mse`` is the reported loss.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
BURST = {"10gbit": "8mb", "1gbit": "1mb", "100mbit": "1mb"}
CO2 = {"asynchronous": True, "outer_lr": 1.0, "outer_momentum": 0.2, "staleness_penalty": True, "outer_clip": 1.0}
AVG = {"asynchronous": False, "outer_lr": 1.0, "outer_momentum": 0.0}


# -- worker (one rank, inside the namespace) -------------------------------------------------------------------------
def build_model(width: int, layers: int, out: int):
    import torch.nn as nn

    class Block(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.norm, self.fc = nn.LayerNorm(width), nn.Linear(width, width)

        def forward(self, x):
            return x + nn.functional.gelu(self.fc(self.norm(x)))

    class MLPStack(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.blocks = nn.ModuleList(Block() for _ in range(layers))
            self.head = nn.Linear(width, out)

        def forward(self, x):
            for block in self.blocks:
                x = block(x)
            return self.head(x)

    return MLPStack()


class Task:
    """Regression onto a fixed random teacher; batch (step, rank) is the same for every contender."""

    def __init__(self, width: int, out: int, batch: int) -> None:
        import torch

        g = torch.Generator().manual_seed(1234)
        self.w1 = torch.randn(width, 64, generator=g) / math.sqrt(width)
        self.w2 = torch.randn(64, out, generator=g) / 8.0
        self.width, self.batch = width, batch
        self.eval_x = torch.randn(1024, width, generator=torch.Generator().manual_seed(99))
        self.eval_y = self.target(self.eval_x)
        # A second held-out batch for choosing outer hyperparameters, so the reported eval MSE is not tuned on.
        self.val_x = torch.randn(1024, width, generator=torch.Generator().manual_seed(98))
        self.val_y = self.target(self.val_x)

    def target(self, x):
        import torch

        return torch.tanh(x @ self.w1) @ self.w2

    def batch_for(self, step: int, rank: int):
        import torch

        x = torch.randn(self.batch, self.width, generator=torch.Generator().manual_seed(step * 1009 + rank))
        return x, self.target(x)


def thread_cpu(names: dict[int, str] | None = None) -> dict[str, float]:
    """CPU seconds (user + system) of every thread of this process, summed by thread name (/proc/self/task);
    ``names`` renames threads by native id (Python threads are all called "python")."""
    tick = os.sysconf("SC_CLK_TCK")
    out: dict[str, float] = {}
    for task in os.listdir("/proc/self/task"):
        try:
            stat = Path(f"/proc/self/task/{task}/stat").read_text()
        except OSError:  # the thread ended
            continue
        name = (names or {}).get(int(task)) or stat[stat.index("(") + 1 : stat.rindex(")")]
        fields = stat[stat.rindex(")") + 2 :].split()
        out[name] = out.get(name, 0.0) + (int(fields[11]) + int(fields[12])) / tick
    return out


def machine_cpu() -> dict[str, float]:
    """Machine-wide CPU seconds by kind (/proc/stat): who else burns the cores during the window."""
    names = ["user", "nice", "system", "idle", "iowait", "irq", "softirq", "steal"]
    fields = Path("/proc/stat").read_text().split("\n")[0].split()[1:9]
    tick = os.sysconf("SC_CLK_TCK")
    return {n: int(v) / tick for n, v in zip(names, fields)}


def run_contender(name: str, lu: dict | None, steps: int, window: tuple[int, int], args: Any, rank: int,
                  world: int) -> dict[str, Any]:
    import torch
    import torch.distributed as dist
    import torch.nn.functional as F

    from memtrain import Engine, MemTrainConfig

    task = Task(args.width, 16, args.batch)
    torch.manual_seed(0)
    model = build_model(args.width, args.layers, 16)
    engine = local = None
    if name == "ddp":
        model = torch.nn.parallel.DistributedDataParallel(model)
    elif lu is not None and not lu.get("direct"):
        engine = Engine.create(MemTrainConfig.from_dict({"sharding": {"stage": 0}, "local_update": lu}), world, world, "cpu")
        engine.prepare_model(model)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, foreach=True)
    if engine is not None:
        engine.prepare_optimizer(opt, model)
        local = engine.local_update
    elif lu is not None:  # the same outer loop on the plain model: no engine, so no stage-0 replicate() wrapper
        from memtrain.config import LocalUpdateConfig
        from memtrain.local_update import LocalUpdate

        config = LocalUpdateConfig(**{k: v for k, v in lu.items() if k != "direct"})
        local = LocalUpdate(model, opt, config, dist.new_group(list(range(world))))
    dist.barrier()
    start, end = window
    stamps = [time.perf_counter()]
    busy = []  # per step: a reduction was running when it began
    own = [time.thread_time()]  # the training thread's CPU seconds
    cpu: dict[int, tuple[dict[str, float], dict[str, float], float]] = {}
    names = {threading.get_native_id(): "train"}
    background = local.background if local is not None else None
    if background is not None:
        names[background._thread.native_id] = "reduce"
    for step in range(steps):
        if args.profile and step in (start, end):
            cpu[step] = (thread_cpu(names), machine_cpu(), time.thread_time())
        busy.append(bool(background is not None and background.in_flight and not background._done.is_set()))
        x, y = task.batch_for(step, rank)
        F.mse_loss(model(x), y).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        stamps.append(time.perf_counter())
        own.append(time.thread_time())
    seconds = stamps[end] - stamps[start]
    result: dict[str, Any] = {"steps": steps, "window_steps": end - start, "window_s": seconds,
                              "samples_per_s": world * args.batch * (end - start) / seconds}
    if args.profile:
        cpu[end] = (thread_cpu(names), machine_cpu(), time.thread_time())
        (t0, m0, _), (t1, m1, _) = cpu[start], cpu[end]
        result["thread_cpu_s"] = {k: round(t1[k] - t0.get(k, 0.0), 2) for k in t1 if t1[k] - t0.get(k, 0.0) > 0}
        result["machine_cpu_s"] = {k: round(m1[k] - m0[k], 2) for k in m1}
        durations = [b - a for a, b in zip(stamps[start:end], stamps[start + 1 : end + 1])]
        in_flight = [d for d, b in zip(durations, busy[start:end]) if b]
        idle = [d for d, b in zip(durations, busy[start:end]) if not b]
        result["step_s_in_flight"] = round(sum(in_flight) / len(in_flight), 4) if in_flight else None
        result["step_s_quiet"] = round(sum(idle) / len(idle), 4) if idle else None
        own_s = [b - a for a, b in zip(own[start:end], own[start + 1 : end + 1])]
        mine = [c for c, b in zip(own_s, busy[start:end]) if b]
        rest = [c for c, b in zip(own_s, busy[start:end]) if not b]
        result["train_cpu_s_in_flight"] = round(sum(mine) / len(mine), 4) if mine else None
        result["train_cpu_s_quiet"] = round(sum(rest) / len(rest), 4) if rest else None
        result["last_step_s"] = round(durations[-1], 4)  # holds the boundary (outer step) of local-update runs
    if local is not None:
        history = background.history if background is not None else []
        if history:
            result["allreduce_s"] = [round(t.reduce_seconds, 3) for t in history]
            result["wait_s"] = [round(t.waited, 3) for t in history]
        local.synchronize()  # one model to evaluate (and close the outer loop cleanly)
        local.close()
    with torch.no_grad():
        result["eval_mse"] = F.mse_loss(model(task.eval_x), task.eval_y).item()
        result["val_mse"] = F.mse_loss(model(task.val_x), task.val_y).item()
    timing = torch.tensor([result["samples_per_s"]], dtype=torch.float64)
    dist.all_reduce(timing, op=dist.ReduceOp.MIN)  # the slowest rank sets the pace
    result["samples_per_s"] = timing.item()
    return result


def worker(args: argparse.Namespace) -> None:
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    dist.init_process_group("gloo")
    plan = json.loads(args.plan)
    results: dict[str, list[dict[str, Any]]] = {}
    for item in plan:
        run = run_contender(item["name"], item["lu"], item["steps"], tuple(item["window"]), args, rank, world)
        results.setdefault(item["label"], []).append(run)
        if rank == 0:
            print(f"  {args.rate:>8} {item['label']:>8}: {run['samples_per_s']:8.0f} samples/s "
                  f"eval mse {run['eval_mse']:.4f} (val {run['val_mse']:.4f})", flush=True)
            if args.profile:
                print(f"           step s: in flight {run['step_s_in_flight']} quiet {run['step_s_quiet']} last "
                      f"{run['last_step_s']}; training thread CPU s/step: in flight {run['train_cpu_s_in_flight']} "
                      f"quiet {run['train_cpu_s_quiet']}; "
                      f"rounds {run.get('allreduce_s')} waited {run.get('wait_s')}\n"
                      f"           rank 0 threads (CPU s over {run['window_s']:.1f} s): {run['thread_cpu_s']}\n"
                      f"           machine: {run['machine_cpu_s']}", flush=True)
    if rank == 0:
        Path(args.result).write_text(json.dumps(results))
    dist.destroy_process_group()


# -- parent: namespace, shaping, one set of processes per rate ----------------------------------------------------
def sh(*cmd: str) -> None:
    subprocess.run(cmd, check=True)


def contender(label: str) -> tuple[str, dict | None, int | None]:
    """``nocomm``, ``ddp``, ``avg-<tau>``, ``co2-<tau>`` with optional suffixes: ``-bf16`` / ``-int8`` (compression
    on the wire), ``-nesterov`` (DiLoCo's outer Nesterov), ``-lr<outer lr>``, ``-m<outer momentum>``, ``-nopen``
    (no staleness penalty), ``-noclip``, ``-direct`` (memtrain's LocalUpdate installed on the plain model
    instead of through the Engine, whose stage-0 replicate() wrapper costs CPU per step: isolates that cost)
    -> (kind, local_update config, tau)."""
    kind, *rest = label.split("-")
    if kind in ("nocomm", "ddp") and not rest:
        return kind, None, None
    if kind not in ("avg", "co2") or not rest:
        raise SystemExit(f"unknown contender {label!r}: nocomm, ddp, avg-<tau>, co2-<tau>[-bf16|-int8|-nesterov|...]")
    lu: dict[str, Any] = {"tau": int(rest[0]), **(CO2 if kind == "co2" else AVG)}
    for opt in rest[1:]:
        if opt in ("bf16", "int8"):
            lu["compression"] = {"bf16": "bfloat16", "int8": "int8"}[opt]
        elif opt == "nesterov":
            lu["outer_optimizer"] = "nesterov"
        elif opt == "nopen":
            lu["staleness_penalty"] = False
        elif opt == "direct":
            lu["direct"] = True
        elif opt == "noclip":
            lu["outer_clip"] = None
        elif opt.startswith("lr"):
            lu["outer_lr"] = float(opt[2:])
        elif opt.startswith("m"):
            lu["outer_momentum"] = float(opt[1:])
        else:
            raise SystemExit(f"unknown option {opt!r} in contender {label!r}")
    return kind, lu, lu["tau"]


def plan_for(rate: str, loss_phase: bool, labels: list[str], loss_steps: int, rounds: int,
             window_rounds: int = 1) -> list[dict[str, Any]]:
    def windowed(label: str) -> dict[str, Any]:
        name, lu, tau = contender(label)
        if loss_phase:  # long runs, equal tokens; timed after the first round (or the first step)
            return {"label": label, "name": name, "lu": lu, "steps": loss_steps, "window": [tau or 1, loss_steps]}
        if tau is None:
            n = (3 if rate == "100mbit" else 6) if name == "ddp" else 1 + 12 * window_rounds
            return {"label": label, "name": name, "lu": lu, "steps": n, "window": [1, n]}
        return {"label": label, "name": name, "lu": lu, "steps": (1 + window_rounds) * tau,
                "window": [tau, (1 + window_rounds) * tau]}

    plan = [windowed(label) for label in labels]
    return plan if loss_phase else plan * rounds


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--plan", help=argparse.SUPPRESS)
    p.add_argument("--result", help=argparse.SUPPRESS)
    p.add_argument("--rate", default="", help=argparse.SUPPRESS)
    p.add_argument("--rates", default="10gbit,1gbit,100mbit", help="link rates, fastest first (loss runs there)")
    p.add_argument("--nproc", type=int, default=4)
    p.add_argument("--width", type=int, default=512)
    p.add_argument("--layers", type=int, default=16)
    p.add_argument("--batch", type=int, default=256, help="samples per rank per step")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--taus", default="12,28", help="the two CO2 tau values (the first also for avg)")
    p.add_argument("--contenders", default=None,
                   help="comma-separated labels instead of the default set (see contender(): e.g. "
                        "nocomm,co2-28,co2-28-bf16); nocomm must be among them")
    p.add_argument("--window-rounds", type=int, default=1,
                   help="throughput phases: local-update contenders are timed over this many rounds after the first")
    p.add_argument("--no-loss-phase", action="store_true",
                   help="time the first rate like the others (no equal-token loss runs)")
    p.add_argument("--loss-steps", type=int, default=112)
    p.add_argument("--rounds", type=int, default=3, help="round-robin repeats on the slower links (median)")
    p.add_argument("--out", default="bench_results/co2.json")
    p.add_argument("--profile", action="store_true",
                   help="per-thread and machine CPU seconds in each timed window; step time with and without a round in flight")
    args = p.parse_args()
    if args.worker:
        worker(args)
        return
    if os.geteuid() != 0:
        raise SystemExit("needs root: it creates a network namespace and shapes its loopback with tc")
    taus = [int(t) for t in args.taus.split(",")]
    labels = (args.contenders.split(",") if args.contenders else
              ["nocomm", "ddp", f"avg-{taus[0]}", *(f"co2-{t}" for t in taus)])
    if "nocomm" not in labels:
        raise SystemExit("--contenders needs nocomm (the ceiling every ratio is taken to)")
    rates = args.rates.split(",")
    ns = f"memtrain-co2-{os.getpid()}"
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    report: dict[str, Any] = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "machine": os.uname().nodename,
                              "cpus": os.cpu_count(), "nproc": args.nproc, "width": args.width, "layers": args.layers,
                              "batch_per_rank": args.batch, "taus": taus, "contenders": labels,
                              "loss_steps": None if args.no_loss_phase else args.loss_steps, "rates": {}}
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # a timeout still removes the namespace
    procs: list[subprocess.Popen] = []
    sh("ip", "netns", "add", ns)
    try:
        sh("ip", "netns", "exec", ns, "ip", "link", "set", "lo", "up")
        for i, rate in enumerate(rates):
            sh("ip", "netns", "exec", ns, "tc", "qdisc", "replace", "dev", "lo", "root", "tbf", "rate", rate,
               "burst", BURST.get(rate, "1mb"), "latency", "100ms")
            plan = plan_for(rate, i == 0 and not args.no_loss_phase, labels, args.loss_steps, args.rounds,
                            args.window_rounds)
            result_file = out.with_name(f"{out.stem}.{rate}.part.json")
            port = free_port()
            env_base = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
                        "WORLD_SIZE": str(args.nproc), "PYTHONPATH": f"{ROOT}:{os.environ.get('PYTHONPATH', '')}"}
            cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", "--plan", json.dumps(plan), "--rate", rate,
                   "--result", str(result_file), "--width", str(args.width), "--layers", str(args.layers),
                   "--batch", str(args.batch), "--lr", str(args.lr)] + (["--profile"] if args.profile else [])
            print(f"== {rate}: {args.nproc} processes in netns {ns}, lo shaped by tbf", flush=True)
            procs = [subprocess.Popen(["ip", "netns", "exec", ns, *cmd], env={**env_base, "RANK": str(r)}, cwd=ROOT)
                     for r in range(args.nproc)]
            codes = [proc.wait() for proc in procs]
            if any(codes):
                raise SystemExit(f"workers failed at {rate}: exit codes {codes}")
            report["rates"][rate] = json.loads(result_file.read_text())
            result_file.unlink()
            out.write_text(json.dumps(report, indent=2) + "\n")  # what is measured so far survives an abort
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
        subprocess.run(["ip", "netns", "del", ns], check=False)
    summarize(report)
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {out}")


def median(runs: list[dict[str, Any]]) -> float:
    values = sorted(r["samples_per_s"] for r in runs)
    return values[len(values) // 2] if len(values) % 2 else (values[len(values) // 2 - 1] + values[len(values) // 2]) / 2


def summarize(report: dict[str, Any]) -> None:
    rates = list(report["rates"])
    labels = [label for label in report["contenders"] if label != "nocomm"]
    print(f"\nthroughput as a share of no communication (samples/s), {report['nproc']} processes, batch "
          f"{report['batch_per_rank']}/rank, MLP {report['layers']}x{report['width']}")
    print(f"{'rate':>8} " + " ".join(f"{label:>9}" for label in labels) + "   DDP comm share")
    report["ratio_to_nocomm"], report["ddp_comm_share"] = {}, {}
    for rate in rates:
        r = report["rates"][rate]
        ceiling = median(r["nocomm"])
        ratios = {label: median(r[label]) / ceiling for label in labels}
        report["ratio_to_nocomm"][rate] = ratios
        share = ""
        if "ddp" in ratios:
            report["ddp_comm_share"][rate] = 1 - ratios["ddp"]  # the share of DDP's step beyond its compute
            share = f"   {1 - ratios['ddp']:.0%}"
        print(f"{rate:>8} " + " ".join(f"{ratios[label]:>9.0%}" for label in labels) + share)
    if report["loss_steps"] is None:
        return
    loss = {label: runs[0] for label, runs in report["rates"][rates[0]].items()}
    ref = loss["ddp"]["eval_mse"] if "ddp" in loss else None
    print(f"\neval MSE after {report['loss_steps']} steps (equal tokens)" + (f", relative to DDP's {ref:.4f}:" if ref else ":"))
    for label, value in loss.items():
        print(f"  {label:>8}: {value['eval_mse']:.4f}" + (f" ({value['eval_mse'] / ref - 1:+.1%})" if ref else ""))
    if ref:
        report["loss_relative_to_ddp"] = {label: v["eval_mse"] / ref - 1 for label, v in loss.items()}


if __name__ == "__main__":
    main()
