"""Benchmark (GPU): device<->host bandwidth of memtrain's offload staging vs plain pageable copies, in one run.

    python scripts/bench/staging_bw.py --mib 256 --repeats 5

memtrain: ``memtrain.offload.staging.DeviceStaging`` (page-locked buffers from one pool, copies on a copy
stream; the parameter and gradient slices of one tile down, the parameter slice back up). Anchor: the same bytes
moved with ``tensor.to("cpu")`` / ``.copy_`` through pageable memory (what a naive CPU optimizer step does).
Median GB/s (1e9 B/s) of ``--repeats`` rounds; the ratio is memtrain / pageable.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from memtrain.offload.staging import DeviceStaging  # noqa: E402


def timed(fn) -> float:
    torch.cuda.synchronize()
    start = time.perf_counter()
    fn()
    torch.cuda.synchronize()
    return time.perf_counter() - start


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mib", type=int, default=256, help="MiB of fp32 parameters (and as many of gradients)")
    parser.add_argument("--tile-mib", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", default="bench_results/staging_bw.json")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("staging_bw: needs a CUDA GPU")
        return 1
    n, tile = args.mib * 2**18, args.tile_mib * 2**18
    param = torch.randn(n, device="cuda")
    grad = torch.randn(n, device="cuda")
    staging = DeviceStaging(tile, param.device)
    moved = 3 * n * 4  # param and grad down, param up

    def memtrain_round() -> None:
        starts = list(range(0, n, tile))
        upcoming = staging.fetch([(param[starts[0]:starts[0] + tile], grad[starts[0]:starts[0] + tile])])
        for i, _ in enumerate(starts):
            staged = upcoming
            if i + 1 < len(starts):
                s = starts[i + 1]
                upcoming = staging.fetch([(param[s:s + tile], grad[s:s + tile])])
            staging.wait(staged)
            staged.params[0].mul_(1.0)  # stands in for the CPU update
            staging.put_back(staged)
        staging.finish()

    def pageable_round() -> None:
        for s in range(0, n, tile):
            p, g = param[s:s + tile].to("cpu"), grad[s:s + tile].to("cpu")
            p.mul_(1.0)
            del g
            param[s:s + tile].copy_(p)

    results = {"memtrain": [], "pageable": []}
    for _ in range(args.repeats):
        results["memtrain"].append(moved / timed(memtrain_round) / 1e9)
        results["pageable"].append(moved / timed(pageable_round) / 1e9)
    medians = {k: statistics.median(v) for k, v in results.items()}
    print(f"{torch.cuda.get_device_name(0)}: {args.mib} MiB params + grads, tiles of {args.tile_mib} MiB")
    for k, v in medians.items():
        print(f"  {k:<9} {v:6.2f} GB/s  rounds {', '.join(f'{x:.2f}' for x in results[k])}")
    print(f"  memtrain / pageable: x{medians['memtrain'] / medians['pageable']:.2f}")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"settings": vars(args), "rounds": results, "median_GBps": medians}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
