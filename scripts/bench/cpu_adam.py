"""Benchmark: torch's fused CPU AdamW kernel against DeepSpeed's CPU Adam on the same fp32 tensors, in one run.

    python scripts/bench/cpu_adam.py --sizes 16 64 --threads 2 --repeats 7 --out bench_results/cpu_adam.json

torch: ``torch._fused_adamw_`` called the way memtrain's offloaded optimizer calls it on a tile (one-element lists
of param / grad / exp_avg / exp_avg_sq, a 0-d float32 step tensor, lr/betas/eps/weight_decay as floats).
DeepSpeed: ``deepspeed.ops.adam.DeepSpeedCPUAdam(adamw_mode=True).step()`` on one parameter whose state holds
the same moments (the op is built with ninja on first use into ~/.cache/torch_extensions). Each contender has
its own copy of the same param / moments and the same gradient; one step of each from the same state is
checked to agree (max abs difference printed). Then the two are timed round-robin ``--repeats`` times per size
(one warm-up call each first); the median is reported as Gparams/s (elements updated per second / 1e9) and the
ratio torch / DeepSpeed (> 1: torch is faster). Threads: ``torch.set_num_threads(--threads)`` and
OMP_NUM_THREADS (DeepSpeed's op uses OpenMP). If DeepSpeed's op cannot be built or run, the reason is printed
and recorded instead of a figure.
"""
from __future__ import annotations

import argparse
import os
import sys

if __name__ == "__main__":  # before torch / OpenMP start: DeepSpeed's op reads OMP_NUM_THREADS
    for i, a in enumerate(sys.argv):
        if a == "--threads" and i + 1 < len(sys.argv):
            os.environ["OMP_NUM_THREADS"] = sys.argv[i + 1]
        elif a.startswith("--threads="):
            os.environ["OMP_NUM_THREADS"] = a.split("=", 1)[1]
    os.environ.setdefault("OMP_NUM_THREADS", "2")

import json
import platform
import statistics
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

LR, BETAS, EPS, WD = 1e-3, (0.9, 0.95), 1e-8, 0.1


