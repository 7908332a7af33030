"""Run a function on N real processes joined by a gloo process group (CPU), and collect what each returns."""
from __future__ import annotations

import os
import pickle
import tempfile
import traceback
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def _worker(fn: Callable[..., Any], rank: int, world_size: int, init_file: str, env: dict[str, str],
            args: tuple, queue: Any) -> None:
    os.environ.update(env)
    torch.set_num_threads(1)
    try:
        dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
        result = fn(rank, world_size, *args)
        dist.barrier()
        # Plain pickle: tensors travel by value, not as shared memory that dies with this process.
        queue.put((rank, "ok", pickle.dumps(result)))
    except BaseException:  # report every failure to the parent, which raises it
        queue.put((rank, "error", traceback.format_exc()))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def run_distributed(fn: Callable[..., Any], world_size: int, *args: Any, env: dict[str, str] | None = None,
                    timeout: float = 240.0) -> list[Any]:
    """``fn(rank, world_size, *args)`` on ``world_size`` processes; returns the results ordered by rank."""
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    with tempfile.TemporaryDirectory() as tmp:
        init_file = os.path.join(tmp, "pg_init")
        procs = [
            ctx.Process(target=_worker, args=(fn, r, world_size, init_file, env or {}, args, queue), daemon=False)
            for r in range(world_size)
        ]
        for p in procs:
            p.start()
        results: dict[int, Any] = {}
        errors: list[str] = []
        try:
            for _ in range(world_size):
                rank, status, payload = queue.get(timeout=timeout)
                if status == "error":
                    errors.append(f"rank {rank}:\n{payload}")
                    break
                results[rank] = pickle.loads(payload)
        finally:
            for p in procs:
                p.join(timeout=30 if not errors else 1)
                if p.is_alive():
                    p.kill()
        if errors:
            raise RuntimeError("distributed worker failed\n" + "\n".join(errors))
    return [results[r] for r in range(world_size)]
