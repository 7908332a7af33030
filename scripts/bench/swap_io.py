"""Benchmark: read and write GB/s of memtrain's swap engine on large tensors, against the disk's own limit
measured on the same folder (fio with O_DIRECT at the same block size and queue depth; dd with O_DIRECT, one
stream) and DeepSpeed's aio handle on the same files, in one run.

    python scripts/bench/swap_io.py --dir /local_nvme/bench --size-gib 2 --out bench_results/swap_io.json

Each contender writes ``--size-gib`` of random bytes as ``--tensor-mib`` tensors (one file each, like offloaded
optimizer tiles), all in flight at once, then reads them back; GB/s = bytes / wall seconds from the first
submit to the last completion. All I/O is O_DIRECT (aligned host buffers), so the page cache plays no part.
Every read is checked against what was written. Contenders run round-robin ``--repeats`` times; the
median is reported (all values are in the JSON).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable

import torch

from memtrain.swap import SwapEngine, aligned_empty

GB = 1e9


def dd_limit(folder: Path, size_bytes: int, block_mib: int) -> dict[str, float]:
    """The device limit as dd measures it: one O_DIRECT stream of ``block_mib`` blocks."""
    path = folder / "dd.bin"
    count = size_bytes // (block_mib * 2**20)
    out = {}
    for name, cmd in (
        ("write", ["dd", "if=/dev/zero", f"of={path}", f"bs={block_mib}M", f"count={count}", "oflag=direct",
                   "conv=notrunc"]),
        ("read", ["dd", f"if={path}", "of=/dev/null", f"bs={block_mib}M", f"count={count}", "iflag=direct"]),
    ):
        start = time.perf_counter()
        subprocess.run(cmd, check=True, capture_output=True)
        out[f"{name}_gbps"] = count * block_mib * 2**20 / (time.perf_counter() - start) / GB
    path.unlink()
    return out


def fio_limit(folder: Path, size_bytes: int, block_mib: int, depth: int) -> dict[str, Any]:
    """The device limit with the same block size and queue depth, as fio measures it (O_DIRECT, io_uring)."""
    if shutil.which("fio") is None:
        return {"status": "skipped", "reason": "fio is not installed (apt-get install fio)"}
    out: dict[str, Any] = {}
    for rw in ("write", "read"):
        proc = subprocess.run(
            ["fio", "--name=limit", f"--filename={folder / 'fio.bin'}", f"--rw={rw}", f"--bs={block_mib}M",
             f"--size={size_bytes}", "--ioengine=io_uring", f"--iodepth={depth}", "--direct=1",
             "--output-format=json"], check=True, capture_output=True, text=True)
        out[f"{rw}_gbps"] = json.loads(proc.stdout)["jobs"][0][rw]["bw_bytes"] / GB
    (folder / "fio.bin").unlink()
    return out


def timed(fn: Callable[[], None]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def run_memtrain(folder: Path, tensors: list[torch.Tensor], backend: str, block: int, depth: int) -> dict[str, Any]:
    engine = SwapEngine(queue_depth=depth, block_size=block, threads=depth, backend=backend)
    paths = [folder / f"memtrain_{i}.bin" for i in range(len(tensors))]
    backs = [aligned_empty(t.numel()) for t in tensors]

    def write() -> None:
        for h in [engine.write(t, p) for t, p in zip(tensors, paths)]:
            h.wait()

    def read() -> None:
        for h in [engine.read(b, p) for b, p in zip(backs, paths)]:
            h.wait()

    w, r = timed(write), timed(read)
    assert all(torch.equal(a, b) for a, b in zip(tensors, backs)), "memtrain read back other bytes"
    for p in paths:
        p.unlink()
    total = sum(t.numel() for t in tensors)
    return {"write_gbps": total / w / GB, "read_gbps": total / r / GB, "backend": engine.backend,
            "direct_requests": engine.stats()["direct_requests"]}


def run_deepspeed(folder: Path, tensors: list[torch.Tensor], block: int, depth: int) -> dict[str, Any]:
    from deepspeed.ops.op_builder import AsyncIOBuilder

    aio = AsyncIOBuilder().load(verbose=False)
    # (block_size, queue_depth, single_submit, overlap_events, intra_op_parallelism): DeepSpeed's defaults
    # except block size and queue depth, which match memtrain's for the comparison.
    handle = aio.aio_handle(block, depth, False, True, 1)
    paths = [str(folder / f"deepspeed_{i}.bin") for i in range(len(tensors))]
    backs = [aligned_empty(t.numel()) for t in tensors]

    def write() -> None:
        for t, p in zip(tensors, paths):
            handle.async_pwrite(t, p)
        handle.wait()

    def read() -> None:
        for b, p in zip(backs, paths):
            handle.async_pread(b, p)
        handle.wait()

    w, r = timed(write), timed(read)
    assert all(torch.equal(a, b) for a, b in zip(tensors, backs)), "DeepSpeed read back other bytes"
    for p in paths:
        os.unlink(p)
    total = sum(t.numel() for t in tensors)
    return {"write_gbps": total / w / GB, "read_gbps": total / r / GB}


def median(runs: list[dict[str, Any]]) -> dict[str, Any]:
    out = dict(runs[0])
    for key in ("write_gbps", "read_gbps"):
        values = sorted(r[key] for r in runs)
        out[key] = values[len(values) // 2]
        out[f"{key}_all"] = values
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dir", default="/tmp/memtrain_swap_bench", help="a folder on the disk to measure")
    parser.add_argument("--size-gib", type=float, default=2.0)
    parser.add_argument("--tensor-mib", type=int, default=256)
    parser.add_argument("--block-mib", type=int, default=1, help="I/O block size (memtrain, DeepSpeed, dd)")
    parser.add_argument("--queue-depth", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--skip-deepspeed", action="store_true")
    parser.add_argument("--out", default="bench_results/swap_io.json")
    args = parser.parse_args(argv)

    folder = Path(args.dir) / f"run-{os.getpid()}"
    folder.mkdir(parents=True, exist_ok=False)
    size = int(args.size_gib * 2**30) // (args.tensor_mib * 2**20) * args.tensor_mib * 2**20
    tensors = [aligned_empty(args.tensor_mib * 2**20).random_(0, 256) for _ in range(size // (args.tensor_mib * 2**20))]
    block, depth = args.block_mib * 2**20, args.queue_depth
    contenders: dict[str, Callable[[], dict[str, Any]]] = {
        "dd_o_direct": lambda: dd_limit(folder, size, args.block_mib),
        "fio_o_direct": lambda: fio_limit(folder, size, args.block_mib, depth),
        "memtrain_io_uring": lambda: run_memtrain(folder, tensors, "io_uring", block, depth),
        "memtrain_threads": lambda: run_memtrain(folder, tensors, "threads", block, depth),
        "deepspeed_aio": lambda: run_deepspeed(folder, tensors, block, depth),
    }
    if args.skip_deepspeed:
        del contenders["deepspeed_aio"]
    runs: dict[str, list[dict[str, Any]]] = {name: [] for name in contenders}
    skipped: dict[str, dict[str, Any]] = {}
    try:
        # Round-robin: a disk whose speed drifts (write caches, neighbours) affects every contender alike.
        for _ in range(args.repeats):
            for name, run in contenders.items():
                if name in skipped:
                    continue
                try:
                    result = run()
                except Exception as err:  # not installed, not permitted here, or an op that does not build
                    skipped[name] = {"status": "skipped", "reason": f"{type(err).__name__}: {err}"}
                    continue
                if "write_gbps" not in result:
                    skipped[name] = result
                    continue
                runs[name].append(result)
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    results: dict[str, Any] = {name: median(rs) for name, rs in runs.items() if rs}
    results.update(skipped)

    ratios: dict[str, float] = {}
    anchors = {"dd": "dd_o_direct", "fio": "fio_o_direct", "deepspeed": "deepspeed_aio"}
    for name, r in results.items():
        if name.startswith("memtrain") and "write_gbps" in r:
            for op in ("write", "read"):
                for label, anchor in anchors.items():
                    if "write_gbps" in results.get(anchor, {}):
                        ratios[f"{name} / {label} {op}"] = r[f"{op}_gbps"] / results[anchor][f"{op}_gbps"]

    print(f"{size / 2**30:.2f} GiB as {len(tensors)} x {args.tensor_mib} MiB tensors, block {args.block_mib} MiB, "
          f"queue depth {depth}, folder {args.dir}")
    print(f"{'contender':<20}{'write GB/s':>12}{'read GB/s':>12}")
    for name, r in results.items():
        if "write_gbps" in r:
            print(f"{name:<20}{r['write_gbps']:>12.3f}{r['read_gbps']:>12.3f}")
        else:
            print(f"{name:<20}  skipped: {r['reason'][:90]}")
    for name, value in ratios.items():
        print(f"{name:<40} x{value:.3f}")
    report = {
        "benchmark": "swap_io", "command": " ".join([Path(sys.argv[0]).as_posix(), *sys.argv[1:]]),
        "date_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "machine": platform.platform(),
        "cpu_count": os.cpu_count(), "torch": torch.__version__,
        "settings": {**vars(args), "bytes": size}, "results": results, "ratios": ratios,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