def timed(fn: Callable[[], None]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


class TorchFused:
    name = "torch._fused_adamw_"

    def __init__(self, param: torch.Tensor, grad: torch.Tensor, m: torch.Tensor, v: torch.Tensor) -> None:
        self.param, self.grad, self.m, self.v = param, grad, m, v
        self.step_t = torch.zeros((), dtype=torch.float32)

    def step(self) -> None:
        self.step_t += 1  # the kernel reads the step; torch.optim increments it before the call, as here
        torch._fused_adamw_([self.param], [self.grad], [self.m], [self.v], [], [self.step_t], lr=LR,
                            beta1=BETAS[0], beta2=BETAS[1], weight_decay=WD, eps=EPS, amsgrad=False,
                            maximize=False)


class DeepSpeedCPU:
    name = "DeepSpeedCPUAdam"

    def __init__(self, param: torch.Tensor, grad: torch.Tensor, m: torch.Tensor, v: torch.Tensor) -> None:
        from deepspeed.ops.adam import DeepSpeedCPUAdam

        self.param = torch.nn.Parameter(param)
        self.param.grad = grad
        self.opt = DeepSpeedCPUAdam([self.param], lr=LR, betas=BETAS, eps=EPS, weight_decay=WD, adamw_mode=True)
        self.opt.state[self.param] = {"step": 0, "exp_avg": m, "exp_avg_sq": v}

    def step(self) -> None:
        self.opt.step()


def deepspeed_status() -> dict[str, Any]:
    """Build (or load) DeepSpeed's CPU Adam op; on failure, why."""
    try:
        import deepspeed
        from deepspeed.ops.op_builder import CPUAdamBuilder
    except Exception as err:  # noqa: BLE001 - reported, not raised
        return {"ok": False, "reason": f"import deepspeed failed: {type(err).__name__}: {err}"}
    builder = CPUAdamBuilder()
    compatible = builder.is_compatible(verbose=True)
    start = time.perf_counter()
    try:
        builder.load()
    except Exception as err:  # noqa: BLE001
        return {"ok": False, "reason": f"CPUAdamBuilder().load() failed (is_compatible={compatible}): "
                                       f"{type(err).__name__}: {err}", "traceback": traceback.format_exc()}
    return {"ok": True, "deepspeed": deepspeed.__version__, "load_s": time.perf_counter() - start,
            "simd_flags": builder.simd_width() if hasattr(builder, "simd_width") else None}


def bench_size(numel: int, repeats: int, ds_ok: bool) -> dict[str, Any]:
    gen = torch.Generator().manual_seed(numel)
    param = torch.randn(numel, generator=gen)
    grad = torch.randn(numel, generator=gen) * 1e-2
    m = torch.randn(numel, generator=gen) * 1e-3
    v = torch.rand(numel, generator=gen) * 1e-5
    out: dict[str, Any] = {"numel": numel}
    contenders: list[Any] = [TorchFused(param.clone(), grad, m.clone(), v.clone())]
    if ds_ok:
        try:
            contenders.append(DeepSpeedCPU(param.clone(), grad, m.clone(), v.clone()))
        except Exception as err:  # noqa: BLE001
            out["deepspeed_error"] = f"{type(err).__name__}: {err}"
    del param, m, v
    # Warm-up = one step of each from the same state: the results must agree.
    for c in contenders:
        c.step()
    if len(contenders) == 2:
        a, b = contenders[0], contenders[1]
        out["max_abs_diff_param"] = (a.param - b.param.data).abs().max().item()
        out["max_abs_diff_exp_avg_sq"] = (a.v - b.opt.state[b.param]["exp_avg_sq"]).abs().max().item()
    times: dict[str, list[float]] = {c.name: [] for c in contenders}
    for _ in range(repeats):
        for c in contenders:
            times[c.name].append(timed(c.step))
    out["seconds"] = times
    for name, ts in times.items():
        out[name] = {"median_s": statistics.median(ts), "gparams_per_s": numel / statistics.median(ts) / 1e9}
    if len(contenders) == 2:
        out["ratio_torch_over_deepspeed"] = (out[TorchFused.name]["gparams_per_s"]
                                             / out[DeepSpeedCPU.name]["gparams_per_s"])
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=float, nargs="+", default=[16, 64], help="millions of elements")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--out", default="bench_results/cpu_adam.json")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    ds = deepspeed_status()
    if not ds["ok"]:
        print(f"DeepSpeed CPU Adam: NOT RUN - {ds['reason']}")
        if "traceback" in ds:
            print(ds["traceback"])
    results = []
    for size in args.sizes:
        results.append(bench_size(int(size * 2**20), args.repeats, ds["ok"]))
        r = results[-1]
        if "deepspeed_error" in r:
            print(f"DeepSpeed CPU Adam at {size}M: NOT RUN - {r['deepspeed_error']}")

    print(f"\nfp32 AdamW step, {args.threads} threads, median of {args.repeats} (round-robin; shared machine, noisy)")
    print(f"{'elements':>10} | {'torch fused Gparams/s':>21} | {'DeepSpeed Gparams/s':>19} | {'torch/DS':>8} | "
          f"{'max|dparam|':>11}")
    for size, r in zip(args.sizes, results):
        t = r[TorchFused.name]["gparams_per_s"]
        d = r.get(DeepSpeedCPU.name, {}).get("gparams_per_s")
        ratio = r.get("ratio_torch_over_deepspeed")
        print(f"{size:>9g}M | {t:>21.3f} | {d if d is None else f'{d:.3f}':>19} | "
              f"{'n/a' if ratio is None else f'{ratio:.2f}x':>8} | {r.get('max_abs_diff_param', float('nan')):>11.2e}")
    report = {
        "benchmark": "cpu_adam", "command": " ".join([Path(sys.argv[0]).as_posix(), *sys.argv[1:]]),
        "date_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "machine": platform.platform(),
        "cpus": os.cpu_count(), "torch": torch.__version__, "threads": args.threads,
        "omp_num_threads": os.environ.get("OMP_NUM_THREADS"), "repeats": args.repeats,
        "hyper": {"lr": LR, "betas": BETAS, "eps": EPS, "weight_decay": WD},
        "deepspeed": {k: v for k, v in ds.items() if k != "traceback"}, "results": results,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2))
    print(f"\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
